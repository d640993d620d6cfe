"""What the callback reads off a running ``fit``: metrics, the monitor check, where in the epoch it is, and
whether an exception is an interruption worth a snapshot. No I/O."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any

import torch

from ..core.errors import MonitorNotFoundError
from ._lightning import CONFIGURATION_ERRORS
from ._lightning_loops import logged_metric_names


def scalar_metrics(trainer: Any) -> dict[str, float]:
    """``trainer.callback_metrics``' scalars as floats (what a record stores)."""
    return scalars(trainer.callback_metrics)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar values of ``metrics`` as floats."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def monitored_value(monitor: str | None, metrics: Mapping[str, float]) -> float | None:
    if monitor is None or monitor not in metrics:
        return None
    value = metrics[monitor]
    return None if math.isnan(value) else value


def check_monitor(trainer: Any, monitor: str, *, final: bool) -> bool:
    """Whether ``monitor`` has been logged; raises the configuration error when it is certain it was not.

    ``final`` is False at the first validation end when something can still log it later in the epoch
    (``on_train_epoch_end`` of the module or of a callback); the first epoch end then decides.

    Raises:
        MonitorNotFoundError: ``monitor`` is not among the logged metrics and ``final`` is True.
    """
    known = set(scalar_metrics(trainer)) | logged_metric_names(trainer)
    if monitor in known:
        return True
    if final:
        available = ", ".join(sorted(known)) or "none"
        raise MonitorNotFoundError(
            f"GenesisCheckpoint(monitor={monitor!r}) found no such logged metric. Available metrics: "
            f"{available}. Log it with self.log({monitor!r}, ...) or change `monitor`."
        )
    return False


def is_final_epoch(trainer: Any) -> bool:
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    max_steps = trainer.max_steps
    return bool(trainer.should_stop or (max_steps is not None and 0 <= max_steps <= trainer.global_step))


def batches_trained(trainer: Any) -> int:
    """The batches of this epoch that have been trained on: ``processed`` rather than ``completed``, which
    lags by one inside ``on_train_batch_end`` (where step checkpoints are taken)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def mid_epoch(trainer: Any) -> bool:
    """Whether the epoch has trained on some of its batches but not all."""
    return bool(0 < batches_trained(trainer) < trainer.num_training_batches)


def batches_since_optimizer_step(trainer: Any) -> int:
    """Batches whose gradients are accumulated but not yet applied (0 at an optimizer-step boundary)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed % trainer.accumulate_grad_batches)


def no_snapshot_reason(
    trainer: Any, exception: BaseException, *, started: bool, finished: bool, enabled: bool
) -> str | None:
    """Why ``exception`` gets no interrupt snapshot (None: it does). Only an interrupted ``fit`` does:
    not test / validate / predict, not the sanity check, not after training finished, and not a
    configuration error (running again would fail the same way)."""
    if not enabled:
        return "(save_on_exception=False)"
    fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
    if fn != "fit":
        return f"during {fn} (snapshots are for an interrupted fit)"
    if trainer.sanity_checking or not started:
        return "before training started"
    if finished:
        return "after training finished"
    if isinstance(exception, (MonitorNotFoundError, *CONFIGURATION_ERRORS)):
        return "(a configuration error, not an interruption)"
    return None


def validate_settings(mode: str, keep_last: Any, save_top_k: Any, every_n_epochs: Any, monitor: Any) -> None:
    """Raise ``ValueError`` naming the first bad GenesisCheckpoint setting."""
    if mode not in ("min", "max"):
        raise ValueError(f"GenesisCheckpoint(mode={mode!r}) is invalid: use 'min' or 'max'")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"GenesisCheckpoint(keep_last={keep_last!r}) is invalid: keep at least 1 checkpoint")
    for name, value in (("save_top_k", save_top_k), ("every_n_epochs", every_n_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"GenesisCheckpoint({name}={value!r}) is invalid: use 0 or a positive int")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"GenesisCheckpoint(monitor={monitor!r}) is invalid: give a logged metric's name")


def validate_triggers(every_n_train_steps: Any, train_time_interval: Any, save_on_validation: Any) -> None:
    """Raise ``ValueError`` naming the first bad step, time or validation trigger setting."""
    if every_n_train_steps is not None and (
        isinstance(every_n_train_steps, bool)
        or not isinstance(every_n_train_steps, int)
        or every_n_train_steps < 0
    ):
        raise ValueError(
            f"GenesisCheckpoint(every_n_train_steps={every_n_train_steps!r}) is invalid: use None or a positive int"
        )
    if train_time_interval is not None and (
        not isinstance(train_time_interval, datetime.timedelta) or train_time_interval.total_seconds() <= 0
    ):
        raise ValueError(
            f"GenesisCheckpoint(train_time_interval={train_time_interval!r}) is invalid: use a positive "
            "datetime.timedelta, e.g. timedelta(minutes=30)"
        )
    if not isinstance(save_on_validation, bool):
        raise ValueError(
            f"GenesisCheckpoint(save_on_validation={save_on_validation!r}) is invalid: use True or False"
        )
