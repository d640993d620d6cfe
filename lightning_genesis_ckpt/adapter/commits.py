"""What the callback commits: at an epoch end, one transaction (the checkpoint, ``best_model.pth``, retention).

The decisions are pure (:mod:`.save_decision`, :mod:`.preservation`); this module applies them to the store,
so that an epoch's save, its best copy and the deletions it allows commit together with one manifest write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..core.names import BEST_NAME, epoch_name
from ..core.preservation import Mode, PreservationPolicy, RetentionContext, select_deletions
from ..core.records import CheckpointRecord
from ..core.save_decision import EpochInterval, SaveContext, is_better
from ..storage.store import CheckpointStore
from ..storage.transaction import Transaction
from . import distributed


@dataclass(frozen=True)
class EpochDecision:
    """What an epoch end saves: a scheduled checkpoint (``due``), ``best_model.pth`` (``improved``), or both."""

    due: bool
    improved: bool

    def name(self, epoch: int) -> str:
        """The file the state is written to (the best copy, if any, is a copy of it)."""
        return epoch_name(epoch) if self.due else BEST_NAME

    @property
    def role(self) -> str:
        return "epoch" if self.due else "best"


def decide(
    store: CheckpointStore,
    schedule: EpochInterval,
    monitor: str | None,
    mode: Mode,
    value: float | None,
    epoch: int,
    global_step: int,
    is_final: bool,
) -> EpochDecision | None:
    """The epoch-end decision (on rank 0): due by the schedule, improved over ``best_model.pth``."""
    best = store.manifest().get(BEST_NAME)
    improved = monitor is not None and is_better(value, best.metric() if best else None, mode)
    due = schedule.should_save(
        SaveContext(epoch=epoch, global_step=global_step, now=time.time(), is_final=is_final)
    )
    return EpochDecision(due, improved) if due or improved else None


def decide_everywhere(trainer: Any, decide_on_rank_zero: Any) -> EpochDecision | None:
    """Run the decision on rank 0 and hand it (or its error) to every rank: strategies that shard the model
    gather state inside ``dump_checkpoint``, which every rank must then join."""
    return distributed.on_rank_zero(
        trainer.strategy, trainer.is_global_zero, trainer.world_size, decide_on_rank_zero
    )


def retire(
    tx: Transaction,
    record: CheckpointRecord,
    preserve: PreservationPolicy,
    resumed_from: CheckpointRecord | None,
) -> list[str]:
    """Delete, in the transaction, what the preservation policy no longer keeps (the one shared decision)."""
    context = RetentionContext(now=time.time(), just_committed=record, resumed_from=resumed_from)
    return tx.delete(select_deletions(tx.manifest.records.values(), preserve, context))


def commit_epoch(
    store: CheckpointStore,
    checkpoint: dict[str, Any],
    decision: EpochDecision,
    fields: dict[str, Any],
    preserve: PreservationPolicy,
    resumed_from: CheckpointRecord | None,
) -> CheckpointRecord:
    """Write the epoch's checkpoint, copy it to ``best_model.pth`` if it improved, apply retention: one
    transaction, one manifest write. Returns the record written."""
    with store.transaction() as tx:
        record = tx.write(decision.name(fields["epoch"]), checkpoint, role=decision.role, **fields)
        finish(tx, record, decision, preserve, resumed_from)
    return record


def finish(
    tx: Transaction,
    record: CheckpointRecord,
    decision: EpochDecision,
    preserve: PreservationPolicy,
    resumed_from: CheckpointRecord | None,
) -> None:
    """The rest of an epoch's transaction once its checkpoint is written: the best copy, then retention."""
    if decision.due and decision.improved:
        tx.copy(record.name, BEST_NAME, role="best")
    retire(tx, record, preserve, resumed_from)
