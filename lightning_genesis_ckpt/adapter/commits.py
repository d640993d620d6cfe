"""What the callback commits at a save point: one transaction (the checkpoint, ``best_model.pth``, retention).

The decisions are pure (:mod:`.save_decision`, :mod:`.preservation`); this module applies them to the store,
so that a save, its best copy and the deletions it allows commit together with one manifest write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..core.names import BEST_NAME, epoch_name, epoch_of_name, step_name
from ..core.preservation import Mode, PreservationPolicy, RetentionContext, select_deletions
from ..core.records import CheckpointRecord
from ..core.save_decision import SaveContext, SaveDecisionPolicy, is_better
from ..storage.store import CheckpointStore
from ..storage.transaction import Transaction
from . import distributed
from .sharded import save_sharded


@dataclass(frozen=True)
class SaveDecision:
    """What a save point writes: a scheduled checkpoint (``due``), ``best_model.pth`` (``improved``), or both.

    ``scheduled`` is the scheduled checkpoint's name (``checkpoint_epoch_{e}.pth`` at an epoch end whose
    epoch interval is due, else ``checkpoint_step_{N}.pth``).
    """

    due: bool
    improved: bool
    scheduled: str

    @property
    def name(self) -> str:
        """The file the state is written to (the best copy, if any, is a copy of it)."""
        return self.scheduled if self.due else BEST_NAME

    @property
    def role(self) -> str:
        if not self.due:
            return "best"
        return "epoch" if epoch_of_name(self.scheduled) is not None else "step"


def scheduled_name(context: SaveContext, epoch_due: bool) -> str:
    """The scheduled checkpoint's name: an epoch's when the epoch interval is due, else the step's."""
    return epoch_name(context.epoch) if epoch_due else step_name(context.global_step)


def decide(
    store: CheckpointStore,
    policy: SaveDecisionPolicy,
    epoch_policy: SaveDecisionPolicy,
    monitor: str | None,
    mode: Mode,
    value: float | None,
    context: SaveContext,
) -> SaveDecision | None:
    """The decision at a save point (on rank 0): due by the policy, improved over ``best_model.pth``.

    ``value`` is the monitored metric *of this moment* (None when it was not produced now): a stale value
    never decides the best.
    """
    improved = False
    if monitor is not None and value is not None:
        best = store.manifest().get(BEST_NAME)
        improved = is_better(value, best.metric() if best else None, mode)
    due = policy.should_save(context)
    if not (due or improved):
        return None
    return SaveDecision(due, improved, scheduled_name(context, epoch_policy.should_save(context)))


def decide_everywhere(trainer: Any, decide_on_rank_zero: Any) -> SaveDecision | None:
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


def commit(
    store: CheckpointStore,
    checkpoint: dict[str, Any],
    decision: SaveDecision,
    fields: dict[str, Any],
    preserve: PreservationPolicy,
    resumed_from: CheckpointRecord | None,
) -> CheckpointRecord:
    """Write the checkpoint, copy it to ``best_model.pth`` if it improved, apply retention: one transaction,
    one manifest write. Returns the record written."""
    with store.transaction() as tx:
        record = tx.write(decision.name, checkpoint, role=decision.role, **fields)
        finish(tx, record, decision, preserve, resumed_from)
    return record


def finish(
    tx: Transaction,
    record: CheckpointRecord,
    decision: SaveDecision,
    preserve: PreservationPolicy,
    resumed_from: CheckpointRecord | None,
) -> None:
    """The rest of a save's transaction once its checkpoint is written: the best copy, then retention."""
    if decision.due and decision.improved:
        tx.copy(record.name, BEST_NAME, role="best")
    retire(tx, record, preserve, resumed_from)


def commit_sharded(
    store: CheckpointStore,
    trainer: Any,
    checkpoint: dict[str, Any],
    decision: SaveDecision,
    fields: dict[str, Any],
    preserve: PreservationPolicy,
    resumed_from: CheckpointRecord | None,
) -> CheckpointRecord | None:
    """:func:`commit` for a strategy that shards the state: called on every rank, each writing its shard
    through the strategy; rank 0 finishes the transaction. Returns the record on rank 0, else None."""
    return save_sharded(
        store,
        trainer,
        checkpoint,
        decision.name,
        role=decision.role,
        then=lambda tx, record: finish(tx, record, decision, preserve, resumed_from),
        **fields,
    )
