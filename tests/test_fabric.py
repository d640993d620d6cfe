"""FabricCheckpointer in real Fabric loops on CPU: exact resume after SIGTERM and after a crash, and 2-process
DDP with one writer."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

from conftest import SCRIPTS, run_script

from lightning_genesis_ckpt import CheckpointStore


def fabric_run(dirpath: Path, *args: str, check: bool = True) -> Any:
    return run_script(str(SCRIPTS / "train_fabric.py"), str(dirpath), *args, check=check, timeout=240)


def results(proc: Any) -> dict[int, dict[str, Any]]:
    # Two ranks share one stdout, so their lines can interleave: find each flat JSON object.
    found = [json.loads(m) for m in re.findall(r"RESULT:(\{[^{}]*\})", proc.stdout)]
    return {r["rank"]: r for r in found}


def test_sigterm_then_crash_then_resume_ends_exactly_where_a_straight_run_does(tmp_path: Path) -> None:
    straight = results(fabric_run(tmp_path / "straight", "--steps", "12"))[0]
    d = tmp_path / "ck"
    preempted = fabric_run(d, "--steps", "12", "--sigterm-at", "5", check=False)
    assert preempted.returncode == 128 + signal.SIGTERM, preempted.stderr
    assert not results(preempted), "the loop stopped at the preemption"
    records = {r.name: r for r in CheckpointStore(str(d)).records()}
    assert records["interrupt_checkpoint.pth"].global_step == 5 and "checkpoint_step_4.pth" in records

    crashed = fabric_run(d, "--steps", "12", "--crash-at", "9", check=False)
    assert crashed.returncode == 1 and "injected crash" in crashed.stderr
    assert "resumed from" in crashed.stderr and "interrupt_checkpoint.pth" in crashed.stderr
    store = CheckpointStore(str(d))
    records = {r.name: r for r in store.records()}
    assert records["interrupt_checkpoint.pth"].global_step == 9

    final = results(fabric_run(d, "--steps", "12"))[0]
    assert (final["resumed_from"], final["resumed_step"]) == ("interrupt_checkpoint.pth", 9)
    assert final["step"] == 12 and final["digest"] == straight["digest"], "model, optimizer and RNG restored"
    store = CheckpointStore(str(d))
    names = [r.name for r in store.records()]
    # keep_last=2 plus the best by loss; the snapshot is retired once step 12 (more training) committed.
    assert "checkpoint_step_12.pth" in names and "interrupt_checkpoint.pth" not in names
    assert len([n for n in names if n.startswith("checkpoint_step_")]) <= 3
    for name in names:
        store.verify(name)
    payload = store.load("checkpoint_step_12.pth")
    assert set(payload) >= {"model", "optimizer", "step", "genesis_rng"} and payload["step"] == 12


def test_two_process_ddp_writes_once_and_every_rank_resumes_the_same_step(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    first = results(fabric_run(d, "--steps", "8", "--devices", "2"))
    assert set(first) == {0, 1} and first[0]["digest"] == first[1]["digest"]
    resumed = results(fabric_run(d, "--steps", "12", "--devices", "2"))
    for rank in (0, 1):
        assert (resumed[rank]["resumed_from"], resumed[rank]["resumed_step"]) == ("checkpoint_step_8.pth", 8)
        assert resumed[rank]["step"] == 12
    assert resumed[0]["digest"] == resumed[1]["digest"], "DDP replicas stay identical after the resume"
    store = CheckpointStore(str(d))
    for record in store.records():
        store.verify(record.name)
    assert not [p for p in d.iterdir() if p.name.startswith(".genesis-tmp")], "rank 1 wrote nothing"
