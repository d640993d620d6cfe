"""Real 2-process DDP on CPU (gloo): one writer, every rank resumes from the same file, no hang on failure."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SCRIPTS, run_script

from lightning_genesis_ckpt import CheckpointStore

STEPS_PER_EPOCH = 6  # 192 samples / 2 ranks / batch 16


def ddp(dirpath: Path, *args: str, check: bool = True, timeout: float = 240):
    return run_script(str(SCRIPTS / "train_ddp.py"), str(dirpath), *args, check=check, timeout=timeout)


def results(proc: Any) -> dict[int, dict[str, Any]]:
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT:"):
            r = json.loads(line[len("RESULT:") :])
            out[r["rank"]] = r
    return out


def test_ddp_resume_is_consistent_across_ranks_and_exact(tmp_path: Path) -> None:
    straight = results(ddp(tmp_path / "straight", "--epochs", "4"))
    d = tmp_path / "ck"
    first = ddp(d, "--epochs", "2")
    assert "Traceback" not in first.stderr
    resumed = results(ddp(d, "--epochs", "4"))
    assert set(resumed) == {0, 1}
    for rank in (0, 1):
        assert resumed[rank]["resumed_from"] == "checkpoint_epoch_1.pth"
        assert resumed[rank]["resumed_step"] == 2 * STEPS_PER_EPOCH
        assert resumed[rank]["global_step"] == 4 * STEPS_PER_EPOCH
        assert resumed[rank]["digest"] == straight[0]["digest"]
    # Only rank 0 wrote: one manifest, every listed file verifies, no stray temp files from rank 1.
    store = CheckpointStore(str(d))
    for rec in store.records():
        store.verify(rec.name)
    assert not [p for p in d.iterdir() if p.name.startswith(".genesis-tmp")]


def test_ddp_resume_from_a_mid_epoch_step_checkpoint_is_exact(tmp_path: Path) -> None:
    """Each rank's DistributedSampler order comes from seed + epoch; each rank skips the same 4 batches."""
    straight = results(ddp(tmp_path / "straight", "--epochs", "3"))
    d = tmp_path / "ck"
    crashed = ddp(d, "--epochs", "3", "--every-n-steps", "2", "--crash-at", "1", "5", check=False)
    assert crashed.returncode != 0 and "injected" in crashed.stderr
    assert "checkpoint_step_10.pth" in CheckpointStore(str(d)).manifest().records  # epoch 1, batch 4 of 6
    resumed_proc = ddp(d, "--epochs", "3", "--every-n-steps", "2")
    assert "fast-forwarded the train DataLoader to batch 4 of epoch 1" in resumed_proc.stderr
    resumed = results(resumed_proc)
    for rank in (0, 1):
        assert resumed[rank]["resumed_from"] == "checkpoint_step_10.pth"
        assert resumed[rank]["global_step"] == 3 * STEPS_PER_EPOCH
        assert resumed[rank]["digest"] == straight[0]["digest"]


@pytest.mark.parametrize("rank", [1, 0])
def test_failure_on_one_rank_does_not_hang_the_job(tmp_path: Path, rank: int) -> None:
    d = tmp_path / "ck"
    start = time.monotonic()
    # The bound is the subprocess timeout: a hang fails the test instead of blocking CI.
    proc = ddp(d, "--epochs", "4", "--fail-on-rank", str(rank), check=False, timeout=150)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected failure" in proc.stderr
    assert not results(proc)
    store = CheckpointStore(str(d))
    assert "checkpoint_epoch_0.pth" in store.manifest().records
    for rec in store.records():
        store.verify(rec.name)
    print(f"job exited {elapsed:.1f}s after start")


def test_an_error_on_rank_0_before_a_decision_reaches_every_rank(tmp_path: Path) -> None:
    # Rank 0 raises while it decides what to save at the end of epoch 0 (the monitor was never logged):
    # every rank must see that error, instead of waiting in a broadcast rank 0 never joins.
    proc = ddp(
        tmp_path / "ck", "--epochs", "2", "--monitor", "no_such_metric", "--catch", check=False, timeout=150
    )
    errors = {}
    for line in proc.stdout.splitlines():
        if line.startswith("FIT_ERROR:"):
            r = json.loads(line[len("FIT_ERROR:") :])
            errors[r["rank"]] = r
    assert {rank: e["type"] for rank, e in errors.items()} == {
        0: "MonitorNotFoundError",
        1: "MonitorNotFoundError",
    }, (
        proc.stdout,
        proc.stderr[-3000:],
    )
    assert "no_such_metric" in errors[1]["message"]
