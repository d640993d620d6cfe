"""Checkpoints that the strategy writes as a directory, one shard per rank (FSDP sharded, ModelParallel,
DeepSpeed): the collective part of a save, on top of the store's directory commit (:mod:`.directory`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.records import CheckpointRecord
from ..storage.directory import PendingDirectory
from ..storage.store import CheckpointStore
from ..storage.transaction import Transaction
from . import distributed


def save_sharded(
    store: CheckpointStore,
    trainer: Any,
    checkpoint: dict[str, Any],
    name: str,
    *,
    then: Callable[[Transaction, CheckpointRecord], None] | None = None,
    **fields: Any,
) -> CheckpointRecord | None:
    """Commit a checkpoint the strategy writes as a directory; called on every rank, returns the record
    on rank 0 (None elsewhere). ``then(tx, record)`` adds to rank 0's transaction (a best copy, retention).

    Rank 0 opens the pending directory (a temporary sibling of ``name``, or local staging for an object
    store) and hands its path (or its error) to every rank (:mod:`.distributed`), so that no rank waits
    forever; every rank writes its shard into it; after a barrier rank 0 commits. The strategy broadcasts
    rank 0's path again itself. With an object store all ranks must share rank 0's local disk (one machine).

    Unlike a plain checkpoint, this save is collective (the strategy's own ``save_checkpoint`` is): a rank
    that dies inside it leaves the others waiting until the process group's timeout (``timeout=`` of the
    strategy; torch's default is 30 minutes), not forever.
    """
    begun: list[PendingDirectory] = []

    def begin() -> str:
        begun.append(store.begin_directory(name))
        return begun[0].path

    path = distributed.on_rank_zero(trainer.strategy, trainer.is_global_zero, trainer.world_size, begin)
    pending = begun[0] if begun else None
    try:
        trainer.strategy.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("genesis_save_directory")
        if pending is None:
            return None
        with store.transaction() as tx:
            record = tx.commit_directory(pending, **fields)
            if then is not None:
                then(tx, record)
    finally:
        if pending is not None:
            pending.abort()
    return record
