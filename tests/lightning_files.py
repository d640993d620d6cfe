"""Stock Lightning checkpoints (written by the Trainer itself, no Genesis callback) for import/export tests."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from models import TinyModel, loaders, make_trainer


def stock_lightning_checkpoint(path: Path, epochs: int = 1) -> TinyModel:
    """Train TinyModel briefly with a plain Trainer and save ``path`` with ``trainer.save_checkpoint``."""
    pl.seed_everything(0)
    model = TinyModel()
    train, val = loaders()
    trainer = make_trainer([], epochs, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(model, train, val)
    trainer.save_checkpoint(str(path))
    return model
