"""The one place that touches Lightning internals.

Why internals at all: Lightning offers no public hook to (1) pick the checkpoint to restore when the user
passed no ``ckpt_path`` -- the path is a local variable of ``Trainer._run`` by the time any callback runs --
nor (2) get the checkpoint dict without also writing it through ``CheckpointIO`` (whose default stages a
second in-memory copy and never fsyncs). So we use ``Trainer._checkpoint_connector``'s ``resume_start`` and
``dump_checkpoint``, which every strategy's restore and save path goes through. ``check_compatibility``
fails loudly, and the test suite checks it, if a Lightning upgrade moves them.

The rest, each for a reason Lightning leaves no public way around:

* ``ckpt_path="best"``/``"last"`` (``_CheckpointConnector._select_ckpt_path``): Lightning resolves them
  before any callback hook of that ``test``/``validate``/``predict`` call runs, from whichever checkpoint
  callback is listed first, and ``"last"`` only from ``ModelCheckpoint`` instances.
* preemption (``_SignalConnector``): the loops stop at the next batch when ``received_sigterm`` is set, even
  between two gradient-accumulation steps or inside validation; we decide when to set it.
* ``ReduceLROnPlateau`` (the loops' scheduler configs and ``callback_metrics``): Lightning does not step
  plateau schedulers after a restart, and does not save the metrics they read.
* the train DataLoader iterator (``fit_loop._combined_loader``), for the mid-epoch fast-forward.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

# Lightning ships twice: ``pytorch_lightning`` and ``lightning.pytorch`` (the unified package). Their classes
# are distinct, and each Trainer only accepts callbacks derived from its own ``Callback``. Our callback
# derives from the ``Checkpoint`` class of every flavour that is installed, so one object works with both.
_FLAVOURS: dict[str, ModuleType] = {}
for _name in ("pytorch_lightning", "lightning.pytorch"):
    with contextlib.suppress(ImportError):
        _FLAVOURS[_name] = importlib.import_module(_name)
if not _FLAVOURS:  # pragma: no cover - the package depends on pytorch-lightning
    raise ImportError("lightning-genesis-ckpt needs pytorch-lightning (or the unified lightning package)")

CHECKPOINT_BASES: tuple[type, ...] = tuple(
    importlib.import_module(f"{name}.callbacks").Checkpoint for name in _FLAVOURS
)
LIGHTNING_VERSION: str = next(iter(_FLAVOURS.values())).__version__

#: ``SIGTERMException`` of every flavour: a ``SystemExit`` without a code, raised by the loops after SIGTERM.
SIGTERM_EXCEPTIONS: tuple[type[BaseException], ...] = tuple(
    importlib.import_module(f"{name}.utilities.exceptions").SIGTERMException for name in _FLAVOURS
)
#: Lightning's configuration errors (a misconfigured Trainer, module or scheduler), every flavour.
CONFIGURATION_ERRORS: tuple[type[BaseException], ...] = tuple(
    importlib.import_module(f"{name}.utilities.exceptions").MisconfigurationException for name in _FLAVOURS
)

__all__ = [
    "CHECKPOINT_BASES",
    "CONFIGURATION_ERRORS",
    "LIGHTNING_VERSION",
    "SIGTERM_EXCEPTIONS",
    "CkptPathSelector",
    "check_compatibility",
    "dump_checkpoint",
    "install_ckpt_path_selection",
    "install_resume_hook",
    "lightning_version_of",
    "writes_directory",
]


def _flavour_of(trainer: Any) -> str:
    module = type(trainer).__module__
    return "lightning.pytorch" if module.startswith("lightning.") else "pytorch_lightning"


def lightning_version_of(trainer: Any) -> str:
    """The version of the Lightning flavour ``trainer`` comes from."""
    return str(_FLAVOURS[_flavour_of(trainer)].__version__)


def _migrate(trainer: Any, checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
    utils = importlib.import_module(f"{_flavour_of(trainer)}.utilities.migration.utils")
    migrated: dict[str, Any] = utils._pl_migrate_checkpoint(checkpoint, path)
    return migrated


def check_compatibility(trainer: Any) -> None:
    """Raise a clear error if this Lightning version lacks the internals we rely on."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    missing = [
        name
        for name in (
            "resume_start",
            "dump_checkpoint",
            "_loaded_checkpoint",
            "_ckpt_path",
            "_select_ckpt_path",
            "_user_managed",
        )
        if connector is None or not hasattr(connector, name)
    ]
    signals = getattr(trainer, "_signal_connector", None)
    missing += [
        f"_signal_connector.{name}"
        for name in ("received_sigterm", "_sigterm_notifier_fn")
        if signals is None or not hasattr(signals, name)
    ]
    if missing:
        raise RuntimeError(
            f"lightning-genesis-ckpt does not support Lightning {lightning_version_of(trainer)}: the trainer's checkpoint "
            f"connector lacks {', '.join(missing)}. Please report this with your Lightning version."
        )


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The full Lightning checkpoint dict the trainer would save (model, optimizers, loops, callbacks...)."""
    checkpoint: dict[str, Any] = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    return checkpoint


def writes_directory(strategy: Any) -> bool:
    """Whether ``strategy.save_checkpoint`` writes a directory, with every rank writing its own shard.

    Lightning has no public property for this, so it is read from each strategy's own setting: FSDP with
    ``state_dict_type="sharded"``, ``ModelParallelStrategy(save_distributed_checkpoint=True)`` (its
    default), and DeepSpeed (always a directory). Matched by class name so that no optional dependency
    (deepspeed) has to be imported.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "FSDPStrategy" in names:
        return getattr(strategy, "_state_dict_type", None) == "sharded"
    if "ModelParallelStrategy" in names:
        return bool(getattr(strategy, "_save_distributed_checkpoint", False))
    return "DeepSpeedStrategy" in names


#: What ``resolve`` hands the resume hook for a checkpoint Lightning must load itself: a directory, which
#: only the strategy that wrote it can read, opened as a verified local path for the duration of the restore.
LocalPathOpener = Callable[[], contextlib.AbstractContextManager[str]]


#: What a resume resolver returns: the path Lightning records as ``trainer.ckpt_path``, and the loaded
#: checkpoint dict or, for a directory checkpoint, a :data:`LocalPathOpener`. None: Lightning goes on alone.
Resolved = tuple[str, dict[str, Any] | LocalPathOpener] | None


def install_resume_hook(trainer: Any, resolve: Callable[[str | None], Resolved]) -> Callable[[], None]:
    """Route every checkpoint load of ``trainer`` through ``resolve``; returns a function that undoes this.

    ``resolve(path)`` is asked first, with ``None`` when no checkpoint was named (``fit`` without
    ``ckpt_path``). It returns ``(path, checkpoint_dict)`` to restore from, ``(path, opener)`` for a directory
    checkpoint (the strategy loads it from ``opener()``'s local path), or None to let Lightning load ``path``
    itself (or, for None, start fresh). The restore itself is Lightning's own: model, optimizers, schedulers,
    loops, callbacks, precision.
    """
    check_compatibility(trainer)
    connector = trainer._checkpoint_connector
    original = connector.resume_start

    def resume_start(checkpoint_path: Any = None, weights_only: bool | None = None) -> None:
        found = resolve(None if checkpoint_path is None else str(checkpoint_path))
        if found is None:
            original(checkpoint_path, weights_only=weights_only)
            return
        path, checkpoint = found
        if callable(checkpoint):
            with checkpoint() as local:
                # The strategy loads sharded state into the model and optimizers right here; every rank
                # waits so that rank 0's temporary download outlives all ranks' reads.
                original(local, weights_only=weights_only)
                trainer.strategy.barrier("genesis_resume")
            connector._ckpt_path = path
            return
        connector._ckpt_path = path
        connector._loaded_checkpoint = _migrate(trainer, checkpoint, path)

    connector.resume_start = resume_start

    def uninstall() -> None:
        if connector.__dict__.get("resume_start") is resume_start:
            del connector.resume_start

    return uninstall


class CkptPathSelector(Protocol):
    """A callback that answers ``ckpt_path="best"``/``"last"``/None for its trainer (see below)."""

    def select_ckpt_path(
        self, trainer: Any, fn: str, ckpt_path: Any, model_provided: bool, model_connected: bool
    ) -> tuple[bool, Any]:
        """``(True, path_or_None)`` when it decided, ``(False, None)`` to leave it to Lightning."""
        ...


_SELECTION_INSTALLED: set[type] = set()


def install_ckpt_path_selection() -> None:
    """Let a checkpoint callback with ``select_ckpt_path`` answer ``ckpt_path`` for its trainer.

    Lightning turns ``"best"``/``"last"``/None into a path in ``_CheckpointConnector._select_ckpt_path``, at
    the start of ``fit``/``validate``/``test``/``predict`` and before any hook of that call runs, from the
    *first* checkpoint callback in the list (and ``"last"`` from ``ModelCheckpoint`` instances only). No
    per-trainer hook exists that early, so the connector class of each installed flavour is wrapped, once:
    for a trainer with no such callback, or a path set with ``trainer.ckpt_path = ...``, the wrapper calls
    Lightning's own method unchanged.
    """
    for name in _FLAVOURS:
        cls = importlib.import_module(f"{name}.trainer.connectors.checkpoint_connector")._CheckpointConnector
        if cls in _SELECTION_INSTALLED:
            continue
        original = cls._select_ckpt_path

        def _select_ckpt_path(
            self: Any,
            state_fn: Any,
            ckpt_path: Any,
            model_provided: bool,
            model_connected: bool,
            _original: Any = original,
        ) -> Any:
            selector = next(
                (cb for cb in self.trainer.callbacks if callable(getattr(cb, "select_ckpt_path", None))), None
            )
            if selector is not None and not self._user_managed:
                decided, path = selector.select_ckpt_path(
                    self.trainer,
                    str(getattr(state_fn, "value", state_fn)),
                    ckpt_path,
                    model_provided,
                    model_connected,
                )
                if decided:
                    return path
            return _original(self, state_fn, ckpt_path, model_provided, model_connected)

        cls._select_ckpt_path = _select_ckpt_path
        _SELECTION_INSTALLED.add(cls)


# ------------------------------------------------------------------------------------------ preemption
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
def instantiate_from_hparams(cls: type, hparams: dict[str, Any]) -> Any:
    """Build LightningModule ``cls`` from a checkpoint's ``hyper_parameters`` as ``load_from_checkpoint`` does.

    LightningCLI checkpoints carry ``_instantiator`` (and ``_class_path`` for subclass mode) next to the
    constructor arguments: the instantiator must be in Lightning's allowlist and the class already imported
    (both Lightning's own checks, so nothing is imported because the file says so); arguments the
    constructor does not take are dropped unless it takes ``**kwargs``.
    """
    flavour = next(
        (name for name in _FLAVOURS if any(c.__module__.startswith(f"{name}.") for c in cls.__mro__)),
        next(iter(_FLAVOURS)),
    )
    saving = importlib.import_module(f"{flavour}.core.saving")
    kwargs = dict(hparams)
    instantiator_path = kwargs.pop("_instantiator", None)
    instantiator = None
    if instantiator_path is not None:
        if not isinstance(instantiator_path, str) or instantiator_path not in saving._ALLOWED_INSTANTIATORS:
            raise ValueError(
                f"the checkpoint's instantiator {instantiator_path!r} is not one Lightning trusts "
                f"({flavour}.core.saving._ALLOWED_INSTANTIATORS); pass model_kwargs= or an instance instead"
            )
        class_path = kwargs.get("_class_path")
        if class_path is not None and not saving._is_imported_subclass(class_path, cls):
            raise ValueError(
                f"the checkpoint's class {class_path!r} is not an imported subclass of {cls.__name__}: "
                "import its module first, or pass an instance"
            )
        module_path, name = instantiator_path.rsplit(".", 1)
        instantiator = getattr(importlib.import_module(module_path), name)
    else:
        kwargs.pop("_class_path", None)
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return instantiator(cls, kwargs) if instantiator is not None else cls(**kwargs)
