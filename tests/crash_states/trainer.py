"""The tiny Lightning setup of the Trainer workloads, shared by the traced runs and the resume sample.

``val_loss`` is scripted per epoch (5, 4, 3.5, 3, ...), so ``best_model.pth`` changes at known epochs
whatever the weights do.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from models import TinyModel, loaders, make_trainer
from torch.utils.data import DataLoader

VAL_LOSS = (5.0, 4.0, 3.5, 3.0, 2.5, 2.0)


class ScriptedModel(TinyModel):  # type: ignore[misc, valid-type]
    """TinyModel whose ``val_loss`` follows :data:`VAL_LOSS` by epoch."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(VAL_LOSS[min(self.current_epoch, len(VAL_LOSS) - 1)]))


def crash_loaders() -> tuple[DataLoader, DataLoader]:
    """Six training batches, two validation batches: checkpoints of about 29 KB."""
    return loaders(n=128)


def resume_fit(callback_class: type, dirpath: str, settings: dict[str, Any], epochs: int) -> Any:
    """Run a fit with auto-resume on ``dirpath``; returns the callback (``resumed_from`` says from what).

    Lightning's own info lines and warnings are kept off the console: a benchmark runs many of these.
    """
    torch.manual_seed(0)
    callback = callback_class(dirpath, verbose=False, **settings)
    loggers = [
        logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")
    ]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            trainer = make_trainer([callback], epochs, default_root_dir=dirpath + "-lightning")
            train, val = crash_loaders()
            trainer.fit(ScriptedModel(), train, val)
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
    return callback
