"""Pure policies over checkpoint records: "should we save now?" and "what do we keep?". No I/O here."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .manifest import CheckpointRecord, epoch_of_name

Mode = Literal["min", "max"]


def is_better(candidate: float | None, incumbent: float | None, mode: Mode) -> bool:
    """Whether ``candidate`` beats ``incumbent`` under ``mode``. NaN and None never win."""
    if candidate is None or math.isnan(candidate):
        return False
    if incumbent is None or math.isnan(incumbent):
        return True
    return candidate < incumbent if mode == "min" else candidate > incumbent


def epoch_order(record: CheckpointRecord) -> tuple[int, int]:
    """Sort key: numeric epoch order (epoch 10 is newer than epoch 9), commit order as the tie-break."""
    epoch = record.epoch if record.epoch is not None else epoch_of_name(record.name)
    return (epoch if epoch is not None else -1, record.seq)


def rank_by_metric(records: Iterable[CheckpointRecord], monitor: str, mode: Mode) -> list[CheckpointRecord]:
    """Records that have a finite ``monitor`` value, best first (older commit wins a tie)."""
    scored = [r for r in records if r.metrics.get(monitor) is not None and not math.isnan(r.metrics[monitor])]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda r: (sign * r.metrics[monitor], r.seq))


@dataclass(frozen=True)
class EveryNEpochs:
    """Save a rolling checkpoint after every ``n``-th epoch, and after the final one."""

    n: int = 1

    def should_save(self, epoch: int, is_final: bool) -> bool:
        return is_final or (self.n > 0 and (epoch + 1) % self.n == 0)


@dataclass(frozen=True)
class KeepLastN:
    """Keep the ``n`` newest rolling checkpoints by epoch number."""

    n: int

    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        newest = sorted(records, key=epoch_order, reverse=True)[: self.n]
        return {r.name for r in newest}


@dataclass(frozen=True)
class KeepBestK:
    """Keep the ``k`` rolling checkpoints with the best ``monitor`` value."""

    k: int
    monitor: str | None
    mode: Mode = "min"

    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        if self.monitor is None or self.k <= 0:
            return set()
        return {r.name for r in rank_by_metric(records, self.monitor, self.mode)[: self.k]}


def rolling_to_delete(
    records: Iterable[CheckpointRecord],
    policies: Sequence[KeepLastN | KeepBestK],
    protect: Iterable[str] = (),
) -> list[str]:
    """Names of rolling (``role == "epoch"``) checkpoints that no policy keeps, oldest first.

    Only rolling checkpoints are ever candidates: best, interrupt and manual records are not touched, nor
    the names in ``protect`` (the checkpoint just committed, the one the run resumed from).
    """
    rolling = [r for r in records if r.role == "epoch"]
    kept: set[str] = set(protect)
    for policy in policies:
        kept |= policy.keep(rolling)
    return [r.name for r in sorted(rolling, key=epoch_order) if r.name not in kept]
