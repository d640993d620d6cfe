"""Checkpoints that the strategy writes as a directory, one shard per rank (FSDP sharded, ModelParallel,
DeepSpeed): the collective part of a save, on top of the store's directory commit (:mod:`.directory`)."""

from __future__ import annotations

from typing import Any

from .records import CheckpointRecord
from .store import CheckpointStore


def save_sharded(
    store: CheckpointStore, trainer: Any, checkpoint: dict[str, Any], name: str, **fields: Any
) -> CheckpointRecord | None:
    """Commit a checkpoint the strategy writes as a directory; called on every rank, returns the record
    on rank 0 (None elsewhere).

    Rank 0 opens the pending directory (a temporary sibling of ``name``, or local staging for an object
    store) and broadcasts its path, even when that failed, so that no rank waits forever; every rank
    writes its shard into it; after a barrier rank 0 commits. The strategy broadcasts rank 0's path
    again itself. With an object store all ranks must share rank 0's local disk (one machine).

    Unlike a plain checkpoint, this save is collective (the strategy's own ``save_checkpoint`` is): a rank
    that dies inside it leaves the others waiting until the process group's timeout (``timeout=`` of the
    strategy; torch's default is 30 minutes), not forever.
    """
    pending, failure = None, None
    if trainer.is_global_zero:
        try:
            pending = store.begin_directory(name)
        except Exception as e:
            failure = e
    path, reason = trainer.strategy.broadcast(
        (None if pending is None else pending.path, None if failure is None else repr(failure)), src=0
    )
    if failure is not None:
        raise failure
    if reason is not None:
        raise RuntimeError(f"rank 0 could not start the checkpoint {store.url_for(name)}: {reason}")
    try:
        trainer.strategy.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("genesis_save_directory")
        if pending is None:
            return None
        with store.transaction() as tx:
            record = tx.commit_directory(pending, **fields)
    finally:
        if pending is not None:
            pending.abort()
    return record
