"""Orders over checkpoint records: training progress, and the order in which resume tries candidates. Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .names import RESUMABLE_ROLES, epoch_of_name, step_of_name
from .records import CheckpointRecord

OrderKey = Callable[[CheckpointRecord], Any]


def _compared(a: CheckpointRecord, b: CheckpointRecord) -> tuple[float, float]:
    """The two records' progress in the finest measure both record: steps, else epochs, else commit order."""
    a_steps = a.global_step if a.global_step is not None else step_of_name(a.name)
    b_steps = b.global_step if b.global_step is not None else step_of_name(b.name)
    if a_steps is not None and b_steps is not None:
        return a_steps, b_steps
    a_epoch = a.epoch if a.epoch is not None else epoch_of_name(a.name)
    b_epoch = b.epoch if b.epoch is not None else epoch_of_name(b.name)
    if a_epoch is not None and b_epoch is not None:
        return a_epoch, b_epoch
    return a.seq, b.seq + 0.5  # commit order: "as much" then means "later"


def compare_progress(a: CheckpointRecord, b: CheckpointRecord) -> int:
    """-1, 0 or 1 as ``a`` holds less, as much or more training than ``b`` (then the later commit is newer)."""
    x, y = _compared(a, b)
    if x != y:
        return -1 if x < y else 1
    return (a.seq > b.seq) - (a.seq < b.seq)


class _Progress:
    """A sort key comparing records with :func:`compare_progress`."""

    __slots__ = ("record",)

    def __init__(self, record: CheckpointRecord) -> None:
        self.record = record

    def __lt__(self, other: _Progress) -> bool:
        return compare_progress(self.record, other.record) < 0

    def __gt__(self, other: _Progress) -> bool:
        return compare_progress(self.record, other.record) > 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Progress) and compare_progress(self.record, other.record) == 0

    def __hash__(self) -> int:
        return hash(self.record.seq)


def progress(record: CheckpointRecord) -> _Progress:
    """Sort key by training progress: optimizer steps where both records have them, else epochs (numeric,
    from the name if need be), else commit order. Works for epoch and step checkpoints, and for plain loops
    that record no steps, alike."""
    return _Progress(record)


def at_least_as_much_training(a: CheckpointRecord, b: CheckpointRecord) -> bool:
    """Whether ``a`` holds at least as much training as ``b`` (steps, else epochs, else a later commit)."""
    x, y = _compared(a, b)
    return x >= y


def more_training(a: CheckpointRecord, b: CheckpointRecord) -> bool:
    """Whether ``a`` holds strictly more training than ``b``."""
    x, y = _compared(a, b)
    return x > y


def most_steps_first(record: CheckpointRecord) -> tuple[int, bool, int]:
    """The callback's order: most optimizer steps; at equal steps a scheduled or interrupt checkpoint beats
    ``best_model.pth`` (usually a copy of one of them), then the later commit wins."""
    steps = -1 if record.global_step is None else record.global_step
    return (steps, record.role != "best", record.seq)


def interrupt_then_epoch(record: CheckpointRecord) -> tuple[bool, Any]:
    """The ``CheckpointManager`` order: the interrupt snapshot, then the most training (epoch numbers,
    numeric, not lexical: plain loops record no step count)."""
    return (record.role == "interrupt", progress(record))


def candidates(
    records: Iterable[CheckpointRecord],
    *,
    roles: Sequence[str] = RESUMABLE_ROLES,
    key: OrderKey = most_steps_first,
) -> list[CheckpointRecord]:
    """Records with one of ``roles``, newest training state first by ``key`` (largest key first)."""
    usable = [r for r in records if r.role in roles]
    return sorted(usable, key=key, reverse=True)
