"""The other place that touches Lightning internals (with :mod:`._lightning`): the loops, each for a reason
Lightning leaves no public way around.

* preemption (``_SignalConnector``): the loops stop at the next batch when ``received_sigterm`` is set, even
  between two gradient-accumulation steps or inside validation; we decide when to set it.
* ``ReduceLROnPlateau`` (the loops' scheduler configs and ``callback_metrics``): Lightning does not step
  plateau schedulers after a restart, and does not save the metrics they read.
* the train DataLoader iterator (``fit_loop._combined_loader``), for the mid-epoch fast-forward.
* the logged metrics (``_logger_connector``, the loops' result collections), to tell a monitor that was never
  logged from one logged later, to tell which metrics belong to the moment of a save, and to carry an
  interrupted epoch's running means across a resume (:mod:`.epoch_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._lightning import CONFIGURATION_ERRORS

log = logging.getLogger(__name__)


def request_stop(trainer: Any, signum: int) -> None:
    """Make the loops stop at their next check, exactly as Lightning's own SIGTERM handler does.

    Lightning's notifier sets ``received_sigterm`` and forwards the signal to the processes its launcher
    started (the other ranks of a single-node DDP run).
    """
    trainer._signal_connector._sigterm_notifier_fn(signum, None)


def withdraw_stop(trainer: Any) -> None:
    """Undo :func:`request_stop` before any loop has acted on it (the stop is re-requested later)."""
    trainer._signal_connector.received_sigterm = False


def stop_requested(trainer: Any) -> bool:
    return bool(trainer._signal_connector.received_sigterm)


def other_handlers(trainer: Any, handler: Any) -> list[Callable[..., Any]]:
    """The callables in a signal's previous ``handler``, less Lightning's SIGTERM notifier.

    Lightning composes SIGTERM handlers (its notifier, SLURM's bypass, a handler that was there before it);
    the notifier runs when the stop is requested (:func:`request_stop`), the others are kept.
    """
    members = getattr(handler, "signal_handlers", None)
    handlers = list(members) if isinstance(members, list) else [handler]
    notifier = trainer._signal_connector._sigterm_notifier_fn
    return [h for h in handlers if callable(h) and h != notifier]


def at_optimizer_step_boundary(trainer: Any) -> bool:
    """Whether the batch that just ran ended with an optimizer step (no gradients are mid-accumulation)."""
    return not trainer.fit_loop._should_accumulate()


# ------------------------------------------------------------------------------- plateau schedulers
def pending_plateau_steps(trainer: Any) -> list[int]:
    """Indices of the ``ReduceLROnPlateau`` configs Lightning steps right after ``on_train_epoch_end``.

    A checkpoint written in that hook predates the step, and a restart skips it (Lightning's fit loop only
    steps plateau schedulers when not restarting): :func:`step_plateau_schedulers` replays it on resume.
    """
    fit_loop = trainer.fit_loop
    current = fit_loop.epoch_progress.current
    if current.processed <= current.completed or fit_loop.restarting:
        return []  # not between the epoch's end hooks and its completion
    if (
        not fit_loop.epoch_loop._num_ready_batches_reached()
        or not trainer.lightning_module.automatic_optimization
    ):
        return []
    return [
        i
        for i, config in enumerate(trainer.lr_scheduler_configs)
        if config.reduce_on_plateau
        and config.interval == "epoch"
        and (trainer.current_epoch + 1) % config.frequency == 0
    ]


def step_plateau_schedulers(trainer: Any, indices: Iterable[int]) -> None:
    """Step the plateau schedulers ``indices`` with the monitored values, as Lightning's fit loop does."""
    epoch_loop = trainer.fit_loop.epoch_loop
    configs = trainer.lr_scheduler_configs
    for i in indices:
        if not 0 <= i < len(configs) or not configs[i].reduce_on_plateau:
            log.warning("the checkpoint names a ReduceLROnPlateau scheduler (#%d) this run does not have", i)
            continue
        config = configs[i]
        value = trainer.callback_metrics.get(config.monitor)
        if value is None:
            if config.strict:
                raise CONFIGURATION_ERRORS[0](
                    f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available. "
                    f"Available metrics are: {list(trainer.callback_metrics)}."
                )
            continue
        epoch_loop.scheduler_progress.increment_ready()
        trainer.lightning_module.lr_scheduler_step(config.scheduler, value)
        epoch_loop.scheduler_progress.increment_completed()


def scalar_callback_metrics(trainer: Any) -> dict[str, torch.Tensor]:
    """``trainer.callback_metrics``' scalars, as CPU tensors (what schedulers and callbacks read)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[str(key)] = value.detach().to("cpu").clone()
    return out


def restore_callback_metrics(trainer: Any, metrics: dict[str, torch.Tensor]) -> None:
    """Put saved ``callback_metrics`` back: Lightning does not save them, and resets them at every start."""
    connector = trainer._logger_connector
    connector._callback_metrics.update({k: v.to(trainer.strategy.root_device) for k, v in metrics.items()})


# ----------------------------------------------------------------------------------- train iterators
def train_loaders(trainer: Any) -> list[Any]:
    """The train dataloaders of the running ``fit``, as the fit loop iterates them."""
    combined = trainer.fit_loop._combined_loader
    return [] if combined is None else list(combined.flattened)


def train_iterators(trainer: Any) -> list[Any]:
    """The live iterators of the train dataloaders (torch ``_BaseDataLoaderIter`` for a DataLoader)."""
    combined = trainer.fit_loop._combined_loader
    iterator = None if combined is None else combined._iterator
    return [] if iterator is None else list(iterator.iterators)


def restart_train_iterator(trainer: Any, wrap: Callable[[Any], Any]) -> None:
    """Create the train iterator again, each dataloader seen through ``wrap`` while its iterator is made.

    Used on resume, after the fit loop made its own iterator: ``wrap(loader)`` is an iterable whose
    ``__iter__`` positions the loader's iterator; the loaders themselves are put back right after.
    """
    fit_loop = trainer.fit_loop
    combined = fit_loop._combined_loader
    loaders = combined.flattened
    combined.flattened = [wrap(dl) for dl in loaders]
    try:
        iter(fit_loop._data_fetcher)
    finally:
        combined.flattened = loaders
        if combined._iterator is not None:
            combined._iterator.iterables = loaders


# ------------------------------------------------------------------------------------ logged metrics
def logged_metric_names(trainer: Any) -> set[str]:
    """Every metric name ``self.log`` has been given in this fit so far (training and validation).

    Read from the loops' result collections: an epoch-level training metric is in none of the
    ``callback_metrics`` until the epoch ends, yet it has been logged.
    """
    names: set[str] = set()
    epoch_loop = trainer.fit_loop.epoch_loop
    for results in (epoch_loop._results, epoch_loop.val_loop._results):
        for result in results.values():
            meta = getattr(result, "meta", None)
            name = getattr(meta, "name", None)
            if not isinstance(name, str):
                continue
            names.add(name)
            if getattr(meta, "forked", False):
                names |= {f"{name}_step", f"{name}_epoch"}
    return names


def _names_of(result: Any) -> tuple[str, ...]:
    meta = result.meta
    name = meta.name
    if meta.add_dataloader_idx and meta.dataloader_idx is not None:
        suffix = f"/dataloader_idx_{meta.dataloader_idx}"
        return (
            (name + suffix, f"{name}_step{suffix}", f"{name}_epoch{suffix}")
            if meta.forked
            else (name + suffix,)
        )
    return (name, f"{name}_step", f"{name}_epoch") if meta.forked else (name,)


def metric_sources(trainer: Any) -> dict[str, str]:
    """Where each logged metric name comes from: ``"validation"``, ``"train_step"`` (a value of the batch that
    ran last), ``"train_epoch"`` (an epoch's aggregate, produced at the epoch end) or ``"train"`` (the plain
    name of a metric logged with both ``on_step`` and ``on_epoch``: the step's value, then the epoch's)."""
    sources: dict[str, str] = {}
    epoch_loop = trainer.fit_loop.epoch_loop
    for result in epoch_loop._results.values():
        meta = getattr(result, "meta", None)
        if meta is None:
            continue
        names = _names_of(result)
        if meta.forked:
            sources.update({names[0]: "train", names[1]: "train_step", names[2]: "train_epoch"})
        else:
            sources[names[0]] = "train_epoch" if meta.on_epoch else "train_step"
    for result in epoch_loop.val_loop._results.values():
        if getattr(result, "meta", None) is not None:
            sources.update(dict.fromkeys(_names_of(result), "validation"))
    return sources


def step_metrics(trainer: Any) -> dict[str, Any]:
    """The values logged ``on_step`` by the batch that just ran, before Lightning copies them into
    ``callback_metrics`` (which happens after the ``on_train_batch_end`` hooks)."""
    metrics: dict[str, Any] = trainer.fit_loop.epoch_loop._results.metrics(True)["callback"]
    return metrics


def _defined_outside_lightning(obj: Any, method: str) -> bool:
    for cls in type(obj).__mro__:
        if method in cls.__dict__:
            return not cls.__module__.startswith(("pytorch_lightning.", "lightning."))
    return False


def may_log_at_epoch_end(trainer: Any, exclude: Any) -> bool:
    """Whether user code runs at ``on_train_epoch_end`` (module or callback) and so may still log a metric."""
    if _defined_outside_lightning(trainer.lightning_module, "on_train_epoch_end"):
        return True
    return any(
        cb is not exclude and _defined_outside_lightning(cb, "on_train_epoch_end") for cb in trainer.callbacks
    )


# ------------------------------------------------------------------------------- hparams -> model
