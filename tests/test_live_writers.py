"""Writers beside a live run, with real processes: the lock, fencing, and stale-lock races.

The same rules without a second process, on every backend, are in ``tests/conformance/test_writers.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, SCRIPTS, StoreTarget, make_target
from models import TinyModel, loaders, make_trainer

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import CheckpointManager, GenesisCheckpoint, StoreLockedError, cli
from lightning_genesis_ckpt.core.names import BEST_NAME, LOCK_NAME, epoch_name
from lightning_genesis_ckpt.storage._faults import STOP_ENV


class Process:
    """A script of tests/scripts in its own Python process, its stdout lines collected as they come.

    ``namespace=True`` runs it in a PID namespace of its own (``unshare --pid``), as a container on the same
    host would: to the lock it is another machine's process, whose liveness only its lease tells.
    """

    def __init__(
        self, script: str, *args: str, env: dict[str, str] | None = None, namespace: bool = False
    ) -> None:
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        # A shell as the namespace's init (pid 1 ignores the SIGSTOP it sends itself), the script its child.
        prefix = ["unshare", "--pid", "--fork", "sh", "-c", '"$@"; exit $?', "sh"] if namespace else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(SCRIPTS / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
            cwd=str(ROOT),
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.strip())
                self._new.notify_all()
        with self._new:
            self.lines.append("")  # end of output
            self._new.notify_all()

    def seen(self, prefix: str) -> str | None:
        with self._new:
            return next((line for line in self.lines if line.startswith(prefix)), None)

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        """The first line that starts with ``prefix``; fails after ``timeout`` or when the process ends."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "" and self.proc.poll() is not None):
                    break
                self._new.wait(min(left, 0.5))
        self.stop()
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"no {prefix!r} line in {self.lines}; stderr:\n{stderr}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 60) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        code = self.proc.wait(timeout=timeout)
        if code != 0:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            print(f"pid {self.pid} exited {code}; stderr:\n{stderr}")
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            for pid in {self.pid, self.target}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=30)

    @property
    def target(self) -> int:
        """The pid of the script itself (under ``unshare`` it is a child of :attr:`pid`)."""
        return getattr(self, "_target", self.pid)

    @target.setter
    def target(self, pid: int) -> None:
        self._target = pid


def stopped(pid: int, timeout: float = 60) -> None:
    """Wait until ``pid`` has stopped itself (SIGSTOP at a test stop point)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} never reached its stop point"
        time.sleep(0.01)


def can_unshare() -> bool:
    return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0


@contextlib.contextmanager
def reaped(*procs: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()


def options_json(target: StoreTarget) -> str:
    return json.dumps(target.storage_options)


def run_cli(target: StoreTarget, *args: str) -> tuple[int, str]:
    opts = [
        arg
        for k, v in target.storage_options.items()
        for arg in ("-o", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")
    ]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main([*args, *opts])
    return code, err.getvalue()


@pytest.fixture(params=["local", "s3"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
    """A directory two processes can share (memory:// lives inside one process)."""
    return make_target(request, tmp_path, request.param)


def test_writers_beside_a_live_training_run(shared_url: StoreTarget, tmp_path: Path) -> None:
    url, opts = shared_url.url, shared_url.storage_options
    go = tmp_path / "go"
    run = Process("live_run.py", url, "--go", str(go), "--storage-options", options_json(shared_url))
    with reaped(run):
        run.wait_for("EPOCH 2")
        # An evaluation loop polls the run's directory while it saves epochs 2 to 5: it only reads.
        polls = 0
        while polls < 3 or not run.seen("PAUSED"):
            mgr = CheckpointManager(url, storage_options=opts, verbose=False)
            assert mgr.load_latest_checkpoint() is not None
            mgr.load_best_model()
            assert run_cli(shared_url, "ls", url)[0] == 0
            assert run.alive(), "reading the directory disturbed the run"
            polls += 1
        holder = f"pid {run.pid} on this host"
        other = tmp_path / "other.pth"
        torch.save({"w": torch.ones(2)}, other)
        writers = {
            "tag_version": lambda: genesis.tag_version(url, "v1", BEST_NAME, storage_options=opts),
            "save_version": lambda: genesis.save_version(
                url, {"w": torch.ones(2)}, "v2", storage_options=opts
            ),
            "manager": lambda: CheckpointManager(url, storage_options=opts).save_epoch_checkpoint(
                {"x": 1}, 99
            ),
            "import": lambda: genesis.import_checkpoint(str(other), url, storage_options=opts),
            "genesis.save": lambda: genesis.save(
                {"w": torch.ones(2)}, f"{url}/mine.pth", storage_options=opts
            ),
        }
        for what, write in writers.items():
            with pytest.raises(StoreLockedError, match=holder):
                write()
            assert run.alive(), what
        code, err = run_cli(shared_url, "prune", url, "--keep-last", "1")
        assert code == 2 and holder in err, err
        go.touch()
        run.wait_for("RESULT")
        assert run.wait() == 0
    store = shared_url.store()
    assert {epoch_name(8), epoch_name(9), BEST_NAME} <= set(store.manifest().records)
    assert not {"version_v1.pth", "version_v2.pth", "mine.pth"} & set(shared_url.names())
    for record in store.records():
        store.verify(record.name)
    assert run_cli(shared_url, "verify", url)[0] == 0
    assert LOCK_NAME not in shared_url.names()


class TagDuringTraining(pl.Callback):
    """Other writers in the training process, at the end of epoch 1, after the epoch's checkpoint."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            genesis.tag_version(self.dirpath, "v1", epoch_name(0))
            genesis.save_version(self.dirpath, {"w": torch.ones(3)}, "v2")
            genesis.save({"w": torch.zeros(3)}, f"{self.dirpath}/notes.pth")


def test_a_version_tagged_during_training_survives_the_run(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    ckpt = GenesisCheckpoint(d, monitor="val_loss", keep_last=1)
    make_trainer([ckpt, TagDuringTraining(d)], 4).fit(TinyModel(), train, val)
    store = ckpt.store
    listed = store.manifest(refresh=True).records
    assert {"version_v1.pth", "version_v2.pth", "notes.pth", epoch_name(3)} <= set(listed)
    assert listed["version_v1.pth"].epoch == 0
    for name in listed:
        store.verify(name)


def test_a_paused_writer_cannot_commit_over_the_new_holder(shared_url: StoreTarget) -> None:
    elsewhere = shared_url.backend == "s3"
    if elsewhere and not can_unshare():
        pytest.skip("needs unshare --pid to run the paused writer as another machine's process")
    url = shared_url.url
    env = {STOP_ENV: "after-rename-before-manifest"}
    args = ("hold_and_commit.py", url, "--storage-options", options_json(shared_url))
    writer = Process(*args, env=env, namespace=elsewhere)
    with reaped(writer):
        writer.target = int(writer.wait_for("LOCKED").split()[1])
        stopped(writer.target)  # its data is published, its manifest write not sent
        time.sleep(1.5)  # longer than its 1 s lease: its heartbeat stopped with it
        other = shared_url.store(verbose=False)
        if not elsewhere:
            # On a local disk the lock is held by the (paused) process itself: nobody can take it over.
            with pytest.raises(StoreLockedError, match=f"pid {writer.target}"):
                other.acquire_lock()
            os.kill(writer.target, signal.SIGCONT)
            writer.wait_for("COMMITTED")
            assert writer.wait() == 0
            assert "a.pth" in shared_url.store().manifest().records
            return
        other.acquire_lock()  # the paused writer's lease expired: taken over, with a warning
        other.save("b.pth", {"w": torch.zeros(10)})
        os.kill(writer.target, signal.SIGCONT)
        writer.wait_for("FENCED")
        assert writer.wait() == 0
        manifest = shared_url.store().manifest()
        assert "b.pth" in manifest.records and "a.pth" not in manifest.records
        other.save("c.pth", {"w": torch.zeros(10)})  # the new holder is not disturbed
        assert {"b.pth", "c.pth"} <= set(shared_url.store().manifest().records)
        other.release_lock()
    assert LOCK_NAME not in shared_url.names()


def stale_lock(target: StoreTarget) -> None:
    """The lock of a run that is gone: a process of this host that has ended, with an old heartbeat."""
    from lightning_genesis_ckpt.storage.lock import LockInfo

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    info = LockInfo.mine(60.0)
    gone: dict[str, Any] = {**info.__dict__, "pid": int(dead.stdout), "heartbeat": time.time() - 3600}
    fs = target.fs()
    root = target.store().root
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LOCK_NAME}", json.dumps(gone).encode())


def test_exactly_one_of_racing_runs_takes_a_stale_lock(shared_url: StoreTarget) -> None:
    args = ("lock_race.py", shared_url.url, "--storage-options", options_json(shared_url))
    # The first racer stops right after it has judged the lock stale, before it takes it over: the
    # widest the race can be. Then it races freely with two more, round after round.
    slow = Process(*args, env={STOP_ENV: "lock-found-stale"})
    racers = [slow, Process(*args), Process(*args)]
    with reaped(*racers):
        for proc in racers:
            proc.wait_for("READY")
        stale_lock(shared_url)
        slow.send(f"0 {time.time()}")
        stopped(slow.pid)
        racers[1].send(f"0 {time.time()}")
        first = racers[1].wait_for("0 ")
        os.kill(slow.pid, signal.SIGCONT)
        outcomes = [slow.wait_for("0 ").split()[1], first.split()[1]]
        assert sorted(outcomes) == ["LOST", "WON"], outcomes
        for proc in racers[:2]:
            proc.send("release")
        racers[outcomes.index("WON")].wait_for("0 RELEASED")
        for round_ in range(1, 6):
            stale_lock(shared_url)
            at = time.time() + 0.3
            for proc in racers:
                proc.send(f"{round_} {at}")
            outcomes = [proc.wait_for(f"{round_} ").split()[1] for proc in racers]
            assert sorted(outcomes) == ["LOST", "LOST", "WON"], (round_, outcomes)
            for proc in racers:
                proc.send("release")
            racers[outcomes.index("WON")].wait_for(f"{round_} RELEASED")
        for proc in racers:
            assert proc.wait() == 0
