"""Persistence models: which of the recorded ops a power cut at a given point may leave on disk.

A crash at point ``p`` (the first ``p`` ops of a tree's list were issued, the rest never were) leaves the
initial tree plus a subset of ``ops[:p]``, applied in their recorded order (:meth:`.tree.Tree.apply`). A model
says which of those ops are *durable* at ``p`` (on disk in every state) and how the other, *pending* ones may
combine; :meth:`Model.states` returns each allowed combination as the set of ops it loses.

Both models assume:

* ``rename``/``renameat2`` (with or without ``RENAME_EXCHANGE``) is atomic: after a crash the entry names the
  old inode or the new one, never neither, and an exchange never shows half a swap. (ext4, XFS and btrfs
  journal a rename as one transaction.) A rename can still be *lost* as a whole: not on disk yet.
* Every other namespace op (create, mkdir, link, unlink, rmdir) is atomic too.
* A write may be torn: it reaches the disk as pieces split at 4 KiB-aligned file offsets, each kept or lost.
  A lost piece leaves the old bytes, or zeros where the file had not reached yet; no garbage, no flipped
  bits (checksums catch those, and other tests cover them).
* ``sync_file_range`` is not a barrier (it flushes neither metadata nor the disk's cache); ``sync`` and
  ``syncfs`` are barriers for everything before them.

**(a) ordered** -- ext4 ``data=ordered`` with delayed allocation, as its journal behaves:

* Metadata (every namespace op, and truncation) goes through one journal in the order issued: a crash keeps a
  *prefix* of the metadata ops.
* ``fsync``/``fdatasync`` of an inode X commits the transaction that holds X's last metadata change: every
  metadata op up to the last one that touched X (created, linked, unlinked, renamed or truncated X, or
  changed an entry of directory X) is durable, and so is X's data. A real commit may include more; assuming
  the least is the stricter test.
* File data is not journaled: a file's unsynced writes reach the disk in the order issued, as a *prefix* of
  their 4 KiB pieces, and (data=ordered) a file never shows a size its data did not reach: a lost suffix
  shortens it. Data and metadata are not ordered against each other: a rename may be on disk while the
  renamed file's data is not (the zero-length-file window that ext4's ``auto_da_alloc`` narrows for renames
  over an existing file; we do not count on it).

**(b) weak** -- the POSIX minimum, as the issue defines it:

* Each op belongs to the objects whose fsync covers it: a write or truncation to its file; a namespace op to
  its directory (a rename or exchange to both directories).
* fsync/fdatasync of a file covers its data and its own metadata (its size), not its name; fsync of a
  directory covers its entries, not the files they name. An op is durable once an fsync of every one of its
  objects (or a sync) has followed it.
* Until then any subset of the pending ops may be lost, in any combination and so in any order: a new file's
  name survives only its directory's fsync, a renamed file's bytes only its own fsync, a directory made with
  ``mkdir`` only its parent's fsync.

When a crash point allows more combinations than the cap, :meth:`Model.states` returns the structured ones
(nothing lost, everything lost, each single op lost, each single op kept) and then random ones from the given
``random.Random``, so a run is reproduced from its printed seed.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import defaultdict
from collections.abc import Sequence

from .tree import FILE_KINDS, INERT_KINDS, METADATA_KINDS, Op

Lost = frozenset[int]
NEVER = 2**62


class Model:
    """Base: :meth:`pending` and :meth:`states` for the ops of one tree."""

    name = ""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = ops

    def states(self, p: int, rng: random.Random, cap: int) -> tuple[list[Lost], int]:
        """Lost-op sets allowed at crash point ``p``, at most ``cap`` of them, and how many there are in all."""
        raise NotImplementedError

    def durable(self, p: int, idx: int) -> bool:
        """Whether op ``idx`` is on disk in every state a crash at ``p`` can leave."""
        raise NotImplementedError


def _first_after(positions: list[int], idx: int) -> int:
    i = bisect.bisect_right(positions, idx)
    return positions[i] if i < len(positions) else NEVER


def _sample(choices: list[list[Lost]], rng: random.Random, cap: int) -> tuple[list[Lost], int]:
    """Combine independent dimensions (each a list of lost-sets; the first loses least) into whole states."""
    total = math.prod(len(c) for c in choices)
    if total <= cap:
        return [frozenset().union(*combo) for combo in itertools.product(*choices)], total
    firsts = [c[0] for c in choices]
    lasts = [c[-1] for c in choices]
    out: list[Lost] = [frozenset().union(*firsts), frozenset().union(*lasts)]
    for d, dim in enumerate(choices):
        # One dimension moved (one step, or all the way), the rest keeping everything; and one dimension
        # keeping everything while the rest lose all they can.
        for pick in dict.fromkeys((dim[1], dim[-1])) if len(dim) > 1 else ():
            out.append(frozenset().union(*firsts[:d], pick, *firsts[d + 1 :]))
        out.append(frozenset().union(*lasts[:d], dim[0], *lasts[d + 1 :]))
    out = list(dict.fromkeys(out))[:cap]
    seen = set(out)
    for _ in range(cap * 20):
        if len(out) >= cap:
            break
        lost = frozenset().union(*(rng.choice(c) for c in choices))
        if lost not in seen:
            seen.add(lost)
            out.append(lost)
    return out, total


class Weak(Model):
    """(b): any subset of the pending ops of each object may be lost (see the module doc)."""

    name = "weak"

    def __init__(self, ops: Sequence[Op]) -> None:
        super().__init__(ops)
        fsyncs: dict[int, list[int]] = defaultdict(list)
        syncs = [op.idx for op in ops if op.kind == "sync"]
        for op in ops:
            if op.kind == "fsync":
                fsyncs[op.ino].append(op.idx)
        self.durable_after: list[int] = []
        for op in ops:
            if op.kind in INERT_KINDS:
                self.durable_after.append(-1)
                continue
            cover = max(_first_after(fsyncs[o], op.idx) for o in _objects(op))
            self.durable_after.append(min(cover, _first_after(syncs, op.idx)))

    def durable(self, p: int, idx: int) -> bool:
        return self.durable_after[idx] < p

    def pending(self, p: int) -> list[int]:
        return [i for i in range(p) if self.durable_after[i] >= p]

    def states(self, p: int, rng: random.Random, cap: int) -> tuple[list[Lost], int]:
        return _sample([[frozenset(), frozenset({i})] for i in self.pending(p)], rng, cap)


def _objects(op: Op) -> set[int]:
    if op.kind in FILE_KINDS:
        return {op.ino}
    if op.kind in ("rename", "exchange"):
        return {op.dir, op.dir2}
    return {op.dir}


def _touches(op: Op) -> set[int]:
    if op.kind == "trunc":
        return {op.ino}
    return {op.ino, op.dir, op.dir2, op.ino2} - {-1}


class Ordered(Model):
    """(a): a prefix of the metadata journal, and a prefix of each file's unsynced data (see the module doc)."""

    name = "ordered"

    def __init__(self, ops: Sequence[Op]) -> None:
        super().__init__(ops)
        self.meta = [op.idx for op in ops if op.kind in METADATA_KINDS]
        last_touch: dict[int, int] = {}
        self.meta_durable_upto: list[int] = []  # after op idx, every metadata op <= this value is durable
        self.data_barrier: dict[int, list[int]] = defaultdict(list)  # ino -> fsync/sync positions
        self.writes: dict[int, list[int]] = defaultdict(list)
        syncs: list[int] = []
        upto = -1
        for op in ops:
            if op.kind in METADATA_KINDS:
                for ino in _touches(op):
                    last_touch[ino] = op.idx
            elif op.kind == "write":
                self.writes[op.ino].append(op.idx)
            elif op.kind == "fsync":
                upto = max(upto, last_touch.get(op.ino, -1))
                self.data_barrier[op.ino].append(op.idx)
            elif op.kind == "sync":
                upto = op.idx
                syncs.append(op.idx)
            self.meta_durable_upto.append(upto)
        for ino in self.writes:
            self.data_barrier[ino] = sorted(self.data_barrier[ino] + syncs)

    def _last_data_barrier(self, ino: int, p: int) -> int:
        positions = self.data_barrier.get(ino, [])
        i = bisect.bisect_left(positions, p)
        return positions[i - 1] if i else -1

    def durable(self, p: int, idx: int) -> bool:
        op = self.ops[idx]
        if op.kind in METADATA_KINDS:
            return p > 0 and idx <= self.meta_durable_upto[p - 1]
        if op.kind == "write":
            return idx < self._last_data_barrier(op.ino, p)
        return True

    def states(self, p: int, rng: random.Random, cap: int) -> tuple[list[Lost], int]:
        upto = self.meta_durable_upto[p - 1] if p else -1
        meta = [i for i in self.meta if upto < i < p]
        dims = [[frozenset(meta[c:]) for c in range(len(meta), -1, -1)]]
        for ino, writes in self.writes.items():
            barrier = self._last_data_barrier(ino, p)
            pend = [i for i in writes if barrier < i < p]
            if pend:
                dims.append([frozenset(pend[c:]) for c in range(len(pend), -1, -1)])
        return _sample(dims, rng, cap)
