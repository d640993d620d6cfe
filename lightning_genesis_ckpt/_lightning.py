"""The one place that touches Lightning internals.

Why internals at all: Lightning offers no public hook to (1) pick the checkpoint to restore when the user
passed no ``ckpt_path`` -- the path is a local variable of ``Trainer._run`` by the time any callback runs --
nor (2) get the checkpoint dict without also writing it through ``CheckpointIO`` (whose default stages a
second in-memory copy and never fsyncs). So we use ``Trainer._checkpoint_connector``'s ``resume_start`` and
``dump_checkpoint``, which every strategy's restore and save path goes through. ``check_compatibility``
fails loudly, and the test suite checks it, if a Lightning upgrade moves them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:  # the standalone package first: it is this library's declared dependency
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.migration.utils import _pl_migrate_checkpoint
    from pytorch_lightning.utilities.rank_zero import rank_zero_only
except ImportError:  # pragma: no cover - exercised only where just the unified package is installed
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint  # type: ignore[no-redef]
    from lightning.pytorch.utilities.rank_zero import rank_zero_only  # type: ignore[no-redef]

Trainer = pl.Trainer
LightningModule = pl.LightningModule
Callback = pl.Callback
LIGHTNING_VERSION: str = pl.__version__

__all__ = [
    "LIGHTNING_VERSION",
    "Callback",
    "LightningModule",
    "Trainer",
    "check_compatibility",
    "dump_checkpoint",
    "install_resume_hook",
    "rank_zero_only",
]


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
            f"lightning-genesis-ckpt does not support Lightning {LIGHTNING_VERSION}: the trainer's checkpoint "
            f"connector lacks {', '.join(missing)}. Please report this with your Lightning version."
        )


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The full Lightning checkpoint dict the trainer would save (model, optimizers, loops, callbacks...)."""
    checkpoint: dict[str, Any] = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    return checkpoint


def install_resume_hook(
    trainer: Any, resolve: Callable[[], tuple[str, dict[str, Any]] | None]
) -> Callable[[], None]:
    """Route ``fit`` without ``ckpt_path`` to ``resolve()``; returns a function that undoes this.

    ``resolve`` returns ``(path, checkpoint_dict)`` to restore from, or None to start fresh. An explicit
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
        connector._ckpt_path = path
        connector._loaded_checkpoint = _pl_migrate_checkpoint(checkpoint, path)

    connector.resume_start = resume_start

    def uninstall() -> None:
        if connector.__dict__.get("resume_start") is resume_start:
            del connector.resume_start

    return uninstall
