"""The callback's retention settings as preservation policies (see :mod:`.preservation`, which decides)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .preservation import AnyOf, BestN, LatestN, Mode, RetentionContext, select_deletions
from .records import CheckpointRecord
from .save_decision import EpochInterval, SaveContext, is_better

__all__ = ["EveryNEpochs", "KeepBestK", "KeepLastN", "Mode", "is_better", "rolling_to_delete"]

KeepLastN = LatestN


class EveryNEpochs:
    """The callback's epoch trigger (see :class:`.EpochInterval`)."""

    def __init__(self, n: int = 1) -> None:
        self.policy = EpochInterval(n)

    def should_save(self, epoch: int, is_final: bool) -> bool:
        return self.policy.should_save(SaveContext(epoch=epoch, global_step=0, now=0.0, is_final=is_final))


def KeepBestK(k: int, monitor: str | None, mode: Mode = "min") -> BestN | None:
    """Top-k protection, or None without a monitor."""
    return BestN(k, monitor, mode) if monitor is not None else None


def rolling_to_delete(
    records: Iterable[CheckpointRecord],
    policies: Sequence[LatestN | BestN | None],
    protect: Iterable[str] = (),
) -> list[str]:
    """Names of scheduled checkpoints that no policy keeps, oldest first (the snapshot is not considered)."""
    records = [r for r in records if r.role != "interrupt"]
    kept = set(protect)
    policy = AnyOf(*(p for p in policies if p is not None))
    return [n for n in select_deletions(records, policy, RetentionContext()) if n not in kept]
