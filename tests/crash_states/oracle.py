"""What a crash state must look like, from the trace's knowledge of which calls had returned; and the check.

**Views.** At every marker and after every namespace op on a checkpoint name, the explorer writes out the
full state of the trace at that moment (nothing lost: what a killed process leaves) and reads it through the
public surface, like a user inspecting the directory then: :func:`view` lists each checkpoint with a digest of
its bytes (a directory's: of its files), its step and whether resume may use it.

**Expectations.** A crash at point ``p`` falls after the ``j``-th ``returned`` marker and before the next one:
the calls up to marker ``j`` returned, the next one was in flight. :class:`Expectation` of interval ``j``:

* a checkpoint listed at marker ``j`` and in every view until marker ``j + 1`` was committed by a call that
  returned, and nothing in flight removes it: it is *required*, with one of the digests those views show;
* whatever any view of the interval lists is *allowed*, with the digests it had there (old or new content of
  a replacement in flight, a deletion in flight, a commit not yet returned);
* resume must reach at least the least progress any view of the interval offers (the newest step).

The library documents a save as durable when it returns (temp file, fsync, rename, directory fsync), so a
commit that returned counts as committed *and* durable: the persistence models decide what may be lost, and a
returned commit that a model can lose is a window, reported as ``committed-lost``.

**The check** (:func:`judge`) opens the crash state as a user and the next run would, through
:mod:`.surface` only, and reports each broken invariant as a :class:`Violation`:

``cli-verify`` / ``inspection-wrote``: ``genesis-ckpt verify`` of the crashed directory fails, or writes.
``start-failed``: the next run's start raised. ``listed-invalid``: a listed checkpoint does not verify or
load. ``listed-unknown``: a listed checkpoint holds bytes no view showed under its name (a mix, a torn file).
``committed-lost``: a required checkpoint is missing. ``resume-regressed`` / ``resume-not-newest``: resume
would lose progress, or skip a newer valid checkpoint. ``temp-survived``, ``half-deleted-survived``,
``uncommitted-survived``: after the start, a temp file, a checkpoint the manifest had forgotten, or another
file of ours is still there. ``foreign-touched``: a user's file is changed or gone. ``genesis-*``: the Genesis
API's own (``genesis.load`` must give the old or the new version; the next ``genesis.save`` must succeed and
leave no backup).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import surface
from .workloads import Workload


@dataclass(frozen=True)
class Entry:
    """One listed checkpoint: a digest of its content, its step, whether resume may choose it."""

    digest: str
    step: int | None = None
    resumable: bool = False


View = dict[str, Entry]


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: str

    @property
    def is_note(self) -> bool:
        return self.kind.startswith("note-")

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class Expectation:
    """What any crash state of one interval between two returned calls must satisfy (see the module doc)."""

    after: str
    during: str
    required: dict[str, set[str]] = field(default_factory=dict)
    allowed: dict[str, set[str]] = field(default_factory=dict)
    min_step: int | None = None
    listed_before: set[str] = field(default_factory=set)
    foreign: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, views: Sequence[View], after: str, during: str) -> Expectation:
        exp = cls(after, during)
        for name in views[0]:
            if all(name in v for v in views):
                exp.required[name] = {v[name].digest for v in views}
        for v in views:
            for name, entry in v.items():
                exp.allowed.setdefault(name, set()).add(entry.digest)
        tops = [max((e.step or 0 for e in v.values() if e.resumable), default=None) for v in views]
        exp.min_step = None if None in tops else min(t for t in tops if t is not None)
        return exp


def content_digest(path: str) -> str:
    """sha256 of a file, or of a directory's sorted listing of (relative path, sha256); ``missing``."""
    if not os.path.exists(path):
        return "missing"
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    h = hashlib.sha256()
    for current, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(current, name)
            h.update(os.path.relpath(full, path).encode() + b"\0" + content_digest(full).encode())
    return h.hexdigest()


def view(workload: Workload, state_root: Path) -> View:
    """The checkpoints a reader lists in ``state_root`` (a full state: nothing lost)."""
    directory = state_root / workload.dirpath
    with surface.captured_logs():
        if workload.kind == "genesis":
            path = directory / workload.file
            return {workload.file: Entry(_version(surface.genesis_load(str(path))))} if path.exists() else {}
        if not directory.is_dir():
            return {}
        reader = surface.StoreReader(str(directory), verbose=False)
        return {
            r.name: Entry(
                content_digest(str(directory / r.name)), r.global_step, r.role in surface.RESUMABLE_ROLES
            )
            for r in reader.records()
        }


def _version(obj: Any) -> str:
    return f"version {obj['version']}, weights {float(obj['weights'][0])}"


Choice = tuple[str, int] | None  # what resume chose: its name and epoch


def judge(workload: Workload, state_root: Path, exp: Expectation) -> tuple[list[Violation], Choice]:
    """Every broken invariant of one crash state, and what resume chose (for the Trainer sample)."""
    out: list[Violation] = []
    with surface.captured_logs():
        if workload.kind == "genesis":
            _judge_genesis(workload, state_root, exp, out)
            chosen = None
        else:
            chosen = _judge_store(workload, state_root, exp, out)
        for rel, data in exp.foreign.items():
            path = state_root / rel
            if not path.is_file() or path.read_bytes() != data:
                out.append(Violation("foreign-touched", f"the user's file {rel} was changed or removed"))
    return out, chosen


def _tree_digest(root: Path) -> str:
    return content_digest(str(root)) if root.exists() else "-"


def _judge_store(workload: Workload, state_root: Path, exp: Expectation, out: list[Violation]) -> Choice:
    directory = state_root / workload.dirpath
    if directory.is_dir():
        before = _tree_digest(state_root)
        code, text = surface.cli_verify(str(directory))
        if code != 0:
            out.append(Violation("cli-verify", f"genesis-ckpt verify exits {code}: {text.strip()[-300:]}"))
        if _tree_digest(state_root) != before:
            out.append(Violation("inspection-wrote", "genesis-ckpt verify changed the directory"))
    try:
        store = surface.open_next_run(str(directory))
    except Exception as e:
        out.append(Violation("start-failed", f"{type(e).__name__}: {e}"))
        return None
    try:
        return _check_started(workload, store, directory, exp, out)
    finally:
        store.release_lock()


def _check_started(
    workload: Workload, store: Any, directory: Path, exp: Expectation, out: list[Violation]
) -> Choice:
    listed: dict[str, Any] = {}
    for record in store.records():
        try:
            surface.load_payload(store, record.name, record.is_directory)
        except (surface.GenesisCheckpointError, OSError) as e:
            out.append(Violation("listed-invalid", f"{record.name} is listed but does not load: {e}"))
            continue
        digest = content_digest(str(directory / record.name))
        if digest not in exp.allowed.get(record.name, ()):
            out.append(Violation("listed-unknown", f"{record.name} is listed with content no commit wrote"))
            continue
        listed[record.name] = record
    ours = {r.name for r in store.records()} | {surface.MANIFEST_NAME, surface.LOCK_NAME}
    for name in sorted(exp.required):
        if name not in listed and name not in ours:
            out.append(
                Violation("committed-lost", f"{name} (committed before '{exp.after}' returned) is gone")
            )
    resumable = [r for r in listed.values() if r.role in surface.RESUMABLE_ROLES]
    chosen = surface.resolve(store, load=False).record
    best = max((r.global_step or 0 for r in resumable), default=None)
    step = None if chosen is None else chosen.global_step or 0
    if exp.min_step is not None and (step is None or step < exp.min_step):
        out.append(
            Violation("resume-regressed", f"resume chose step {step}; step {exp.min_step} had committed")
        )
    if best is not None and (step is None or step < best):
        out.append(Violation("resume-not-newest", f"resume chose step {step} over a valid step {best}"))
    foreign = {os.path.relpath(rel, workload.dirpath) for rel in (*workload.foreign, *workload.user_files)}
    for name in sorted(os.listdir(directory)):
        if name in ours or name in foreign:
            continue  # a listed but broken checkpoint is reported above
        if surface.is_temp_name(name):
            out.append(Violation("temp-survived", f"{name} is still there after the next start"))
        elif name in exp.listed_before:
            out.append(Violation("half-deleted-survived", f"{name} is no longer listed but still there"))
        else:
            out.append(Violation("uncommitted-survived", f"{name}, never committed, is still there"))
    return None if chosen is None else (chosen.name, chosen.epoch or 0)


def _judge_genesis(workload: Workload, state_root: Path, exp: Expectation, out: list[Violation]) -> None:
    from .workloads import version_payload

    path = state_root / workload.dirpath / workload.file
    try:
        got = _version(surface.genesis_load(str(path)))
    except Exception as e:
        if workload.file in exp.required:
            out.append(Violation("genesis-load-failed", f"genesis.load raised {type(e).__name__}: {e}"))
        got = None
    if got is not None and got not in exp.allowed.get(workload.file, ()):
        out.append(
            Violation("genesis-wrong-version", f"genesis.load gave {got}; expected one of {exp.allowed}")
        )
    code, text = surface.cli_verify(str(path.parent))
    if code != 0:
        out.append(
            Violation("cli-verify", f"after genesis.load, genesis-ckpt verify exits {code}: {text[-300:]}")
        )
    try:
        surface.genesis_save(version_payload(99), str(path))
    except Exception as e:
        out.append(Violation("genesis-next-save-failed", f"{type(e).__name__}: {e}"))
        return
    for name in sorted(os.listdir(path.parent)):
        if surface.is_temp_name(name):
            # Not a violation: genesis.save holds no lock, so nothing can prove another writer's temp file dead
            # (two processes may save into one directory). Such a file is never loaded; counted as a note.
            out.append(Violation("note-genesis-temp-left", f"{name} is still there after the next save"))
        elif name.endswith(surface.BACKUP_SUFFIX):
            out.append(Violation("backup-survived", f"{name} is still there after the next save"))
