"""Record workloads under strace, enumerate their crash states under each persistence model, judge each one.

:func:`record` runs the workloads in one traced process and replays the record into per-directory op lists.
A :class:`Study` holds one workload's ops with the views and expectations of :mod:`.oracle`, and builds and
judges any crash state ``(p, lost)``: the first ``p`` ops minus the ``lost`` ones. :func:`explore` walks the
crash points of a study under a model (every point, or a seeded sample of them), takes the states the model
allows at each (all of them up to ``cap``, else a seeded sample, see :mod:`.persistence`), judges each
distinct one once, and runs the expensive checks (a real Trainer's auto-resume, the ``genesis-ckpt`` command as
a subprocess) on a seeded sample of them.
"""

from __future__ import annotations

import bisect
import functools
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import oracle, strace, surface
from .persistence import Lost, Model, Ordered, Weak
from .replay import Recorded, Replayer
from .tree import ENTRY_KINDS, Tree
from .workloads import Workload, all_workloads

MODELS: dict[str, type[Model]] = {"ordered": Ordered, "weak": Weak}
DRIVER = Path(__file__).resolve().parent / "driver.py"


def scratch_dir() -> Path:
    """Where crash states are written out: tmpfs when there is one (the checks fsync a lot), else the temp dir."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="genesis-crashstates-", dir=base))


def record(names: list[str], work: Path, *, timeout: float = 900) -> dict[str, Recorded]:
    """Run the named workloads in one process under strace (each in ``work/<name>``); their op lists."""
    roots = {name: work / name for name in names}
    for root in roots.values():
        root.mkdir(parents=True)
    marks = work / "marks.jsonl"
    replayer = Replayer({n: str(p) for n, p in roots.items()}, str(marks), cwd=str(work))
    trace = work / "trace.txt"
    env = {**os.environ, "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, str(DRIVER), "--marks", str(marks), *(f"{n}={p}" for n, p in roots.items())]
    strace.record(trace, argv, cwd=work, env=env, timeout=timeout)
    return replayer.feed_all(strace.parse(trace))


class Study:
    """One recorded workload: its ops, the views at its markers, and the expectation of every interval."""

    def __init__(self, workload: Workload, recorded: Recorded, scratch: Path) -> None:
        self.workload, self.ops, self.initial, self.scratch = (
            workload,
            recorded.ops,
            recorded.initial,
            scratch,
        )
        marks = [op for op in self.ops if op.kind == "mark"]
        setup = [op.idx for op in marks if op.note == "setup-done"]
        if len(setup) != 1 or marks[-1].note != "end":
            raise strace.TraceError(f"{workload.name}: the trace lacks its setup-done or end marker")
        self.start = setup[0]
        self.boundaries = [op.idx for op in marks if op.idx >= self.start]
        self.labels = {op.idx: str(op.payload.get("call", op.note)) for op in marks if op.payload}
        views = self._views()
        foreign = self._foreign()
        self.expectations: list[oracle.Expectation] = []
        for j, b in enumerate(self.boundaries):
            end = self.boundaries[j + 1] if j + 1 < len(self.boundaries) else len(self.ops) - 1
            during = self.labels.get(end, "the process's exit")
            exp = oracle.Expectation.of(
                [v for q, v in sorted(views.items()) if b <= q <= end], self.labels[b], during
            )
            exp.listed_before = {name for q, v in views.items() if q <= b for name in v}
            exp.foreign = foreign
            self.expectations.append(exp)

    def _interesting(self, idx: int) -> bool:
        op = self.ops[idx]
        if op.kind == "mark":
            return True
        names = {op.name, op.name2} - {""}
        return op.kind in ENTRY_KINDS and any(
            not surface.is_temp_name(n) and n != surface.LOCK_NAME for n in names
        )

    def _views(self) -> dict[int, oracle.View]:
        tree, out = self.initial.copy(), {}
        for op in self.ops:
            tree.apply(op)
            if op.idx >= self.start and self._interesting(op.idx):
                out[op.idx] = self._with_state(tree, lambda root: oracle.view(self.workload, root))
        return out

    def _foreign(self) -> dict[str, bytes]:
        tree = self.state(self.start + 1, frozenset())
        out = {}
        for rel in self.workload.foreign:
            ino = tree.lookup(rel.split("/"))
            if ino is None or ino not in tree.files:
                raise strace.TraceError(f"{self.workload.name}: the user's file {rel} is not in the setup")
            out[rel] = bytes(tree.files[ino])
        return out

    def _with_state(self, tree: Tree, fn):  # type: ignore[no-untyped-def]
        target = self.scratch / "state"
        shutil.rmtree(target, ignore_errors=True)
        tree.materialize(str(target))
        try:
            return fn(target)
        finally:
            shutil.rmtree(target, ignore_errors=True)

    # -------------------------------------------------------------------------------------- states
    def interval(self, p: int) -> int:
        """The index of the last marker issued before crash point ``p``."""
        return bisect.bisect_left(self.boundaries, p) - 1

    def state(self, p: int, lost: Lost) -> Tree:
        tree = self.initial.copy()
        for op in self.ops[:p]:
            if op.idx not in lost:
                tree.apply(op)
        return tree

    def judge(self, p: int, lost: Lost) -> tuple[list[oracle.Violation], oracle.Choice]:
        exp = self.expectations[self.interval(p)]
        return self._with_state(self.state(p, lost), lambda root: oracle.judge(self.workload, root, exp))

    def point_after(self, call: str) -> int:
        """The crash point just after the marker of ``call`` returning."""
        for idx, label in self.labels.items():
            if label == call:
                return idx + 1
        raise KeyError(f"{self.workload.name} has no marker {call!r}; it has {sorted(self.labels.values())}")

    def describe(self, p: int, lost: Lost, limit: int = 6) -> str:
        exp = self.expectations[self.interval(p)]
        last = self.ops[p - 1].describe() if p else "nothing"
        gone = [self.ops[i].describe() for i in sorted(lost)]
        more = f" (+{len(gone) - limit} more)" if len(gone) > limit else ""
        return (
            f"crash after {last}; '{exp.after}' had returned, '{exp.during}' was in flight; "
            f"lost: {'; '.join(gone[:limit]) or 'nothing'}{more}"
        )


@dataclass
class Finding:
    p: int
    lost: Lost
    violations: list[oracle.Violation]
    where: str


@dataclass
class Cell:
    """The result of one workload under one model."""

    workload: str
    model: str
    crash_points: int = 0
    sampled_points: int = 0  # crash points with more combinations than the cap: a seeded sample of them
    combinations: int = 0
    states: int = 0
    bad_states: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    resumes: int = 0
    cli_runs: int = 0
    seconds: float = 0.0


def explore(
    study: Study,
    model_name: str,
    *,
    seed: int,
    cap: int,
    points: int | None = None,
    resume_samples: int = 0,
    cli_samples: int = 0,
    keep_findings: int = 20,
) -> Cell:
    """Judge the crash states of ``study`` under a model; ``points``: a seeded sample of crash points only."""
    start = time.perf_counter()
    model = MODELS[model_name](study.ops)
    cell = Cell(study.workload.name, model_name)
    all_points = list(range(study.start + 1, len(study.ops) + 1))
    if points is not None and points < len(all_points):
        after_calls = [b + 1 for b in study.boundaries[1:]]  # just after each call returned: always
        rest = sorted(set(all_points) - set(after_calls))
        chosen = random.Random(f"{seed}/{study.workload.name}/{model_name}").sample(
            rest, max(0, points - len(after_calls))
        )
        all_points = sorted(set(after_calls) | set(chosen))
    seen: set[tuple[int, str]] = set()
    judged: list[tuple[int, Lost, oracle.Choice]] = []
    for p in all_points:
        rng = random.Random(f"{seed}/{study.workload.name}/{model_name}/{p}")
        states, total = model.states(p, rng, cap)
        cell.crash_points += 1
        cell.combinations += total
        cell.sampled_points += total > cap
        for lost in states:
            key = (study.interval(p), study.state(p, lost).digest())
            if key in seen:
                continue
            seen.add(key)
            found, chosen = study.judge(p, lost)
            cell.states += 1
            judged.append((p, lost, chosen))
            cell.notes.update(v.kind for v in found if v.is_note)
            violations = [v for v in found if not v.is_note]
            if violations:
                cell.bad_states += 1
                cell.kinds.update(v.kind for v in violations)
                if len(cell.findings) < keep_findings:
                    cell.findings.append(Finding(p, lost, violations, study.describe(p, lost)))
    _samples(study, cell, judged, random.Random(f"{seed}/{study.workload.name}/{model_name}/samples"),
             resume_samples, cli_samples)  # fmt: skip
    cell.seconds = time.perf_counter() - start
    return cell


def _samples(
    study: Study,
    cell: Cell,
    judged: list[tuple[int, Lost, oracle.Choice]],
    rng: random.Random,
    resumes: int,
    clis: int,
) -> None:
    """A real Trainer's auto-resume and the real ``genesis-ckpt verify`` on a sample of the judged states."""
    w = study.workload
    for p, lost, chosen in rng.sample(judged, min(resumes if w.kind == "trainer" else 0, len(judged))):
        with surface.captured_logs():
            found = study._with_state(study.state(p, lost), functools.partial(_trainer_resume, w, chosen))
        _record(study, cell, p, lost, found)
        cell.resumes += 1
    for p, lost, _ in rng.sample(judged, min(clis if w.kind != "genesis" else 0, len(judged))):
        _record(study, cell, p, lost, study._with_state(study.state(p, lost), functools.partial(_cli, w)))
        cell.cli_runs += 1


def _trainer_resume(w: Workload, chosen: oracle.Choice, root: Path) -> list[oracle.Violation]:
    """A real fit on the state: it must resume from what resolve chose, and train one more epoch."""
    from .trainer import resume_fit

    epochs = 1 if chosen is None else chosen[1] + 2
    callback = resume_fit(surface.genesis_checkpoint_class(), str(root / w.dirpath), w.trainer, epochs)
    got = None if callback.resumed_from is None else callback.resumed_from.name
    want = None if chosen is None else chosen[0]
    if got == want:
        return []
    return [oracle.Violation("trainer-resume", f"the Trainer resumed from {got}; resolve chose {want}")]


def _cli(w: Workload, root: Path) -> list[oracle.Violation]:
    if not (root / w.dirpath).is_dir():
        return []
    code, text = surface.cli_verify_subprocess(str(root / w.dirpath))
    return (
        []
        if code == 0
        else [oracle.Violation("cli-verify", f"genesis-ckpt verify exits {code}: {text[-300:]}")]
    )


def _record(study: Study, cell: Cell, p: int, lost: Lost, violations: list[oracle.Violation]) -> None:
    if violations:
        cell.bad_states += 1
        cell.kinds.update(v.kind for v in violations)
        cell.findings.append(Finding(p, lost, violations, study.describe(p, lost)))


def studies(names: list[str], work: Path, scratch: Path) -> dict[str, Study]:
    """Record the named workloads in one traced process and build their studies."""
    workloads = all_workloads()
    recorded = record(names, work)
    return {name: Study(workloads[name], recorded[name], scratch) for name in names}
