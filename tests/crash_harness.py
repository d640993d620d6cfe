"""kill -9 trials against a real training process, shared by tests/test_crash_kill.py and benchmarks/stress_kill.py.

A *chain* is a checkpoint directory that a sequence of runs of ``scripts/crash_worker.py`` trains in: each run
resumes from what the previous one left and is SIGKILLed in turn, either at a random moment or by the
test-only kill points inside the commit path (:mod:`lightning_genesis_ckpt._faults`). After every kill the
directory is inspected, and the next run's resume is checked against it:

* damaged -- a file under a final name does not load, the manifest does not parse, a manifest record does not
  match its file, or a committed checkpoint would be skipped by resume;
* failed resume -- the next run did not resume from the newest committed checkpoint, lost more than the epoch
  in progress, did not sweep the temporary files or finish an interrupted deletion, did not warn when it
  rebuilt a lost manifest, or crashed; or the chain's last run finished with weights that differ from an
  uninterrupted run (every resume here is from an epoch boundary, where resuming is bit-exact) or left files
  the manifest does not list.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_genesis_ckpt import CheckpointStore, ManifestError
from lightning_genesis_ckpt.core.manifest import Manifest
from lightning_genesis_ckpt.core.names import MANIFEST_NAME, is_temp_name
from lightning_genesis_ckpt.storage._faults import ENV, POINTS
from lightning_genesis_ckpt.storage.resume import resolve

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "scripts" / "crash_worker.py"
STEPS_PER_EPOCH = 12
EPOCHS = 6


@dataclass(frozen=True)
class Kill:
    """One planned kill: at the ``count``-th hit of a kill ``point``; or, with no point, once the fraction
    ``at`` of the training left to the run has gone by (None: never, the run finishes)."""

    point: str | None = None
    count: int = 1
    at: float | None = None

    @property
    def kind(self) -> str:
        return self.point or ("random moment" if self.at is not None else "none")


@dataclass
class Inspection:
    """What a killed run left behind, and what the next run must therefore resume from."""

    temp: set[str]
    deleting: set[str]
    manifest_missing: bool
    expected: str | None
    expected_step: int | None
    epochs_started: int
    problems: list[str]
    kind: str = ""


@dataclass
class Tally:
    trials: int = 0
    damaged: int = 0
    failed_resumes: int = 0
    runs: int = 0
    chains: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    damaged_by: Counter[str] = field(default_factory=Counter)
    failed_by: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.kills.items()))
        return (
            f"{self.trials} kill -9 trials ({kinds}) in {self.chains} chains, {self.runs} training runs: "
            f"{self.damaged} damaged, {self.failed_resumes} failed resumes, {self.seconds:.0f} s"
        )


def inspect(dirpath: str, epochs_started: int) -> Inspection:
    """Check everything a killed run left in ``dirpath``; returns what the next run must resume from."""
    problems: list[str] = []
    names = sorted(os.listdir(dirpath)) if os.path.isdir(dirpath) else []
    temp = {n for n in names if is_temp_name(n)}
    finals = [n for n in names if not is_temp_name(n) and n.endswith(".pth")]
    manifest_missing = MANIFEST_NAME not in names
    deleting: set[str] = set()
    if not manifest_missing:
        try:
            on_disk = Manifest.decode(Path(dirpath, MANIFEST_NAME).read_bytes(), MANIFEST_NAME)
            deleting = set(on_disk.deleting).intersection(names) - set(on_disk.records)
        except ManifestError as e:
            problems.append(f"manifest does not parse: {e}")
    for name in finals:
        try:
            ckpt = torch.load(os.path.join(dirpath, name), map_location="cpu", weights_only=True)
            ballast = ckpt["state_dict"]["ballast"]
            if not bool((ballast == float(ckpt["global_step"])).all()):
                problems.append(f"{name}: ballast does not match its global_step (mixed bytes)")
        except Exception as e:
            problems.append(f"{name} does not load: {type(e).__name__}: {e}")
    expected, expected_step = None, None
    try:
        store = CheckpointStore(dirpath, verbose=False)
        for rec in store.records():
            try:
                store.verify(rec.name)
            except Exception as e:
                problems.append(f"manifest disagrees with {rec.name}: {e}")
        found = resolve(store, load=False)
        problems.extend(f"resume would skip committed {n}: {why}" for n, why in found.skipped)
        if found.record is not None:
            expected, expected_step = found.record.name, found.record.global_step
    except Exception as e:
        problems.append(f"store unreadable: {type(e).__name__}: {e}")
    return Inspection(temp, deleting, manifest_missing, expected, expected_step, epochs_started, problems)


class Zygote:
    """``crash_worker.py --serve``: imports torch once, forks one real training process per run."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        env.pop(ENV, None)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.lines.get(timeout=120)
        assert ready.strip() == "READY", ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(json.loads(self.lines.get(timeout=60))["pid"])

    def exit_status(self, timeout: float) -> int | None:
        """The exit code of the running child (negative: killed by that signal); None while it runs."""
        try:
            return int(json.loads(self.lines.get(timeout=timeout))["status"])
        except queue.Empty:
            return None

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


class KillExperiment:
    """Runs kill trials in chains of runs under ``workdir`` and tallies the outcome."""

    def __init__(self, workdir: Path, *, epochs: int = EPOCHS, ballast_mb: float = 32.0, seed: int = 0):
        self.workdir = workdir
        self.epochs = epochs
        self.ballast_mb = ballast_mb
        self.rng = random.Random(seed)
        self.zygote = Zygote()
        self.tally = Tally()
        self._straight: str | None = None
        self._epoch_seconds = 1.0  # measured by the uninterrupted run
        self._chain_dir: Path | None = None
        self._previous: Inspection | None = None
        self._serial = 0

    def close(self) -> None:
        self.zygote.close()

    # ------------------------------------------------------------------------------------- one run
    def _run(self, dirpath: Path, kill: Kill | None) -> tuple[int, str, dict[str, Any] | None]:
        """One training run in ``dirpath``; returns (exit status, its log, its FIT_START info)."""
        self._serial += 1
        self.tally.runs += 1
        log = self.workdir / f"run{self._serial:04d}.log"
        env = {ENV: f"{kill.point}:{kill.count}"} if kill is not None and kill.point else {}
        argv = [str(dirpath), "--epochs", str(self.epochs), "--ballast-mb", str(self.ballast_mb)]
        pid = self.zygote.start(argv, env, log)
        started: dict[str, Any] | None = None
        status: int | None = None
        deadline = time.monotonic() + 300
        while started is None and status is None:
            text = log.read_text() if log.exists() else ""
            for line in text.splitlines():
                if line.startswith("FIT_START "):
                    started = json.loads(line[len("FIT_START ") :])
                    # Read at once, before this run writes anything: its setup has swept by now.
                    started["listing"] = sorted(os.listdir(dirpath))
            status = self.zygote.exit_status(0.01) if started is None else None
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        if status is None:
            if kill is not None and kill.point is None and kill.at is not None and started is not None:
                left = self.epochs - (started["resumed_step"] or 0) / STEPS_PER_EPOCH
                status = self.zygote.exit_status(kill.at * left * self._epoch_seconds)
                if status is None:
                    os.kill(pid, signal.SIGKILL)
            status = status if status is not None else self.zygote.exit_status(300)
            if status is None:
                os.kill(pid, signal.SIGKILL)
                status = self.zygote.exit_status(60)
                assert status is not None
        if kill is None and status == 0:
            self._epoch_seconds = (time.monotonic() - began) / self.epochs
        return status, log.read_text(), started

    def _check_resume(self, started: dict[str, Any] | None, log: str, run: str) -> list[str]:
        prev = self._previous
        if prev is None:
            return []
        if started is None:
            return []
        problems = []
        if (started["resumed_from"], started["resumed_step"]) != (prev.expected, prev.expected_step):
            problems.append(
                f"{run} resumed from {started['resumed_from']} (step {started['resumed_step']}), "
                f"expected {prev.expected} (step {prev.expected_step})"
            )
        if (started["resumed_step"] or 0) < prev.epochs_started * STEPS_PER_EPOCH:
            problems.append(f"{run} lost finished epochs: resumed at step {started['resumed_step']}")
        left = prev.temp & set(started["listing"])
        if left:
            problems.append(f"{run} did not sweep stale temporary files {sorted(left)}")
        left = prev.deleting & set(started["listing"])
        if left:
            problems.append(f"{run} did not finish the interrupted deletion of {sorted(left)}")
        has_files = any(n.endswith(".pth") for n in started["listing"])
        if prev.manifest_missing and has_files and "rebuilding it from the checkpoint files" not in log:
            problems.append(f"{run} rebuilt no manifest, or without a warning")
        return problems

    # ---------------------------------------------------------------------------------- experiment
    def straight_digest(self) -> str:
        """Final weights of an uninterrupted run, which every chain must end with."""
        if self._straight is None:
            status, log, _ = self._run(self.workdir / "straight", None)
            assert status == 0, log
            self._straight = _result(log)["digest"]
        return self._straight

    def trial(self, kill: Kill) -> None:
        """Run once in the current chain with this kill; inspect what it leaves and how it resumed."""
        if self._chain_dir is None:
            self.tally.chains += 1
            self._chain_dir = self.workdir / f"chain{self.tally.chains:03d}"
            self._previous = None
        run = f"run {self._serial + 1} ({kill.kind}{':' + str(kill.count) if kill.point else ''})"
        t0 = time.monotonic()
        status, log, started = self._run(self._chain_dir, kill)
        took = time.monotonic() - t0
        resume_problems = self._check_resume(started, log, run)
        # A resume that goes wrong is the fault of the kill before it.
        blame = self._previous.kind if self._previous is not None else kill.kind
        resumed = "-" if started is None else f"{started['resumed_from']}@{started['resumed_step']}"
        self.tally.events.append(
            f"{self._chain_dir.name} {run}: resumed {resumed}, exit {status}, {took:.1f} s"
        )
        if started is None and status != -signal.SIGKILL:
            resume_problems.append(f"{run} never started training")
        if status == -signal.SIGKILL:
            self.tally.trials += 1
            self.tally.kills[kill.kind] += 1
            epochs = [int(line.split()[1]) for line in log.splitlines() if line.startswith("EPOCH ")]
            before = self._previous.epochs_started if self._previous is not None else 0
            found = inspect(str(self._chain_dir), max(epochs, default=before))
            found.kind = kill.kind
            if found.problems:
                self.tally.damaged += 1
                self.tally.damaged_by[kill.kind] += 1
                self.tally.problems.extend(f"after {run} in {self._chain_dir}: {p}" for p in found.problems)
            self._previous = found
        elif status == 0:
            if _result(log)["digest"] != self.straight_digest():
                resume_problems.append(f"{run} finished with weights that differ from an uninterrupted run")
            # Each run redoes the interrupted epoch, and with it every decision the killed run was making: in
            # the end nothing may be left that the manifest does not list (no orphan, temp file or lock).
            listed = {*CheckpointStore(str(self._chain_dir), verbose=False).manifest().records, MANIFEST_NAME}
            extra = sorted(set(os.listdir(self._chain_dir)) - listed)
            if extra:
                resume_problems.append(f"{run} finished leaving unlisted files {extra}")
            self._chain_dir = None
        else:
            resume_problems.append(f"{run} exited with status {status}:\n{log[-3000:]}")
            self._chain_dir = None
        if resume_problems:
            self.tally.failed_resumes += 1
            self.tally.failed_by[blame] += 1
            self.tally.problems.extend(resume_problems)

    def finish_chain(self) -> None:
        """Let the current chain run to its end, checking the last resume and the final weights."""
        if self._chain_dir is not None:
            self.trial(Kill())

    def run(self, plans: Iterable[Kill], trials: int, max_runs: int | None = None) -> Tally:
        """Run planned kills until ``trials`` runs were killed (or the plans or ``max_runs`` run out), then
        finish the chain."""
        start = time.monotonic()
        self.straight_digest()
        max_runs = max_runs if max_runs is not None else 5 * trials
        for kill in plans:
            if self.tally.trials >= trials or self.tally.runs >= max_runs:
                break
            self.trial(kill)
        self.finish_chain()
        self.tally.seconds = time.monotonic() - start
        return self.tally

    def random_plans(self, points: tuple[str, ...] = POINTS, max_count: int = 5) -> Iterator[Kill]:
        """Endless kills: at a random moment of the run (uniform over the training it has left, as timed by
        the uninterrupted run), or (half of them, when ``points`` are given) at a random hit (1 to
        ``max_count``) of a random kill point."""
        while True:
            if not points or self.rng.random() < 0.5:
                yield Kill(at=self.rng.random())
            else:
                yield Kill(point=self.rng.choice(points), count=self.rng.randint(1, max_count))


def _result(log: str) -> dict[str, Any]:
    for line in log.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise AssertionError(f"no RESULT line in\n{log[-3000:]}")
