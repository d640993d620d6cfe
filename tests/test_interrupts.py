"""Ctrl+C, SIGTERM and crashes in a real training process, then a real re-run that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_target, result_of, train
from s3server import SECRET_KEY

STEPS_PER_EPOCH = 12


@pytest.mark.parametrize(
    ("backend", "how", "lightning"),
    [
        ("local", "SIGINT", "pytorch_lightning"),
        ("local", "SIGTERM", "pytorch_lightning"),
        ("local", "exception", "pytorch_lightning"),
        ("local", "SIGTERM", "lightning.pytorch"),
        ("s3", "SIGTERM", "pytorch_lightning"),
    ],
)
def test_interrupt_mid_epoch_snapshot_then_resume(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, how: str, lightning: str
) -> None:
    d = make_target(request, tmp_path, backend)
    trigger = ["--raise-at"] if how == "exception" else ["--signal", how]
    trigger += ["--flavour", lightning]
    first = train(d, "--epochs", "4", *trigger, "--at-epoch", "2", "--at-batch", "5", check=False)
    # SIGTERM: 128 + 15, what schedulers read as "preempted" (Lightning alone exits 0 there); Ctrl+C and a
    # crash exit 1.
    assert first.returncode == (143 if how == "SIGTERM" else 1), first.stdout + first.stderr
    assert "RESULT:" not in first.stdout, "fit must not have returned normally"
    assert "snapshot saved" in first.stderr
    assert f"{d.store().url_for('interrupt_checkpoint.pth')} (epoch 2" in first.stderr
    assert not d.store().fs.exists(d.store().path("genesis.lock")), (
        "the interrupted run must release its lock"
    )

    store = d.store()
    snap = store.manifest().get("interrupt_checkpoint.pth")
    assert snap is not None and snap.epoch == 2
    # SIGINT lands inside the batch; SIGTERM is acted on by Lightning at the next batch boundary.
    assert 2 * STEPS_PER_EPOCH + 5 <= snap.global_step <= 2 * STEPS_PER_EPOCH + 6
    assert sorted(store.manifest().records) == [
        "best_model.pth",
        "checkpoint_epoch_0.pth",
        "checkpoint_epoch_1.pth",
        "interrupt_checkpoint.pth",
    ]
    store.verify("interrupt_checkpoint.pth")

    second_run = train(d, "--epochs", "4", "--flavour", lightning)
    second = result_of(second_run)
    assert second["resumed_from"] == "interrupt_checkpoint.pth"
    assert second["resumed_step"] == snap.global_step  # finished epochs were not redone
    assert second["global_step"] == 4 * STEPS_PER_EPOCH and second["epoch"] == 4
    after = d.store().manifest()
    assert "interrupt_checkpoint.pth" not in after.records
    assert "interrupt_checkpoint.pth" not in d.names()
    for proc in (first, second_run):
        assert SECRET_KEY not in proc.stdout + proc.stderr


def test_interrupted_run_resumed_at_epoch_boundary_matches_uninterrupted(tmp_path: Path) -> None:
    """SIGTERM as epoch 1 ends: the snapshot is at an epoch boundary, so the resumed run is bit-identical.

    (A snapshot from the middle of an epoch resumes at the right step, but a plain DataLoader restarts its
    shuffle there, so only boundary resumes can be exact.)
    """
    straight = result_of(train(str(tmp_path / "straight"), "--epochs", "4"))
    d = str(tmp_path / "ck")
    first = train(
        d, "--epochs", "4", "--signal", "SIGTERM", "--at-epoch", "1", "--at-batch", "-1", check=False
    )
    assert "RESULT:" not in first.stdout
    resumed = result_of(train(d, "--epochs", "4"))
    assert resumed["resumed_from"] == "interrupt_checkpoint.pth"
    assert resumed["resumed_step"] == 2 * STEPS_PER_EPOCH
    assert resumed["digest"] == straight["digest"]
