"""The replayer's kernel bookkeeping: descriptor tables, open file descriptions, threads and forks.

:class:`ReplayerBase` holds what :class:`.replay.Replayer` needs to resolve a call's arguments the way the
kernel did: a descriptor table per process (threads share theirs; a fork copies it; ``execve`` closes the
close-on-exec descriptors), an open file description per ``open`` (shared by ``dup``s, with its own offset and
``O_APPEND``), the working directory, and the full current tree of every traced directory, so that a path
resolves to the inode it named at that moment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .strace import Syscall, TraceError, clone_flags, fd_arg, int_arg, path_arg
from .tree import Op, Tree, load_tree

AT_FDCWD = -100
CLONE_FILES = 0x400
F_DUPFD, F_DUPFD_CLOEXEC, F_SETFD, F_SETFL = 0, 1030, 2, 4
PROT_WRITE, MAP_SHARED = 2, 1


@dataclass
class OpenFile:
    """An open file description: shared by every descriptor ``dup``'d from it."""

    root: str | None  # the traced tree it belongs to; None outside all of them
    ino: int
    path: str
    writable: bool = False
    rdwr: bool = False
    append: bool = False
    sync: bool = False
    offset: int = 0
    is_dir: bool = False


@dataclass
class Fd:
    file: OpenFile
    cloexec: bool = False


@dataclass
class Recorded:
    """What one traced directory started as, and every op the trace applied to it, in order."""

    name: str
    path: str
    initial: Tree
    ops: list[Op] = field(default_factory=list)


class ReplayerBase:
    """State and argument resolution shared by the call handlers (``on_<syscall>`` methods)."""

    def __init__(self, roots: Mapping[str, str], marker_path: str, cwd: str) -> None:
        self.roots = {name: os.path.realpath(p) for name, p in roots.items()}
        self.cwd = os.path.realpath(cwd)
        self.marker_path = os.path.realpath(marker_path)
        self.trees: dict[str, Tree] = {}
        self.recorded: dict[str, Recorded] = {}
        self.next_ino = 1
        for name, path in self.roots.items():
            root = self.next_ino
            tree, _, self.next_ino = load_tree(path, root, root + 1)
            self.trees[name] = tree
            self.recorded[name] = Recorded(name, path, tree.copy())
        self.tables: dict[int, dict[int, Fd]] = {}
        self.cwds: dict[int, str] = {}
        self.tid_table: dict[int, int] = {}
        self.announced: dict[int, int] = {}  # parent tid -> flags of the fork it has started
        self._handlers: dict[str, Callable[[Syscall, dict[int, Fd]], None]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("on_")
        }

    # ------------------------------------------------------------------------------------- plumbing
    def feed_all(self, calls: Iterable[Syscall]) -> dict[str, Recorded]:
        for call in calls:
            self.feed(call)
        return self.recorded

    def feed(self, call: Syscall) -> None:
        if call.name == "clone-started":
            self.announced[call.tid] = clone_flags(call)
            return
        table = self._table(call.tid)
        if call.error is not None or (call.ret is None and call.name not in ("execve",)):
            return  # a failed call changed nothing
        handler = self._handlers.get(call.name.replace("64", ""))
        if handler is not None:
            handler(call, table)

    def _table(self, tid: int) -> dict[int, Fd]:
        key = self.tid_table.get(tid)
        if key is not None:
            return self.tables[key]
        if not self.tables:  # the traced process itself
            self.tables[tid] = {0: Fd(OpenFile(None, -1, "<stdin>")), 1: Fd(OpenFile(None, -1, "<stdout>"))}
            self.tables[tid][2] = Fd(OpenFile(None, -1, "<stderr>"))
            self.cwds[tid] = self.cwd
            self.tid_table[tid] = tid
            return self.tables[tid]
        # A child recorded before its parent's clone returned: the announcement says what it shares. Several
        # clones in flight are told apart only when it makes no difference: threads of one process.
        shared = {self.tid_table[p] for p, flags in self.announced.items() if flags & CLONE_FILES}
        if not self.announced or (len(self.announced) > 1 and len(shared) != 1):
            raise TraceError(f"thread {tid} appeared while {len(self.announced)} forks were in flight")
        parent, flags = next(iter(self.announced.items()))
        if len(self.announced) > 1 and any(not f & CLONE_FILES for f in self.announced.values()):
            raise TraceError(f"thread {tid} appeared while a fork and other clones were in flight")
        self._adopt(tid, parent, flags)
        return self.tables[self.tid_table[tid]]

    def _adopt(self, child: int, parent: int, flags: int) -> None:
        pkey = self.tid_table[parent]
        if flags & CLONE_FILES:
            self.tid_table[child] = pkey
        else:
            self.tables[child] = {fd: Fd(e.file, e.cloexec) for fd, e in self.tables[pkey].items()}
            self.cwds[child] = self.cwds[pkey]
            self.tid_table[child] = child

    def _locate(self, path: str) -> tuple[str, list[str]] | None:
        for name, root in self.roots.items():
            if path == root:
                return name, []
            if path.startswith(root + "/"):
                return name, path[len(root) + 1 :].split("/")
        return None

    def _abs(self, call: Syscall, table: dict[int, Fd], dirfd: str | None, arg: str) -> str:
        path = path_arg(arg, call)
        if not os.path.isabs(path):
            if dirfd is None:
                base = self.cwds[self.tid_table[call.tid]]
            else:
                fd, annotated = fd_arg(dirfd)
                base = annotated or (
                    self.cwds[self.tid_table[call.tid]] if fd == AT_FDCWD else table[fd].file.path
                )
            path = os.path.join(base, path)
        return os.path.normpath(path)

    def _entry(self, call: Syscall, path: str) -> tuple[str, int, str, int | None] | None:
        """``(tree, parent inode, name, inode or None)`` of a path inside a traced tree, else None."""
        loc = self._locate(path)
        if loc is None:
            return None
        tree_name, parts = loc
        if not parts:
            raise TraceError(f"{call.where()}: the traced directory {path} itself was changed")
        parent = self.trees[tree_name].lookup(parts[:-1])
        if parent is None or parent not in self.trees[tree_name].dirs:
            raise TraceError(f"{call.where()}: {path}'s directory is not in the replayed tree")
        return tree_name, parent, parts[-1], self.trees[tree_name].dirs[parent].get(parts[-1])

    def _emit(self, tree: str, op: Op) -> None:
        ops = self.recorded[tree].ops
        op.idx = len(ops)
        ops.append(op)
        self.trees[tree].apply(op)

    def _rel(self, tree: str, path: str) -> str:
        return os.path.relpath(path, self.roots[tree])

    def _file(self, call: Syscall, table: dict[int, Fd], arg: str) -> OpenFile | None:
        """The traced open file behind a descriptor argument (None when untraced), checked against ``-y``."""
        fd, annotated = fd_arg(arg)
        entry = table.get(fd)
        if entry is None:
            if annotated is not None and self._locate(annotated) is not None:
                raise TraceError(f"{call.where()}: descriptor {fd} on {annotated} was never seen opened")
            return None
        f = entry.file
        if f.root is not None and annotated is not None and not annotated.endswith(" (deleted)"):
            loc = self._locate(annotated)
            if loc is None or self.trees[loc[0]].lookup(loc[1]) != f.ino:
                raise TraceError(f"{call.where()}: descriptor {fd} diverged from {annotated}")
        return f if f.root is not None or f.path == self.marker_path else None

    def _unmodelled_output(self, call: Syscall, table: dict[int, Fd], arg: str) -> None:
        f = self._file(call, table, arg)
        if f is not None and f.root is not None:
            raise TraceError(f"{call.where()}: {call.name} into a traced file is not modelled")

    def on_copy_file_range(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._unmodelled_output(call, table, call.args[2])

    def on_sendfile(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._unmodelled_output(call, table, call.args[0])

    def on_splice(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._unmodelled_output(call, table, call.args[2])

    def on_mmap(self, call: Syscall, table: dict[int, Fd]) -> None:
        prot, flags, fd = (int(a, 0) for a in call.args[2:5])
        entry = table.get(fd if fd < 2**31 else fd - 2**32)
        if entry is not None and entry.file.root is not None and prot & PROT_WRITE and flags & MAP_SHARED:
            raise TraceError(f"{call.where()}: a writable shared mapping of a traced file is not modelled")

    # ---------------------------------------------------------------------------------- descriptors
    def on_close(self, call: Syscall, table: dict[int, Fd]) -> None:
        table.pop(fd_arg(call.args[0])[0], None)

    def _dup(self, table: dict[int, Fd], old: str, new: int | None, cloexec: bool) -> None:
        entry = table.get(fd_arg(old)[0])
        if entry is not None and new is not None:
            table[new] = Fd(entry.file, cloexec)

    def on_dup(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._dup(table, call.args[0], call.ret, False)

    def on_dup2(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._dup(table, call.args[0], call.ret, False)

    def on_dup3(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._dup(table, call.args[0], call.ret, bool(int_arg(call.args[2]) & os.O_CLOEXEC))

    def on_fcntl(self, call: Syscall, table: dict[int, Fd]) -> None:
        cmd = int_arg(call.args[1])
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
            self._dup(table, call.args[0], call.ret, cmd == F_DUPFD_CLOEXEC)
        elif cmd in (F_SETFD, F_SETFL) and (entry := table.get(fd_arg(call.args[0])[0])) is not None:
            if cmd == F_SETFD:
                entry.cloexec = bool(int_arg(call.args[2]) & 1)
            else:
                entry.file.append = bool(int_arg(call.args[2]) & os.O_APPEND)

    # ------------------------------------------------------------------------------------ processes
    def on_clone(self, call: Syscall, table: dict[int, Fd]) -> None:
        flags = clone_flags(call) if call.name != "fork" and call.name != "vfork" else 0
        self.announced.pop(call.tid, None)
        if call.ret and call.ret not in self.tid_table:
            self._adopt(call.ret, call.tid, flags)

    on_clone3 = on_fork = on_vfork = on_clone

    def on_execve(self, call: Syscall, table: dict[int, Fd]) -> None:
        for fd in [fd for fd, e in table.items() if e.cloexec]:
            del table[fd]

    def on_chdir(self, call: Syscall, table: dict[int, Fd]) -> None:
        self.cwds[self.tid_table[call.tid]] = self._abs(call, table, None, call.args[0])

    def on_fchdir(self, call: Syscall, table: dict[int, Fd]) -> None:
        entry = table.get(fd_arg(call.args[0])[0])
        if entry is not None:
            self.cwds[self.tid_table[call.tid]] = entry.file.path
