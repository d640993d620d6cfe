"""The interrupt snapshot: ``interrupt_checkpoint.pth``, taken when ``fit`` is interrupted or crashes.

A snapshot is one transaction of its own (the state, under its standard name); it is retired by the
preservation rule once a checkpoint with at least as much training has committed
(:func:`~lightning_genesis_ckpt.core.preservation.select_deletions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..core.names import INTERRUPT_NAME
from ..core.records import CheckpointRecord
from ..storage.store import CheckpointStore
from . import fit_state
from ._lightning import dump_checkpoint, writes_directory
from .sharded import save_sharded

log = logging.getLogger(__name__)


def inexact_reason(trainer: Any) -> str | None:
    """Why a snapshot taken now would not resume bit-identically because of when it is taken, or None."""
    if not fit_state.mid_epoch(trainer):
        return None
    pending = fit_state.batches_since_optimizer_step(trainer)
    if pending:
        return (
            f"the snapshot is taken between two gradient-accumulation steps: the gradients of the last {pending} "
            "batch(es) since the optimizer step are not in it, so the resumed run differs from an "
            "uninterrupted one (preemption signals wait for the optimizer step instead)"
        )
    # A loader that is not fast-forwarded is warned about by the fast-forward itself, once per fit, at the
    # first mid-epoch save (this one, or an earlier step checkpoint), when the snapshot's state is captured.
    return None


def warn_not_taken(store: CheckpointStore, newest: CheckpointRecord | None, what: str, reason: str) -> None:
    """A preempted run that gets no snapshot says so, and names what the next run resumes from."""
    log.warning(
        "stopped by %s %s: no snapshot; the newest committed checkpoint is %s",
        what,
        reason,
        store.url_for(newest.name) if newest else "none (nothing to resume from)",
    )


def take(
    store: CheckpointStore,
    trainer: Any,
    *,
    monitor: str | None,
    what: str,
    check_types: Callable[[dict[str, Any], str], None],
    elapsed: Callable[[], float | None],
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> CheckpointRecord | None:
    """Commit the snapshot of ``trainer`` (called on every rank; rank 0 writes). Never raises for a failed
    save: the exception that interrupted ``fit`` is what the user must see; the failure is logged.

    ``what`` names the interruption in the log line; ``elapsed()`` the seconds since a preemption signal;
    ``prepare`` turns the checkpoint dict into what is written (frozen exclusion), on rank 0.
    """
    sharded = writes_directory(trainer.strategy)
    if sharded and trainer.world_size > 1:
        # A sharded snapshot needs every rank inside the same collective save; after an exception the other
        # ranks may be anywhere (or dead), and waiting for them could hang the job.
        log.warning(
            "fit interrupted by %s: no snapshot, because a sharded checkpoint needs all %d ranks and they cannot "
            "be gathered safely after an exception; the newest committed checkpoint is used to resume",
            what,
            trainer.world_size,
        )
        return None
    if not trainer.is_global_zero:
        return None
    reason = inexact_reason(trainer)
    if reason is not None:
        log.warning("%s", reason)
    fields = {
        "role": "interrupt",
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "metrics": fit_state.scalar_metrics(trainer),
        "monitor": monitor,
    }
    try:
        checkpoint = dump_checkpoint(trainer)
        check_types(checkpoint, INTERRUPT_NAME)
        if prepare is not None and not sharded:
            checkpoint = prepare(checkpoint)
        if sharded:
            record = save_sharded(store, trainer, checkpoint, INTERRUPT_NAME, **fields)
        else:
            record = store.save(INTERRUPT_NAME, checkpoint, **fields)
    except Exception as e:
        log.error("could not save the interrupt snapshot to %s: %s", store.url_for(INTERRUPT_NAME), e)
        return None
    seconds = elapsed()
    log.warning(
        "fit interrupted by %s: snapshot saved to %s (epoch %d, step %d)%s; run again to resume",
        what,
        store.url_for(INTERRUPT_NAME),
        trainer.current_epoch,
        trainer.global_step,
        "" if seconds is None else f", committed {seconds:.2f} s after the signal",
    )
    return record
