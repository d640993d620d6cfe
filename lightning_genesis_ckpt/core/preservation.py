"""What do we keep? Preservation policies over checkpoint records, and the one function that decides deletions.

Pure: a policy is data plus a function of records, with no I/O, in the manner of Orbax's
``PreservationPolicy``. The callback, :class:`~lightning_genesis_ckpt.CheckpointManager` and
``genesis-ckpt prune`` all call :func:`select_deletions`, so one directory is treated alike by all three::

    AnyOf(LatestN(3), BestN(1, "val_loss"), EveryNSteps(10_000))  # the last 3, the best, every 10k steps

Only checkpoints saved on a schedule (roles ``"epoch"`` and ``"step"``) are ever candidates; best, interrupt,
manual and version records are never deleted by a policy. The interrupt snapshot is retired by its own rule,
once a kept checkpoint with at least as much training exists.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from .names import INTERRUPT_NAME, ROLLING_ROLES
from .ordering import at_least_as_much_training, more_training, progress
from .records import CheckpointRecord

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class RetentionContext:
    """What a deletion decision needs besides the records.

    Attributes:
        now: the current Unix time (for time-based policies).
        just_committed: the checkpoint the caller has just committed: never deleted (an explicit
            ``ckpt_path`` can resume from an epoch older than those a policy keeps).
        resumed_from: the checkpoint the run resumed from: kept until a checkpoint with more training has
            committed, so that a crash right after resuming never loses the state it resumed.
    """

    now: float = 0.0
    just_committed: CheckpointRecord | None = None
    resumed_from: CheckpointRecord | None = None


class PreservationPolicy(Protocol):
    """Chooses which scheduled checkpoints to keep."""

    def keep(self, candidates: Sequence[CheckpointRecord], context: RetentionContext) -> set[str]:
        """The names among ``candidates`` this policy preserves."""
        ...


def _positive(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be positive, got {value!r}")


def _seconds(duration: float | datetime.timedelta) -> float:
    return duration.total_seconds() if isinstance(duration, datetime.timedelta) else float(duration)


@dataclass(frozen=True)
class LatestN:
    """Keep the ``n`` checkpoints with the most training (steps, else epoch number, else commit order)."""

    n: int

    def __post_init__(self) -> None:
        _positive(self.n, "LatestN(n)")

    def keep(self, candidates: Sequence[CheckpointRecord], context: RetentionContext) -> set[str]:
        """The names of the ``n`` newest ``candidates`` (by training progress)."""
        return {r.name for r in sorted(candidates, key=progress, reverse=True)[: self.n]}


def rank_by_metric(records: Iterable[CheckpointRecord], monitor: str, mode: Mode) -> list[CheckpointRecord]:
    """Records that have a finite ``monitor`` value, best first (the older commit wins a tie)."""
    scored = [r for r in records if (v := r.metrics.get(monitor)) is not None and not math.isnan(v)]
    sign = 1.0 if mode == "min" else -1.0
    return sorted(scored, key=lambda r: (sign * r.metrics[monitor], r.seq))


@dataclass(frozen=True)
class BestN:
    """Keep the ``n`` checkpoints with the best ``monitor`` value (``mode``: lower or higher is better).

    Checkpoints without a finite value of the metric are never kept by this policy; ``n=0`` keeps none.
    """

    n: int
    monitor: str
    mode: Mode = "min"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"BestN(n) must be 0 or a positive int, got {self.n!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"BestN(mode={self.mode!r}) is invalid: use 'min' or 'max'")

    def keep(self, candidates: Sequence[CheckpointRecord], context: RetentionContext) -> set[str]:
        """The names of the ``n`` best ``candidates`` by ``monitor``; records without the metric are not kept."""
        return {r.name for r in rank_by_metric(candidates, self.monitor, self.mode)[: self.n]}


@dataclass(frozen=True)
class EveryNSteps:
    """Keep every checkpoint taken at a multiple of ``n`` optimizer steps (a permanent one every 10,000)."""

    n: int

    def __post_init__(self) -> None:
        _positive(self.n, "EveryNSteps(n)")

    def keep(self, candidates: Sequence[CheckpointRecord], context: RetentionContext) -> set[str]:
        """The names of the ``candidates`` saved at a multiple of ``n`` steps."""
        return {r.name for r in candidates if r.global_step is not None and r.global_step % self.n == 0}


@dataclass(frozen=True)
class EveryNSeconds:
    """Keep one checkpoint per ``interval`` of wall time: the first one saved at least ``interval`` after the
    last one kept, walking in the order they were saved."""

    interval: float | datetime.timedelta

    def __post_init__(self) -> None:
        _positive(_seconds(self.interval), "EveryNSeconds(interval)")

    def keep(self, candidates: Sequence[CheckpointRecord], context: RetentionContext) -> set[str]:
        """The names of the first candidate in each ``interval`` of wall time."""
        interval = _seconds(self.interval)
        kept: set[str] = set()
        last: float | None = None
        for r in sorted(candidates, key=lambda r: (r.created, r.seq)):
            if last is None or r.created - last >= interval:
                kept.add(r.name)
                last = r.created
        return kept


@dataclass(frozen=True)
class KeepFor:
    """Keep every checkpoint saved within the last ``duration`` (a ``timedelta`` or seconds)."""

    duration: float | datetime.timedelta

    def __post_init__(self) -> None:
        _positive(_seconds(self.duration), "KeepFor(duration)")

    def keep(self, candidates: Sequence[CheckpointRecord], context: RetentionContext) -> set[str]:
        """The names of the ``candidates`` saved within ``duration`` of ``context.now``."""
        oldest = context.now - _seconds(self.duration)
        return {r.name for r in candidates if r.created >= oldest}


class AnyOf:
    """Keep what any of ``policies`` keeps."""

    def __init__(self, *policies: PreservationPolicy) -> None:
        if not policies:
            raise ValueError("AnyOf() needs at least one policy")
        self.policies = policies

    def keep(self, candidates: Sequence[CheckpointRecord], context: RetentionContext) -> set[str]:
        """The union of what each of ``policies`` keeps."""
        kept: set[str] = set()
        for policy in self.policies:
            kept |= policy.keep(candidates, context)
        return kept

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.policies))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnyOf) and self.policies == other.policies

    def __hash__(self) -> int:
        return hash(self.policies)


def select_deletions(
    records: Iterable[CheckpointRecord], policy: PreservationPolicy, context: RetentionContext
) -> list[str]:
    """The names to delete, least training first: the one decision every caller makes this way.

    Scheduled checkpoints that ``policy`` does not keep, except the one just committed and the one resumed
    from until a checkpoint with more training has committed; then the interrupt snapshot, once a kept
    scheduled checkpoint with at least as much training exists.
    """
    records = list(records)
    rolling = [r for r in records if r.role in ROLLING_ROLES]
    protected = set()
    if context.just_committed is not None:
        protected.add(context.just_committed.name)
    source = context.resumed_from
    if source is not None and (
        context.just_committed is None or not more_training(context.just_committed, source)
    ):
        protected.add(source.name)
    kept = policy.keep(rolling, context) | protected
    doomed = sorted((r for r in rolling if r.name not in kept), key=progress)
    snapshot = next((r for r in records if r.name == INTERRUPT_NAME and r.role == "interrupt"), None)
    if snapshot is not None and snapshot.name not in protected:
        survivors = [r for r in rolling if r.name in kept]
        if any(at_least_as_much_training(r, snapshot) for r in survivors):
            doomed.append(snapshot)
    return [r.name for r in doomed]
