"""An interrupted epoch's running metrics, carried across a mid-epoch resume.

Lightning 2.x saves no logged-metric state in its checkpoints (1.x saved the loops' ``_results``), so after a
mid-epoch resume an ``on_epoch=True`` mean covers only the batches trained after the resume, and "best" can
be decided on part of an epoch. The train loop's result collection holds, per metric, the running sum (or
max, min) and the batch-size count; this module saves them with the checkpoint and puts them back before
the resumed epoch's first batch, so the epoch's aggregate is the uninterrupted run's, bit for bit: the
first resumed update adds to the restored sum exactly as the uninterrupted run added to its own.

Covered: tensor values logged with ``on_epoch=True`` and the ``mean``/``sum``/``max``/``min`` reductions.
Not covered (reset as Lightning does today): custom ``reduce_fx`` callables, ``sync_dist_group`` groups, and
``torchmetrics.Metric`` objects passed to ``self.log`` (their state lives in the module; register it with
``persistent=True`` to have it saved).
"""

from __future__ import annotations

import importlib
from typing import Any

_REDUCTIONS = ("mean", "sum", "max", "min")


def _reduction(meta: Any) -> str | None:
    for name in _REDUCTIONS:
        if getattr(meta, f"is_{name}_reduction"):
            return name
    return None


def capture(trainer: Any) -> list[dict[str, Any]]:
    """The train loop's epoch-level running values, as plain tensors and numbers (weights-only loadable)."""
    saved = []
    for key, result in trainer.fit_loop.epoch_loop._results.items():
        meta = getattr(result, "meta", None)
        if meta is None or not result.is_tensor or not meta.on_epoch or result.has_reset:
            continue
        reduction = _reduction(meta)
        sync = meta.sync
        if reduction is None or sync.group is not None:
            continue
        entry: dict[str, Any] = {
            "key": str(key),
            "meta": {
                "fx": meta.fx,
                "name": meta.name,
                "prog_bar": bool(meta.prog_bar),
                "logger": bool(meta.logger),
                "on_step": bool(meta.on_step),
                "on_epoch": True,
                "reduce_fx": reduction,
                "enable_graph": bool(meta.enable_graph),
                "add_dataloader_idx": bool(meta.add_dataloader_idx),
                "dataloader_idx": meta.dataloader_idx,
                "metric_attribute": meta.metric_attribute,
            },
            "sync": {"should": bool(sync.should), "rank_zero_only": bool(sync.rank_zero_only), "op": sync.op},
            "value": result.value.detach().to("cpu").clone(),
            "updates": int(result._update_count),
        }
        if reduction == "mean":
            entry["count"] = result.cumulated_batch_size.detach().to("cpu").clone()
        saved.append(entry)
    return saved


def restore(trainer: Any, saved: list[dict[str, Any]]) -> None:
    """Put ``saved`` (from :func:`capture`) back into the train loop's result collection, before the resumed
    epoch's first batch, and keep Lightning from resetting it at that batch's first ``self.log``."""
    results = trainer.fit_loop.epoch_loop._results
    module = importlib.import_module(type(results).__module__)
    device = trainer.strategy.root_device
    for entry in saved:
        meta = module._Metadata(**entry["meta"])
        sync = entry["sync"]
        # The same fields LightningModule.log gives, so that its next log call finds equal metadata.
        meta.sync = module._Sync(
            fn=trainer.strategy.reduce,
            _should=sync["should"],
            rank_zero_only=sync["rank_zero_only"],
            _op=sync["op"],
            _group=None,
        )
        metric = module._ResultMetric(meta, True)
        metric.value = entry["value"].to(device)
        if "count" in entry:
            metric.cumulated_batch_size = entry["count"].to(device)
        metric._update_count = entry["updates"]
        metric.has_reset = False
        results[entry["key"]] = metric
    if saved:
        # Lightning resets a hook's tensors at the first batch of an epoch (``_first_loop_iter`` True then);
        # the resumed epoch's first batch is not its first.
        trainer._logger_connector._first_loop_iter = True
