"""File-system operations on inodes, and an in-memory directory tree they apply to.

An :class:`Op` is one effect a system call had on a traced directory tree, expressed on inodes rather than
paths, so that it means the same thing whatever else did or did not reach the disk before it: "entry ``x`` of
directory 7 now names inode 12", "bytes 4096..8191 of inode 12 are these". A crash state is the initial tree
with a subset of the recorded ops applied in their recorded order (:mod:`.persistence` says which subsets),
and :meth:`Tree.materialize` writes it out as a real directory for the library to open.

Application is deliberately literal, so that a persistence model's freedom shows up in the result: a write
that persisted without the writes before it leaves zeros in between (a hole); a rename that persisted without
the creation of its source still puts the inode under the new name; an ``unlink`` removes the entry of that
name, whatever inode the entry holds in this state.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

#: Ops that change a directory's entries.
ENTRY_KINDS = frozenset({"create", "mkdir", "link", "unlink", "rmdir", "rename", "exchange"})
#: Ops that change a file's bytes or size.
FILE_KINDS = frozenset({"write", "trunc"})
#: Journaled metadata in the ordered model: every entry op, and truncation (a write's size growth is data).
METADATA_KINDS = ENTRY_KINDS | {"trunc"}
#: No effect on the tree: barriers and the workload's markers.
INERT_KINDS = frozenset({"fsync", "sync", "mark"})

#: The tear granularity: a write may reach the disk in pieces of this alignment (a page / block).
BLOCK = 4096


@dataclass
class Op:
    """One recorded effect on a traced tree (see the module doc).

    ``ino`` is the inode changed (write, trunc, fsync) or named (entry ops); ``dir``/``name`` the entry, and
    ``dir2``/``name2`` a rename's or exchange's destination. ``ino2`` is the inode an entry op displaced (a
    rename's replaced target) or, for an exchange, the inode that moves the other way.
    """

    kind: str
    ino: int = -1
    dir: int = -1
    name: str = ""
    dir2: int = -1
    name2: str = ""
    ino2: int = -1
    offset: int = 0
    data: bytes = b""
    size: int = 0
    line: int = 0
    note: str = ""
    payload: dict[str, Any] | None = None
    idx: int = -1

    def describe(self) -> str:
        return f"#{self.idx} {self.kind} {self.note} (trace line {self.line})"


def write_pieces(ino: int, offset: int, data: bytes, line: int, note: str) -> list[Op]:
    """A write split at :data:`BLOCK`-aligned file offsets: the pieces a power cut may keep separately."""
    pieces, pos, end = [], offset, offset + len(data)
    while pos < end:
        stop = min(end, (pos // BLOCK + 1) * BLOCK)
        chunk = data[pos - offset : stop - offset]
        pieces.append(Op("write", ino, offset=pos, data=chunk, line=line, note=f"{note} [{pos}:{stop}]"))
        pos = stop
    return pieces


@dataclass
class Tree:
    """Directories (inode -> {name: inode}) and files (inode -> bytes) reachable from ``root``."""

    root: int
    dirs: dict[int, dict[str, int]] = field(default_factory=dict)
    files: dict[int, bytearray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dirs.setdefault(self.root, {})

    def copy(self) -> Tree:
        return Tree(
            self.root,
            {d: dict(e) for d, e in self.dirs.items()},
            {i: bytearray(b) for i, b in self.files.items()},
        )

    # ------------------------------------------------------------------------------------- lookups
    def lookup(self, parts: list[str]) -> int | None:
        ino: int | None = self.root
        for part in parts:
            entries = self.dirs.get(ino) if ino is not None else None
            if entries is None:
                return None
            ino = entries.get(part)
        return ino

    def size(self, ino: int) -> int:
        return len(self.files.get(ino, b""))

    # ------------------------------------------------------------------------------------ applying
    def _file(self, ino: int) -> bytearray:
        return self.files.setdefault(ino, bytearray())

    def apply(self, op: Op) -> None:
        kind = op.kind
        if kind in ("create", "link"):
            if op.ino not in self.dirs:
                self._file(op.ino)
            self.dirs.setdefault(op.dir, {})[op.name] = op.ino
        elif kind == "mkdir":
            self.dirs.setdefault(op.ino, {})
            self.dirs.setdefault(op.dir, {})[op.name] = op.ino
        elif kind in ("unlink", "rmdir"):
            self.dirs.setdefault(op.dir, {}).pop(op.name, None)
        elif kind == "rename":
            self.dirs.setdefault(op.dir, {}).pop(op.name, None)
            if op.ino not in self.dirs:
                self._file(op.ino)
            self.dirs.setdefault(op.dir2, {})[op.name2] = op.ino
        elif kind == "exchange":
            self.dirs.setdefault(op.dir, {})[op.name] = op.ino2
            self.dirs.setdefault(op.dir2, {})[op.name2] = op.ino
        elif kind == "write":
            buf = self._file(op.ino)
            if len(buf) < op.offset:
                buf.extend(bytes(op.offset - len(buf)))
            buf[op.offset : op.offset + len(op.data)] = op.data
        elif kind == "trunc":
            buf = self._file(op.ino)
            if op.size < len(buf):
                del buf[op.size :]
            else:
                buf.extend(bytes(op.size - len(buf)))
        elif kind not in INERT_KINDS:
            raise ValueError(f"unknown op kind {kind!r}")

    # -------------------------------------------------------------------------------- reading out
    def walk(self) -> list[tuple[str, int, bool]]:
        """``(relative path, inode, is_dir)`` of everything reachable, parents first, names sorted.

        A directory reachable twice (only possible in a mix of renames no real run made) is listed once.
        """
        out: list[tuple[str, int, bool]] = []
        seen = {self.root}
        stack = [("", self.root)]
        while stack:
            prefix, d = stack.pop()
            for name in sorted(self.dirs.get(d, {}), reverse=True):
                ino = self.dirs[d][name]
                path = f"{prefix}{name}"
                if ino in self.dirs:
                    if ino in seen:
                        continue
                    seen.add(ino)
                    stack.append((path + "/", ino))
                out.append((path, ino, ino in self.dirs))
        return sorted(out)

    def digest(self) -> str:
        h = hashlib.sha256()
        for path, ino, is_dir in self.walk():
            h.update(path.encode() + (b"/\0" if is_dir else b"\0"))
            if not is_dir:
                h.update(hashlib.sha256(self.files.get(ino, b"")).digest())
        return h.hexdigest()

    def materialize(self, target: str) -> None:
        """Write the tree out under the new directory ``target`` (hard links stay hard links)."""
        os.makedirs(target)
        written: dict[int, str] = {}
        for path, ino, is_dir in self.walk():
            full = os.path.join(target, *path.split("/"))
            if is_dir:
                os.mkdir(full)
            elif ino in written:
                os.link(written[ino], full)
            else:
                with open(full, "wb") as f:
                    f.write(self.files.get(ino, b""))
                written[ino] = full


def load_tree(path: str, root: int, next_ino: int) -> tuple[Tree, dict[int, int], int]:
    """The tree under the real directory ``path`` with fresh inode numbers from ``next_ino``.

    Returns the tree, the map of real ``st_ino`` to ours (hard links share one), and the next free number.
    """
    tree = Tree(root)
    real: dict[int, int] = {os.stat(path).st_ino: root}
    stack = [(path, root)]
    while stack:
        current, d = stack.pop()
        for entry in sorted(os.scandir(current), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            if entry.is_symlink():
                raise ValueError(f"{entry.path}: symbolic links are not modelled")
            ino = real.get(st.st_ino)
            if ino is None:
                ino = real[st.st_ino] = next_ino
                next_ino += 1
                if entry.is_dir():
                    tree.dirs[ino] = {}
                    stack.append((entry.path, ino))
                else:
                    with open(entry.path, "rb") as f:
                        tree.files[ino] = bytearray(f.read())
            tree.dirs[d][entry.name] = ino
    return tree, real, next_ino
