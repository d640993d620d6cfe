"""Decisions made on rank 0 and delivered to every rank, with their errors: one helper for all of them.

In the manner of torch.distributed.checkpoint's ``_DistWrapper``: rank 0 runs the step, and every rank
receives its result *or its exception* from the same broadcast. Rank 0 always takes part in the broadcast,
even when its step raised, so no rank is ever left waiting in a collective that rank 0 never joins (which
hangs a job until the process group's timeout). Every rank-0 decision of the callback goes through it: the
checkpoint to resume from, the epoch-end save decision, the start of a sharded save.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Broadcaster(Protocol):
    """What a Lightning strategy offers: ``broadcast(obj, src)`` to every rank, and the rank numbers."""

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


class RankZeroError(RuntimeError):
    """Raised on the other ranks when rank 0 failed with an exception that cannot travel (not picklable)."""


def _portable(error: BaseException) -> BaseException:
    """``error`` itself if it survives pickling (most do), else a :class:`RankZeroError` describing it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RankZeroError(f"rank 0 failed: {type(error).__name__}: {error}")
    return error


def on_rank_zero(strategy: Broadcaster, is_rank_zero: bool, world_size: int, step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0 and return its result on every rank, or raise its exception on every rank.

    With one process, ``step`` simply runs. ``step``'s result must be picklable; so should its exceptions be
    (one that is not arrives elsewhere as a :class:`RankZeroError` with its type and message).
    """
    if world_size <= 1:
        return step()
    if is_rank_zero:
        try:
            result = step()
        except Exception as e:
            strategy.broadcast((False, _portable(e)), src=0)
            raise  # rank 0 raises the original, traceback and all
        strategy.broadcast((True, result), src=0)
        return result
    ok, value = strategy.broadcast(None, src=0)
    if not ok:
        if isinstance(value, BaseException):
            raise value
        raise RankZeroError(f"rank 0 failed: {value!r}")
    received: T = value
    return received
