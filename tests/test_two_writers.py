"""Two runs pointed at one directory: the second is refused at setup; a killed run's lock does not block."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import pytorch_lightning as pl
from conftest import ROOT, SCRIPTS
from models import BigModel, RaiseAt, loaders, make_trainer

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint, StoreLockedError
from lightning_genesis_ckpt.core.names import LOCK_NAME


class CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def fit(dirpath: str, epochs: int, *extra: pl.Callback) -> GenesisCheckpoint:
    pl.seed_everything(0, verbose=False)
    cb = GenesisCheckpoint(dirpath, monitor="val_loss")
    train, val = loaders()
    make_trainer([cb, *extra], epochs).fit(BigModel(ballast_mb=1), train, val)
    return cb


def test_live_run_on_local_disk_blocks_a_second_one_until_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = str(tmp_path / "ck")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "crash_worker.py"), d, "--epochs", "100000", "--ballast-mb", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert first.stdout is not None
        for line in first.stdout:  # until it has committed a checkpoint and is training on
            if line.startswith("EPOCH 2"):
                break
        counter = CountSteps()
        with pytest.raises(StoreLockedError, match=rf"{d}.*pid {first.pid} on this host"):
            fit(d, 1, counter)
        assert counter.batches == 0, "the second run must fail before training"
        assert first.poll() is None, "the first run must not be disturbed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (Path(d) / LOCK_NAME).exists(), "a killed run cannot remove its lock"
    newest = max(r.global_step or 0 for r in CheckpointStore(d).records())
    with caplog.at_level(logging.WARNING):
        cb = fit(d, 4)
    assert (
        "replacing the stale lock" in caplog.text
        and f"process {first.pid} on this host has ended" in caplog.text
    )
    assert cb.resumed_from is not None and cb.resumed_from.global_step == newest
    assert not (Path(d) / LOCK_NAME).exists(), "released at teardown"


def test_a_live_run_elsewhere_blocks_a_run_on_an_object_store() -> None:
    # memory:// lives in one process: a run on another machine is a lock with a fresh heartbeat there.
    url = f"memory://two-writers/{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.makedirs(url, exist_ok=True)
    now = time.time()
    elsewhere = {"token": "t", "host": "gpu-node-3", "pidns": 1, "pid": 77, "start": None}
    fs.pipe_file(
        f"{url}/{LOCK_NAME}",
        json.dumps({**elsewhere, "acquired": now, "heartbeat": now, "lease_s": 60.0}).encode(),
    )
    counter = CountSteps()
    with pytest.raises(StoreLockedError, match="pid 77 on host gpu-node-3"):
        fit(url, 1, counter)
    assert counter.batches == 0
    fs.rm_file(f"{url}/{LOCK_NAME}")  # that run ended
    fit(url, 1)
    assert not fs.exists(f"{url}/{LOCK_NAME}")


def test_lock_is_released_after_an_exception(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(d, 3, RaiseAt(epoch=1, batch=2))
    assert not (Path(d) / LOCK_NAME).exists()
    assert "interrupt_checkpoint.pth" in CheckpointStore(d).manifest().records
    fit(d, 3)  # and nothing blocks the next run
