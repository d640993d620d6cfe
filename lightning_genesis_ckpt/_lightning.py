"""The one place that touches Lightning internals.

Why internals at all: Lightning offers no public hook to (1) pick the checkpoint to restore when the user
passed no ``ckpt_path`` -- the path is a local variable of ``Trainer._run`` by the time any callback runs --
nor (2) get the checkpoint dict without also writing it through ``CheckpointIO`` (whose default stages a
second in-memory copy and never fsyncs). So we use ``Trainer._checkpoint_connector``'s ``resume_start`` and
``dump_checkpoint``, which every strategy's restore and save path goes through. ``check_compatibility``
fails loudly, and the test suite checks it, if a Lightning upgrade moves them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

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

__all__ = [
    "CHECKPOINT_BASES",
    "LIGHTNING_VERSION",
    "check_compatibility",
    "dump_checkpoint",
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
        for name in ("resume_start", "dump_checkpoint", "_loaded_checkpoint", "_ckpt_path")
        if connector is None or not hasattr(connector, name)
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


def install_resume_hook(
    trainer: Any, resolve: Callable[[], tuple[str, dict[str, Any] | LocalPathOpener] | None]
) -> Callable[[], None]:
    """Route ``fit`` without ``ckpt_path`` to ``resolve()``; returns a function that undoes this.

    ``resolve`` returns ``(path, checkpoint_dict)`` to restore from, ``(path, opener)`` for a directory
    checkpoint (the strategy loads it from ``opener()``'s local path), or None to start fresh. An explicit
    ``ckpt_path`` (or one Lightning picked itself, such as SLURM's ``"hpc"``) is passed through untouched.
    The restore itself is Lightning's own: model, optimizers, schedulers, loops, callbacks, precision.
    """
    check_compatibility(trainer)
    connector = trainer._checkpoint_connector
    original = connector.resume_start

    def resume_start(checkpoint_path: Any = None, weights_only: bool | None = None) -> None:
        if checkpoint_path is not None:
            original(checkpoint_path, weights_only=weights_only)
            return
        found = resolve()
        if found is None:
            original(None, weights_only=weights_only)
            return
        path, checkpoint = found
        if callable(checkpoint):
            with checkpoint() as local:
                # The strategy loads sharded state into the model and optimizers right here; every rank
                # waits so that rank 0's temporary download outlives all ranks' reads.
                original(local, weights_only=weights_only)
                trainer.strategy.barrier("genesis_resume")
            return
        connector._ckpt_path = path
        connector._loaded_checkpoint = _migrate(trainer, checkpoint, path)

    connector.resume_start = resume_start

    def uninstall() -> None:
        if connector.__dict__.get("resume_start") is resume_start:
            del connector.resume_start

    return uninstall
