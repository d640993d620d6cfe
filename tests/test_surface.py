"""ModelCheckpoint's attributes over hand-made records (no I/O), and the preemption settings."""

from __future__ import annotations

import signal

import pytest

from lightning_genesis_ckpt.adapter.preemption import Preemption, parse_signals
from lightning_genesis_ckpt.adapter.surface import view
from lightning_genesis_ckpt.core.records import CheckpointRecord


def rec(
    name: str, role: str, step: int, score: float | None, seq: int, checksum: str = ""
) -> CheckpointRecord:
    return CheckpointRecord(
        name=name,
        role=role,
        size=1,
        checksum=checksum or f"crc32:{seq:08x}",
        created=0.0,
        seq=seq,
        global_step=step,
        metrics={} if score is None else {"loss": score},
        monitor="loss",
    )


E0 = rec("checkpoint_epoch_0.pth", "epoch", 10, 3.0, 1)
E1 = rec("checkpoint_epoch_1.pth", "epoch", 20, 1.0, 2, checksum="crc32:0000beef")
BEST = rec("best_model.pth", "best", 20, 1.0, 3, checksum="crc32:0000beef")  # a copy of E1
E2 = rec("checkpoint_epoch_2.pth", "epoch", 30, 2.0, 4)
SNAP = rec("interrupt_checkpoint.pth", "interrupt", 35, None, 5)
MANUAL = rec("mine.pth", "manual", 99, 0.1, 6)


def names(records: list[CheckpointRecord]) -> list[str]:
    return [r.name for r in records]


@pytest.mark.parametrize(
    ("records", "monitor", "mode", "k", "best", "best_k", "kth", "last"),
    [
        # best_model.pth stands in for the rolling file it copies; the kth is the worst of k.
        (
            [E0, E1, BEST, E2],
            "loss",
            "min",
            2,
            "best_model.pth",
            ["best_model.pth", "checkpoint_epoch_2.pth"],
            "checkpoint_epoch_2.pth",
            "checkpoint_epoch_2.pth",
        ),
        # Not yet k of them: no kth (ModelCheckpoint's empty kth_best_model_path).
        (
            [E0, E1, BEST],
            "loss",
            "min",
            3,
            "best_model.pth",
            ["best_model.pth", "checkpoint_epoch_0.pth"],
            None,
            "checkpoint_epoch_1.pth",
        ),
        # mode=max ranks the other way; save_top_k=0 still reports the best.
        (
            [E0, E1, BEST, E2],
            "loss",
            "max",
            0,
            "best_model.pth",
            ["best_model.pth"],
            "best_model.pth",
            "checkpoint_epoch_2.pth",
        ),
        # A newer snapshot is "last"; a manual file is neither last nor among the best.
        (
            [E0, E1, BEST, SNAP, MANUAL],
            "loss",
            "min",
            1,
            "best_model.pth",
            ["best_model.pth"],
            "best_model.pth",
            "interrupt_checkpoint.pth",
        ),
        # No monitor: "best" is the newest rolling checkpoint, as for ModelCheckpoint(monitor=None).
        ([E0, E2, SNAP], None, "min", 1, "checkpoint_epoch_2.pth", [], None, "interrupt_checkpoint.pth"),
        ([], "loss", "min", 1, None, [], None, None),
    ],
)
def test_view(records, monitor, mode, k, best, best_k, kth, last) -> None:  # type: ignore[no-untyped-def]
    v = view(records, monitor, mode, k)
    assert (v.best.name if v.best else None) == best
    assert names(v.best_k) == best_k
    assert (v.kth.name if v.kth else None) == kth
    assert (v.last.name if v.last else None) == last


def test_preemption_settings() -> None:
    assert parse_signals(["SIGTERM", "usr1", int(signal.SIGUSR2), "SIGTERM"]) == (
        signal.SIGTERM,
        signal.SIGUSR1,
        signal.SIGUSR2,
    )
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        parse_signals(["SIGKILL"])
    with pytest.raises(ValueError, match="'SIGNOPE' is not a signal"):
        parse_signals(["SIGNOPE"])
    assert Preemption().exit_code() == 143
    assert Preemption(exit_code=0).exit_code() == 0
    with pytest.raises(ValueError, match="preemption_exit_code"):
        Preemption(exit_code="143")  # type: ignore[arg-type]
