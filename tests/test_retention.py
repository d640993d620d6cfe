"""Table-driven tests of the pure policies over hand-built records: no I/O, no Trainer."""

from __future__ import annotations

import math

import pytest

from lightning_genesis_ckpt import CheckpointRecord
from lightning_genesis_ckpt.manifest import epoch_name
from lightning_genesis_ckpt.retention import EveryNEpochs, KeepBestK, KeepLastN, is_better, rolling_to_delete


def epochs(*scores: float | None, monitor: str = "loss") -> list[CheckpointRecord]:
    out = []
    for i, s in enumerate(scores):
        out.append(
            CheckpointRecord(
                name=epoch_name(i),
                role="epoch",
                size=1,
                checksum="crc32:0",
                created=float(i),
                seq=i + 1,
                epoch=i,
                metrics={} if s is None else {monitor: s},
                monitor=monitor,
            )
        )
    return out


@pytest.mark.parametrize(
    ("scores", "keep_last", "top_k", "mode", "expected_deleted"),
    [
        ((1, 2, 3, 4), 2, 0, "min", [0, 1]),
        ((1, 2, 3, 4), 2, 1, "min", [1]),  # epoch 0 is best: protected
        ((1, 2, 3, 4), 2, 1, "max", [0, 1]),  # epoch 3 is best and already among the last two
        ((5, 1, 4, 3, 2, 6), 2, 2, "min", [0, 2, 3]),
        ((1, 2, 3), 5, 1, "min", []),
        ((None, None, 3), 1, 2, "min", [0, 1]),  # epochs without the metric are never protected
        ((math.nan, 1, 2), 1, 1, "min", [0]),  # NaN is never best
        ((2, 2, 3), 1, 1, "min", [1]),  # ties: the older commit stays best
    ],
)
def test_rolling_to_delete(scores, keep_last, top_k, mode, expected_deleted) -> None:
    records = epochs(*scores)
    policies = (KeepLastN(keep_last), KeepBestK(top_k, "loss", mode))
    assert rolling_to_delete(records, policies) == [epoch_name(i) for i in expected_deleted]


@pytest.mark.parametrize(
    ("protect", "expected_deleted"),
    [
        ((), [0, 1, 2]),
        ([epoch_name(1)], [0, 2]),  # e.g. resumed explicitly from epoch 1, which just committed again
        ([epoch_name(0), epoch_name(2), "not-a-record.pth"], [1]),
    ],
)
def test_protected_names_are_never_deleted(protect, expected_deleted) -> None:
    assert rolling_to_delete(epochs(4, 3, 2, 1), (KeepLastN(1),), protect) == [
        epoch_name(i) for i in expected_deleted
    ]


def test_epoch_order_is_numeric_not_lexical() -> None:
    records = epochs(*([None] * 12))
    assert KeepLastN(3).keep(records) == {epoch_name(9), epoch_name(10), epoch_name(11)}


def test_only_rolling_records_are_candidates() -> None:
    records = epochs(1, 2)
    best = records[0].with_changes(name="best_model.pth", role="best", seq=10)
    snap = records[0].with_changes(name="interrupt_checkpoint.pth", role="interrupt", seq=11)
    manual = records[0].with_changes(name="mine.pth", role="manual", seq=12)
    assert rolling_to_delete([*records, best, snap, manual], (KeepLastN(1),)) == [epoch_name(0)]


@pytest.mark.parametrize(
    ("candidate", "incumbent", "mode", "better"),
    [
        (1.0, 2.0, "min", True),
        (2.0, 1.0, "min", False),
        (2.0, 1.0, "max", True),
        (1.0, 1.0, "min", False),
        (1.0, None, "min", True),
        (None, 1.0, "min", False),
        (math.nan, 1.0, "max", False),
        (1.0, math.nan, "max", True),
    ],
)
def test_is_better(candidate, incumbent, mode, better) -> None:
    assert is_better(candidate, incumbent, mode) is better


@pytest.mark.parametrize(
    ("n", "epoch", "final", "save"),
    [
        (1, 0, False, True),
        (2, 0, False, False),
        (2, 1, False, True),
        (3, 4, True, True),
        (0, 5, False, False),
        (0, 5, True, True),
    ],
)
def test_every_n_epochs(n, epoch, final, save) -> None:
    assert EveryNEpochs(n).should_save(epoch, final) is save
