"""Replay a syscall record into the :class:`~.tree.Op` list of each traced directory.

The replayer keeps what the kernel kept: a descriptor table per process (threads share theirs; a fork copies
it; ``execve`` closes the close-on-exec descriptors), an open file description per ``open`` (shared by
``dup``s, with its own offset and ``O_APPEND``), and the full current tree of every traced directory, so that a
path in a call resolves to the inode it named at that moment. A write lands where the kernel put it: at the
description's offset (moved by ``lseek`` and by the writes themselves), at the end of the file under
``O_APPEND``, at the given offset for ``pwrite``. ``O_TRUNC`` on an existing non-empty file is a truncation;
``O_SYNC``/``O_DSYNC`` writes are followed by an implicit fsync; ``sync``/``syncfs`` are barriers on everything.

Anything it cannot model faithfully in a traced tree raises :class:`~.strace.TraceError` rather than being
guessed at: a writable shared ``mmap``, ``copy_file_range``/``sendfile``/``splice`` into a traced file, a
symlink, ``O_TMPFILE``, a rename from outside into a traced tree, ``write`` on a read-write descriptor.

Markers: the workload writes one JSON line per event to a marker file outside the traced trees
(``{"w": <tree name>, "event": ..., ...}``); each becomes a ``mark`` op in that tree's list, at its place
in the order of calls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .strace import Syscall, TraceError, clone_flags, fd_arg, int_arg, iovec_arg, path_arg, string_arg
from .tree import Op, Tree, load_tree, write_pieces

AT_FDCWD = -100
CLONE_FILES = 0x400
AT_REMOVEDIR = 0x200
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
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


class Replayer:
    """Feed it :class:`~.strace.Syscall` records in order; read :attr:`recorded` at the end.

    Args:
        roots: tree name -> real directory (it exists and holds the initial state when tracing starts).
        marker_path: the file the workload writes its markers to.
        cwd: the traced process's working directory.
    """

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
        # A child recorded before its parent's clone returned: the announcement says what it shares.
        if len(self.announced) != 1:
            raise TraceError(f"thread {tid} appeared while {len(self.announced)} forks were in flight")
        parent, flags = next(iter(self.announced.items()))
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

    # ------------------------------------------------------------------------------- opening files
    def on_open(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._open(call, table, None, call.args[0], int_arg(call.args[1]))

    def on_openat(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._open(call, table, call.args[0], call.args[1], int_arg(call.args[2]))

    def on_creat(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._open(call, table, None, call.args[0], os.O_CREAT | os.O_WRONLY | os.O_TRUNC)

    def _open(self, call: Syscall, table: dict[int, Fd], dirfd: str | None, arg: str, flags: int) -> None:
        assert call.ret is not None
        path = os.path.normpath(call.ret_path) if call.ret_path else self._abs(call, table, dirfd, arg)
        access = flags & os.O_ACCMODE
        file = OpenFile(None, -1, path, writable=access != os.O_RDONLY, rdwr=access == os.O_RDWR)
        file.append, file.sync = bool(flags & os.O_APPEND), bool(flags & (os.O_SYNC | os.O_DSYNC))
        loc = self._locate(path)
        if loc is not None:
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise TraceError(f"{call.where()}: O_TMPFILE in a traced directory is not modelled")
            tree = self.trees[loc[0]]
            ino = tree.lookup(loc[1])
            if ino is None:
                found = self._entry(call, path)
                assert found is not None
                if not flags & os.O_CREAT:
                    raise TraceError(f"{call.where()}: opened {path}, which the replayed tree lacks")
                ino = self.next_ino
                self.next_ino += 1
                self._emit(
                    loc[0],
                    Op("create", ino, found[1], found[2], line=call.line, note=self._rel(loc[0], path)),
                )
            elif flags & os.O_TRUNC and file.writable and tree.size(ino) > 0:
                self._emit(
                    loc[0],
                    Op("trunc", ino, size=0, line=call.line, note=f"O_TRUNC {self._rel(loc[0], path)}"),
                )
            file.root, file.ino, file.is_dir = loc[0], ino, ino in tree.dirs
        table[call.ret] = Fd(file, bool(flags & os.O_CLOEXEC))

    # ------------------------------------------------------------------------------------- writing
    def _write(self, call: Syscall, f: OpenFile, data: bytes, offset: int | None) -> None:
        if f.root is None:  # the marker file
            for line in data.decode().splitlines():
                payload = json.loads(line)
                self._emit(payload["w"], Op("mark", line=call.line, note=payload["event"], payload=payload))
            return
        if f.is_dir:
            raise TraceError(f"{call.where()}: a write to a directory")
        if offset is None:
            if f.rdwr and not f.append:
                raise TraceError(f"{call.where()}: write() on a read-write descriptor (reads are not traced)")
            offset = self.trees[f.root].size(f.ino) if f.append else f.offset
            f.offset = offset + len(data)
        note = f"{self._rel(f.root, f.path)}"
        for piece in write_pieces(f.ino, offset, data, call.line, note):
            self._emit(f.root, piece)
        if f.sync:
            self._emit(f.root, Op("fsync", f.ino, line=call.line, note=f"O_SYNC {note}"))

    def on_write(self, call: Syscall, table: dict[int, Fd]) -> None:
        if (f := self._file(call, table, call.args[0])) is not None and call.ret:
            self._write(call, f, string_arg(call.args[1], call)[: call.ret], None)

    def on_pwrite(self, call: Syscall, table: dict[int, Fd]) -> None:
        if (f := self._file(call, table, call.args[0])) is not None and call.ret:
            self._write(call, f, string_arg(call.args[1], call)[: call.ret], int_arg(call.args[3]))

    def on_writev(self, call: Syscall, table: dict[int, Fd]) -> None:
        if (f := self._file(call, table, call.args[0])) is not None and call.ret:
            self._write(call, f, iovec_arg(call.args[1], call)[: call.ret], None)

    def on_pwritev(self, call: Syscall, table: dict[int, Fd]) -> None:
        if (f := self._file(call, table, call.args[0])) is not None and call.ret:
            self._write(call, f, iovec_arg(call.args[1], call)[: call.ret], int_arg(call.args[3]))

    on_pwritev2 = on_pwritev

    def on_lseek(self, call: Syscall, table: dict[int, Fd]) -> None:
        if (entry := table.get(fd_arg(call.args[0])[0])) is not None and call.ret is not None:
            entry.file.offset = call.ret

    def _truncate(self, call: Syscall, f: OpenFile | None, size: int) -> None:
        if f is not None and f.root is not None:
            self._emit(f.root, Op("trunc", f.ino, size=size, line=call.line, note=self._rel(f.root, f.path)))

    def on_ftruncate(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._truncate(call, self._file(call, table, call.args[0]), int_arg(call.args[1]))

    def on_truncate(self, call: Syscall, table: dict[int, Fd]) -> None:
        found = self._entry(call, self._abs(call, table, None, call.args[0]))
        if found is not None and found[3] is not None:
            f = OpenFile(found[0], found[3], self._abs(call, table, None, call.args[0]))
            self._truncate(call, f, int_arg(call.args[1]))

    def on_fallocate(self, call: Syscall, table: dict[int, Fd]) -> None:
        f = self._file(call, table, call.args[0])
        if f is None or f.root is None:
            return
        mode, end = int_arg(call.args[1]), int_arg(call.args[2]) + int_arg(call.args[3])
        if mode != 0:
            raise TraceError(f"{call.where()}: fallocate mode {mode:#x} is not modelled")
        if end > self.trees[f.root].size(f.ino):
            self._truncate(call, f, end)

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

    # ------------------------------------------------------------------------------------- barriers
    def on_fsync(self, call: Syscall, table: dict[int, Fd]) -> None:
        f = self._file(call, table, call.args[0])
        if f is not None and f.root is not None:
            self._emit(
                f.root, Op("fsync", f.ino, line=call.line, note=f"{call.name} {self._rel(f.root, f.path)}")
            )

    on_fdatasync = on_fsync

    def on_sync(self, call: Syscall, table: dict[int, Fd]) -> None:
        for tree in self.trees:
            self._emit(tree, Op("sync", line=call.line, note=call.name))

    on_syncfs = on_sync

    # ---------------------------------------------------------------------------------- namespace
    def on_mkdir(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._mkdir(call, self._abs(call, table, None, call.args[0]))

    def on_mkdirat(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._mkdir(call, self._abs(call, table, call.args[0], call.args[1]))

    def _mkdir(self, call: Syscall, path: str) -> None:
        found = self._entry(call, path)
        if found is not None:
            ino, self.next_ino = self.next_ino, self.next_ino + 1
            self._emit(
                found[0], Op("mkdir", ino, found[1], found[2], line=call.line, note=self._rel(found[0], path))
            )

    def on_unlink(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._remove(call, self._abs(call, table, None, call.args[0]), "unlink")

    def on_rmdir(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._remove(call, self._abs(call, table, None, call.args[0]), "rmdir")

    def on_unlinkat(self, call: Syscall, table: dict[int, Fd]) -> None:
        kind = "rmdir" if int_arg(call.args[2]) & AT_REMOVEDIR else "unlink"
        self._remove(call, self._abs(call, table, call.args[0], call.args[1]), kind)

    def _remove(self, call: Syscall, path: str, kind: str) -> None:
        found = self._entry(call, path)
        if found is not None:
            tree, parent, name, ino = found
            if ino is None:
                raise TraceError(f"{call.where()}: removed {path}, which the replayed tree lacks")
            self._emit(tree, Op(kind, ino, parent, name, line=call.line, note=self._rel(tree, path)))

    def on_rename(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._rename(
            call, self._abs(call, table, None, call.args[0]), self._abs(call, table, None, call.args[1]), 0
        )

    def on_renameat(self, call: Syscall, table: dict[int, Fd]) -> None:
        a, b = call.args[0:2], call.args[2:4]
        self._rename(call, self._abs(call, table, *a), self._abs(call, table, *b), 0)

    def on_renameat2(self, call: Syscall, table: dict[int, Fd]) -> None:
        a, b = call.args[0:2], call.args[2:4]
        self._rename(call, self._abs(call, table, *a), self._abs(call, table, *b), int_arg(call.args[4]))

    def _rename(self, call: Syscall, old: str, new: str, flags: int) -> None:
        src, dst = self._entry(call, old), self._entry(call, new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise TraceError(f"{call.where()}: rename flags {flags:#x} are not modelled")
        if src is None and dst is None:
            return
        if src is None:
            raise TraceError(f"{call.where()}: {new} was renamed in from outside the traced tree")
        if dst is None:  # moved out of the traced tree: for the tree, a removal
            self._remove(call, old, "rmdir" if src[3] in self.trees[src[0]].dirs else "unlink")
            return
        if src[0] != dst[0]:
            raise TraceError(f"{call.where()}: a rename between two traced trees")
        tree, ino = src[0], src[3]
        if ino is None:
            raise TraceError(f"{call.where()}: renamed {old}, which the replayed tree lacks")
        note = f"{self._rel(tree, old)} -> {self._rel(tree, new)}"
        if flags & RENAME_EXCHANGE:
            assert dst[3] is not None
            self._emit(
                tree, Op("exchange", ino, src[1], src[2], dst[1], dst[2], dst[3], line=call.line, note=note)
            )
        elif ino != dst[3]:  # renaming a hard link onto another link of the same inode does nothing
            self._emit(
                tree,
                Op(
                    "rename",
                    ino,
                    src[1],
                    src[2],
                    dst[1],
                    dst[2],
                    dst[3] if dst[3] is not None else -1,
                    line=call.line,
                    note=note,
                ),
            )

    def on_link(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._link(
            call, self._abs(call, table, None, call.args[0]), self._abs(call, table, None, call.args[1])
        )

    def on_linkat(self, call: Syscall, table: dict[int, Fd]) -> None:
        self._link(call, self._abs(call, table, *call.args[0:2]), self._abs(call, table, *call.args[2:4]))

    def _link(self, call: Syscall, old: str, new: str) -> None:
        src, dst = self._entry(call, old), self._entry(call, new)
        if dst is None:
            return
        if src is None or src[0] != dst[0] or src[3] is None:
            raise TraceError(f"{call.where()}: {new} was linked to a file outside its traced tree")
        note = f"{self._rel(dst[0], old)} => {self._rel(dst[0], new)}"
        self._emit(dst[0], Op("link", src[3], dst[1], dst[2], line=call.line, note=note))

    def on_symlink(self, call: Syscall, table: dict[int, Fd]) -> None:
        if self._locate(self._abs(call, table, None, call.args[1])) is not None:
            raise TraceError(f"{call.where()}: symbolic links in a traced tree are not modelled")

    def on_symlinkat(self, call: Syscall, table: dict[int, Fd]) -> None:
        if self._locate(self._abs(call, table, call.args[1], call.args[2])) is not None:
            raise TraceError(f"{call.where()}: symbolic links in a traced tree are not modelled")

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
