"""Should we save now? Save-decision policies: small pure objects, in the manner of Orbax's ``SaveDecisionPolicy``.

Each takes a :class:`SaveContext` (where training is, what just happened, and when the last checkpoint was
saved) and answers yes or no; :class:`AnySave` combines them. The callback asks at three kinds of moment
(``SaveContext.event``): after an optimizer step (``"step"``), at the end of a validation run in the middle
of an epoch (``"validation"``), and at the end of an epoch (``"epoch"``, after the epoch's own validation).
:class:`EpochInterval` answers only at epoch ends, :class:`AfterValidation` when a validation run has just
ended, :class:`StepInterval` and :class:`TimeInterval` at any of them (an epoch end is a step boundary too).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Literal, Protocol

Mode = Literal["min", "max"]
Event = Literal["step", "validation", "epoch"]


@dataclass(frozen=True)
class SaveContext:
    """Where training stands when a save is considered.

    Attributes:
        epoch: the current epoch (counted from 0).
        global_step: optimizer steps taken so far.
        now: the current Unix time.
        is_final: this is the last epoch (or step) of the run.
        last_step: the step of the last checkpoint saved on a schedule, if any.
        last_time: when that checkpoint (or, before the first one, training) started.
        event: what has just happened: an optimizer step, a validation run mid-epoch, or an epoch's end.
        validated: a validation run has ended at this step (and no optimizer step has run since).
    """

    epoch: int
    global_step: int
    now: float
    is_final: bool = False
    last_step: int | None = None
    last_time: float | None = None
    event: Event = "epoch"
    validated: bool = False


class SaveDecisionPolicy(Protocol):
    """Decides whether a scheduled checkpoint is due."""

    def should_save(self, context: SaveContext) -> bool:
        """True when a checkpoint should be saved now."""
        ...


def _count(value: int, what: str, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be {'0 or ' if allow_zero else ''}a positive int, got {value!r}")


@dataclass(frozen=True)
class EpochInterval:
    """At the end of every ``n``-th epoch, and always after the final one (``n=0``: the final one only)."""

    n: int = 1

    def __post_init__(self) -> None:
        _count(self.n, "EpochInterval(n)", allow_zero=True)

    def should_save(self, context: SaveContext) -> bool:
        if context.event != "epoch":
            return False
        return context.is_final or (self.n > 0 and (context.epoch + 1) % self.n == 0)


@dataclass(frozen=True)
class StepInterval:
    """At every ``n``-th optimizer step (once per step, however often it is asked)."""

    n: int

    def __post_init__(self) -> None:
        _count(self.n, "StepInterval(n)")

    def should_save(self, context: SaveContext) -> bool:
        step = context.global_step
        return step > 0 and step % self.n == 0 and context.last_step != step


@dataclass(frozen=True)
class TimeInterval:
    """Once at least ``interval`` (a ``timedelta`` or seconds) has passed since the last save."""

    interval: float | datetime.timedelta

    def __post_init__(self) -> None:
        seconds = self.seconds
        if not seconds > 0:
            raise ValueError(f"TimeInterval(interval) must be positive, got {self.interval!r}")

    @property
    def seconds(self) -> float:
        if isinstance(self.interval, datetime.timedelta):
            return self.interval.total_seconds()
        return float(self.interval)

    def should_save(self, context: SaveContext) -> bool:
        return context.last_time is None or context.now - context.last_time >= self.seconds


@dataclass(frozen=True)
class AfterValidation:
    """After every validation run: mid-epoch ones (``val_check_interval < 1``, or a step count) and those at
    the end of an epoch (every ``check_val_every_n_epoch``-th), which the epoch-end save then covers."""

    def should_save(self, context: SaveContext) -> bool:
        return context.validated and context.last_step != context.global_step


class AnySave:
    """Save when any of ``policies`` says so."""

    def __init__(self, *policies: SaveDecisionPolicy) -> None:
        if not policies:
            raise ValueError("AnySave() needs at least one policy")
        self.policies = policies

    def should_save(self, context: SaveContext) -> bool:
        return any(p.should_save(context) for p in self.policies)

    def __repr__(self) -> str:
        return f"AnySave({', '.join(map(repr, self.policies))})"


def is_better(candidate: float | None, incumbent: float | None, mode: Mode) -> bool:
    """Whether ``candidate`` beats ``incumbent`` under ``mode`` (the best-model decision). NaN and None never
    win; anything beats a missing or NaN incumbent."""
    if candidate is None or math.isnan(candidate):
        return False
    if incumbent is None or math.isnan(incumbent):
        return True
    return candidate < incumbent if mode == "min" else candidate > incumbent
