"""Preservation and save-decision policies: pure functions, table-driven over hand-built records, no I/O."""

from __future__ import annotations

import datetime
import math

import pytest

from lightning_genesis_ckpt.core.preservation import (
    AnyOf,
    BestN,
    EveryNSeconds,
    EveryNSteps,
    KeepFor,
    LatestN,
    RetentionContext,
    select_deletions,
)
from lightning_genesis_ckpt.core.records import CheckpointRecord
from lightning_genesis_ckpt.core.save_decision import (
    AnySave,
    EpochInterval,
    SaveContext,
    StepInterval,
    TimeInterval,
    is_better,
)

T0 = 1_700_000_000.0


def rec(
    name: str,
    role: str = "epoch",
    *,
    step: int | None = None,
    epoch: int | None = None,
    loss: float | None = None,
    seq: int = 0,
    created: float | None = None,
) -> CheckpointRecord:
    return CheckpointRecord(
        name=name,
        role=role,
        size=1,
        checksum="crc32:00000000",
        created=T0 + (seq if created is None else created),
        seq=seq,
        epoch=epoch,
        global_step=step,
        metrics={} if loss is None else {"loss": loss},
        monitor=None if loss is None else "loss",
    )


def epochs(*losses: float) -> list[CheckpointRecord]:
    """Rolling checkpoints of epochs 0.. with these losses, 10 steps an epoch, committed in order."""
    return [
        rec(f"checkpoint_epoch_{e}.pth", step=10 * (e + 1), epoch=e, loss=loss, seq=e + 1)
        for e, loss in enumerate(losses)
    ]


def steps(*numbers: int, every_s: float = 60.0) -> list[CheckpointRecord]:
    """Step checkpoints at these global steps, one every ``every_s`` seconds."""
    return [
        rec(f"checkpoint_step_{n}.pth", "step", step=n, seq=i + 1, created=i * every_s)
        for i, n in enumerate(numbers)
    ]


def names(records: list[CheckpointRecord], *picks: int) -> list[str]:
    return [records[i].name for i in picks]


EPOCHS = epochs(0.5, 0.2, 0.4, 0.3, 0.6)
STEPS = steps(1000, 2000, 3000, 10_000, 11_000, 12_000, 20_000, 21_000)


@pytest.mark.parametrize(
    ("records", "policy", "deleted"),
    [
        (EPOCHS, LatestN(2), names(EPOCHS, 0, 1, 2)),
        (EPOCHS, LatestN(10), []),
        (EPOCHS, AnyOf(LatestN(1), BestN(1, "loss")), names(EPOCHS, 0, 2, 3)),
        (EPOCHS, AnyOf(LatestN(1), BestN(2, "loss")), names(EPOCHS, 0, 2)),
        (EPOCHS, AnyOf(LatestN(1), BestN(1, "loss", mode="max")), names(EPOCHS, 0, 1, 2, 3)),
        (EPOCHS, AnyOf(LatestN(1), BestN(2, "loss", mode="max")), names(EPOCHS, 1, 2, 3)),
        (EPOCHS, BestN(0, "loss"), names(EPOCHS, 0, 1, 2, 3, 4)),
        (EPOCHS, BestN(1, "not_logged"), names(EPOCHS, 0, 1, 2, 3, 4)),
        (STEPS, AnyOf(LatestN(2), EveryNSteps(10_000)), names(STEPS, 0, 1, 2, 4, 5)),
        (STEPS, EveryNSteps(10_000), names(STEPS, 0, 1, 2, 4, 5, 7)),
        # One per 5 minutes, the first of each window: steps of minutes 0, 5 (2nd window starts at 300 s).
        (STEPS, EveryNSeconds(300), names(STEPS, 1, 2, 3, 4, 6, 7)),
        (STEPS, AnyOf(LatestN(1), KeepFor(datetime.timedelta(minutes=3))), names(STEPS, 0, 1, 2, 3, 4)),
        # Epoch and step checkpoints are one sequence by training progress.
        (epochs(0.1, 0.2) + steps(5, 25), LatestN(2), ["checkpoint_step_5.pth", "checkpoint_epoch_0.pth"]),
    ],
)
def test_select_deletions(records: list[CheckpointRecord], policy, deleted: list[str]) -> None:
    now = STEPS[-1].created + 30
    assert select_deletions(records, policy, RetentionContext(now=now)) == deleted


def test_numeric_order_not_lexical() -> None:
    records = [rec(f"checkpoint_epoch_{e}.pth", epoch=e, seq=e + 1) for e in (9, 10, 11)]
    assert select_deletions(records, LatestN(2), RetentionContext()) == ["checkpoint_epoch_9.pth"]
    named = [
        rec(f"checkpoint_step_{n}.pth", "step", step=n, seq=10 - i) for i, n in enumerate((900, 1000, 99))
    ]
    assert select_deletions(named, LatestN(1), RetentionContext()) == [
        "checkpoint_step_99.pth",
        "checkpoint_step_900.pth",
    ]


def test_only_rolling_records_are_candidates() -> None:
    records = [
        *EPOCHS,
        rec("best_model.pth", "best", step=20, loss=0.2, seq=10),
        rec("version_v1.pth", "version", step=10, seq=11),
        rec("notes.pth", "manual", seq=12),
    ]
    assert select_deletions(records, LatestN(1), RetentionContext()) == names(EPOCHS, 0, 1, 2, 3)


@pytest.mark.parametrize(
    ("context", "deleted"),
    [
        (RetentionContext(), names(EPOCHS, 0, 1, 2, 3)),
        # The checkpoint just committed is never deleted (an explicit ckpt_path resumed an old epoch).
        (RetentionContext(just_committed=EPOCHS[1]), names(EPOCHS, 0, 2, 3)),
        # The one the run resumed from stays until a checkpoint with more training has committed.
        (
            RetentionContext(
                just_committed=rec("interrupt_checkpoint.pth", "interrupt", step=10, seq=9),
                resumed_from=EPOCHS[0],
            ),
            names(EPOCHS, 1, 2, 3),
        ),
        (
            RetentionContext(just_committed=rec("x.pth", step=11, seq=9), resumed_from=EPOCHS[0]),
            names(EPOCHS, 0, 1, 2, 3),
        ),
    ],
)
def test_protection(context: RetentionContext, deleted: list[str]) -> None:
    assert select_deletions(EPOCHS, LatestN(1), context) == deleted


SNAPSHOT = rec("interrupt_checkpoint.pth", "interrupt", step=25, epoch=2, seq=6)


@pytest.mark.parametrize(
    ("records", "retired"),
    [
        # Retired once a checkpoint with at least as much training has committed...
        ([*EPOCHS[:2], SNAPSHOT, rec("checkpoint_epoch_2.pth", step=30, epoch=2, seq=7)], True),
        ([*EPOCHS[:2], SNAPSHOT, rec("checkpoint_step_25.pth", "step", step=25, seq=7)], True),
        # ...never before: a best copy or an older checkpoint does not count.
        ([*EPOCHS[:2], SNAPSHOT], False),
        ([*EPOCHS[:2], SNAPSHOT, rec("best_model.pth", "best", step=40, seq=7)], False),
        # Plain loops record epochs only: the epoch the snapshot interrupted, once finished, supersedes it.
        (
            [
                rec("interrupt_checkpoint.pth", "interrupt", epoch=2, seq=3),
                rec("checkpoint_epoch_2.pth", epoch=2, seq=4),
            ],
            True,
        ),
        (
            [
                rec("interrupt_checkpoint.pth", "interrupt", epoch=2, seq=3),
                rec("checkpoint_epoch_1.pth", epoch=1, seq=4),
            ],
            False,
        ),
        # No progress recorded at all: a later commit supersedes it.
        ([rec("interrupt_checkpoint.pth", "interrupt", seq=3), rec("checkpoint_epoch_4.pth", seq=4)], True),
        ([rec("checkpoint_epoch_4.pth", seq=2), rec("interrupt_checkpoint.pth", "interrupt", seq=3)], False),
    ],
)
def test_the_interrupt_snapshot_rule(records: list[CheckpointRecord], retired: bool) -> None:
    deleted = select_deletions(records, LatestN(100), RetentionContext())
    assert ("interrupt_checkpoint.pth" in deleted) == retired


def test_a_superseding_checkpoint_deleted_in_the_same_pass_does_not_count() -> None:
    records = [*EPOCHS[:2], SNAPSHOT, rec("checkpoint_epoch_2.pth", step=30, epoch=2, loss=0.4, seq=7)]
    assert select_deletions(records, BestN(1, "loss"), RetentionContext()) == [
        *names(EPOCHS, 0),
        "checkpoint_epoch_2.pth",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: LatestN(0),
        lambda: BestN(-1, "x"),
        lambda: EveryNSteps(0),
        lambda: EveryNSeconds(0),
        lambda: KeepFor(-5),
        lambda: AnyOf(),
    ],
)
def test_invalid_policies_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize(
    ("candidate", "incumbent", "mode", "better"),
    [
        (0.1, 0.2, "min", True),
        (0.3, 0.2, "min", False),
        (0.3, 0.2, "max", True),
        (0.2, 0.2, "min", False),
        (0.2, None, "min", True),
        (math.nan, 0.2, "min", False),
        (0.2, math.nan, "max", True),
        (None, 0.2, "min", False),
    ],
)
def test_is_better(candidate, incumbent, mode, better) -> None:
    assert is_better(candidate, incumbent, mode) is better


def ctx(
    epoch: int = 0, step: int = 0, *, final: bool = False, now: float = T0, last_step=None, last_time=None
):
    return SaveContext(
        epoch=epoch, global_step=step, now=now, is_final=final, last_step=last_step, last_time=last_time
    )


@pytest.mark.parametrize(
    ("policy", "context", "save"),
    [
        (EpochInterval(1), ctx(0), True),
        (EpochInterval(3), ctx(1), False),
        (EpochInterval(3), ctx(2), True),
        (EpochInterval(3), ctx(1, final=True), True),
        (EpochInterval(0), ctx(5), False),
        (EpochInterval(0), ctx(5, final=True), True),
        (StepInterval(100), ctx(step=300), True),
        (StepInterval(100), ctx(step=350), False),
        (StepInterval(100), ctx(step=300, last_step=300), False),
        (TimeInterval(datetime.timedelta(minutes=30)), ctx(now=T0 + 1700, last_time=T0), False),
        (TimeInterval(1800), ctx(now=T0 + 1800, last_time=T0), True),
        (TimeInterval(1800), ctx(now=T0), True),
        (AnySave(StepInterval(100), TimeInterval(1800)), ctx(step=350, now=T0 + 1800, last_time=T0), True),
        (AnySave(StepInterval(100), TimeInterval(1800)), ctx(step=350, now=T0 + 10, last_time=T0), False),
    ],
)
def test_save_decisions(policy, context: SaveContext, save: bool) -> None:
    assert policy.should_save(context) is save
