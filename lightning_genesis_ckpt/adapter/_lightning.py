"""One of the two places that touch Lightning internals (with :mod:`._lightning_loops`): the trainer's
checkpoint connector, and the flavours of Lightning.

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
* LightningCLI checkpoints (``_instantiator``): their constructor rules, for ``export`` of a LightningModule.

The loops' internals (preemption, plateau schedulers, the train iterator) are in :mod:`._lightning_loops`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

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
