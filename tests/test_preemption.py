"""Preemption in a real process: real signals, the exit code a scheduler sees, and exact resumes off the
happy path (between two gradient-accumulation steps, inside the epoch-end validation, SLURM's SIGUSR1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import result_of, train

from lightning_genesis_ckpt import CheckpointStore

ACCUMULATE = ["--epochs", "3", "--accumulate", "3"]  # 12 batches per epoch: an optimizer step every 3


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return result_of(train(str(tmp_path_factory.mktemp("straight") / "ck"), *ACCUMULATE))


@pytest.mark.parametrize(
    ("case", "trigger", "exit_code", "snapshot_step"),
    [
        # Batch 4 of epoch 1 is the middle of the window 3-5: the stop waits for the step after batch 5.
        (
            "between accumulation steps",
            ["--signal", "SIGTERM", "--at-epoch", "1", "--at-batch", "4"],
            143,
            4 + 2,
        ),
        # Inside the epoch-end validation: the validation finishes, the epoch completes, then the snapshot.
        ("inside validation", ["--signal", "SIGTERM", "--at-epoch", "1", "--at-val-batch", "1"], 143, 8),
        # SLURM's --signal=USR1@120, configured as a preemption signal: 128 + 10.
        (
            "SIGUSR1",
            [
                "--signal",
                "SIGUSR1",
                "--preemption-signals",
                "SIGTERM,SIGUSR1",
                "--at-epoch",
                "2",
                "--at-batch",
                "7",
            ],
            138,
            8 + 3,
        ),
    ],
)
def test_preempted_run_exits_with_the_signal_and_resumes_bit_identical(
    tmp_path: Path, straight: dict, case: str, trigger: list[str], exit_code: int, snapshot_step: int
) -> None:
    d = str(tmp_path / "ck")
    first = train(d, *ACCUMULATE, *trigger, check=False)
    assert first.returncode == exit_code, first.stdout + first.stderr
    assert "RESULT:" not in first.stdout
    # The log says what stopped it and how long the durable commit took after the signal.
    assert re.search(
        r"fit interrupted by SIG\w+: snapshot saved to .* committed \d+\.\d+ s after the signal", first.stderr
    )
    snap = CheckpointStore(d).manifest().get("interrupt_checkpoint.pth")
    assert snap is not None and snap.global_step == snapshot_step
    if case == "SIGUSR1":
        return  # the resume from a mid-epoch stop is the first case's; this one is about the signal and code
    resumed = result_of(train(d, *ACCUMULATE))
    assert resumed["resumed_from"] == "interrupt_checkpoint.pth" and resumed["resumed_step"] == snapshot_step
    assert resumed["digest"] == straight["digest"], case
