"""ModelCheckpoint's attributes, computed from manifest records: what Lightning and its ecosystem read.

``Trainer.test(ckpt_path="best")`` reads ``best_model_path``; MLflow, W&B and Neptune loggers read
``best_model_path``, ``best_model_score``, ``last_model_path``, ``current_score`` and ``best_k_models`` to
upload checkpoints; user code reads ``kth_best_model_path`` / ``kth_value``. Pure functions over records, so
the values are whatever the manifest says: correct after a resume, in a new process, for any store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..core.names import BEST_NAME, RESUMABLE_ROLES, ROLLING_ROLES
from ..core.ordering import most_steps_first
from ..core.preservation import Mode, rank_by_metric
from ..core.records import CheckpointRecord


@dataclass(frozen=True)
class CheckpointView:
    """The records behind ModelCheckpoint's attributes (see :func:`view`)."""

    best: CheckpointRecord | None = None
    best_k: list[CheckpointRecord] = field(default_factory=list)
    kth: CheckpointRecord | None = None
    last: CheckpointRecord | None = None


def _same_state(a: CheckpointRecord, b: CheckpointRecord) -> bool:
    # best_model.pth is a hard link or server-side copy of a rolling checkpoint: same bytes, same step.
    return a.checksum == b.checksum and a.size == b.size and a.global_step == b.global_step


def view(records: Iterable[CheckpointRecord], monitor: str | None, mode: Mode, k: int) -> CheckpointView:
    """ModelCheckpoint's meanings, over our files.

    * ``best``: ``best_model.pth`` when a ``monitor`` is set; without one, the newest rolling checkpoint
      (ModelCheckpoint's ``monitor=None`` keeps "the best" as the latest).
    * ``best_k``: the ``k`` best checkpoints by ``monitor``, best first; ``best_model.pth`` stands in for
      the rolling checkpoint it is a copy of, so ``best`` is always among them. Empty without a monitor.
    * ``kth``: the worst of ``best_k`` once it holds ``k`` records (ModelCheckpoint's ``kth_best_model_path``).
    * ``last``: the newest training state (most optimizer steps; what auto-resume tries first).
    """
    records = list(records)
    training = [r for r in records if r.role in RESUMABLE_ROLES]
    last = max(training, key=most_steps_first, default=None)
    rolling = [r for r in records if r.role in ROLLING_ROLES]
    if monitor is None:
        return CheckpointView(best=max(rolling, key=most_steps_first, default=None), last=last)
    best = next((r for r in records if r.name == BEST_NAME and r.metric() is not None), None)
    candidates = [r for r in rolling if best is None or not _same_state(r, best)]
    if best is not None:
        candidates.append(best)
    k = max(k, 1)
    best_k = rank_by_metric(candidates, monitor, mode)[:k]
    if best is not None and best not in best_k:
        # A tie with an older rolling file ranks it first; best_model.pth is still "the best".
        best_k = [best, *best_k[: k - 1]]
    return CheckpointView(best=best, best_k=best_k, kth=best_k[-1] if len(best_k) == k else None, last=last)
