"""Replay a syscall record into the :class:`~.tree.Op` list of each traced directory.

The replayer keeps what the kernel kept (:mod:`.fdtable`: descriptor tables, open file descriptions, the
current tree of every traced directory), so that a path or a descriptor in a call resolves to the inode it
named at that moment. A write lands where the kernel put it: at the description's offset (moved by
``lseek`` and by the writes themselves), at the end of the file under ``O_APPEND``, at the given offset for
``pwrite``. ``O_TRUNC`` on an existing non-empty file is a truncation;
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

from .fdtable import Fd, OpenFile, Recorded, ReplayerBase
from .strace import Syscall, TraceError, fd_arg, int_arg, iovec_arg, string_arg
from .tree import Op, write_pieces

AT_REMOVEDIR = 0x200
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

__all__ = ["Recorded", "Replayer"]


class Replayer(ReplayerBase):
    """Feed it :class:`~.strace.Syscall` records in order; read :attr:`recorded` at the end.

    Args:
        roots: tree name -> real directory (it exists and holds the initial state when tracing starts).
        marker_path: the file the workload writes its markers to.
        cwd: the traced process's working directory.
    """

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
