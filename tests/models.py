"""A small deterministic Lightning setup shared by the tests and the subprocess scripts they launch.

Everything is built per Lightning flavour (``pytorch_lightning`` and the unified ``lightning.pytorch``): a
Trainer only accepts modules and callbacks of its own flavour. Module-level names are the
``pytorch_lightning`` ones; ``flavour("lightning.pytorch")`` gives the other set.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FLAVOURS = ("pytorch_lightning", "lightning.pytorch")
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1}


def make_data(n: int = 256, width: int = 16, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    y = x.sum(dim=1, keepdim=True) * 0.1 + 0.05 * torch.randn(n, 1, generator=g)
    split = n * 3 // 4
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def loaders(batch_size: int = 16, **kw: Any) -> tuple[DataLoader, DataLoader]:
    train, val = make_data(**kw)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)


@functools.cache
def flavour(name: str = "pytorch_lightning") -> SimpleNamespace:
    """TinyModel, make_trainer, SignalAt and RaiseAt for one Lightning flavour."""
    pl = importlib.import_module(name)

    class TinyModel(pl.LightningModule):
        """MLP with dropout, AdamW and StepLR: every source of randomness a resume must reproduce."""

        def __init__(self, hidden: int = 32, lr: float = 0.01, width: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
            return {"optimizer": opt, "lr_scheduler": sched}

    def make_trainer(callbacks: list[Any], max_epochs: int, **kw: Any) -> Any:
        kw.setdefault("logger", False)
        return pl.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            devices=1,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            **kw,
        )

    class SignalAt(pl.Callback):
        """Sends ``signum`` to this process at (epoch, batch): a real signal through the real handlers.

        ``batch=-1`` sends it at the end of the epoch instead, once its last batch is done;
        ``val_batch=i`` sends it before validation batch ``i`` of that epoch instead.
        """

        def __init__(
            self, epoch: int, batch: int, signum: int, val_batch: int | None = None, sanity: bool = False
        ) -> None:
            self.epoch, self.batch, self.signum, self.val_batch = epoch, batch, signum, val_batch
            self.sanity = sanity

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.current_epoch == self.epoch and batch_idx == self.batch and self.val_batch is None:
                os.kill(os.getpid(), self.signum)

        def on_validation_batch_start(self, trainer: Any, pl_module: Any, *args: Any, **kw: Any) -> None:
            batch_idx = args[1] if len(args) > 1 else kw.get("batch_idx")
            if (self.sanity and trainer.sanity_checking) or (
                not trainer.sanity_checking
                and trainer.current_epoch == self.epoch
                and batch_idx == self.val_batch
            ):
                os.kill(os.getpid(), self.signum)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == self.epoch and self.batch == -1:
                os.kill(os.getpid(), self.signum)

    class RaiseAt(pl.Callback):
        """Raises ``RuntimeError`` at (epoch, batch), like a bug in user code."""

        def __init__(self, epoch: int, batch: int) -> None:
            self.epoch, self.batch = epoch, batch

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.current_epoch == self.epoch and batch_idx == self.batch:
                raise RuntimeError(f"injected failure at epoch {self.epoch} batch {self.batch}")

    return SimpleNamespace(
        pl=pl, TinyModel=TinyModel, make_trainer=make_trainer, SignalAt=SignalAt, RaiseAt=RaiseAt
    )


_default = flavour()
TinyModel = _default.TinyModel
make_trainer = _default.make_trainer
SignalAt = _default.SignalAt
RaiseAt = _default.RaiseAt


class BigModel(TinyModel):
    """TinyModel plus ``ballast_mb`` of state, so that a save takes measurable time like a real model's.

    The ballast buffer is set to the global step after every batch: a checkpoint whose ballast disagrees
    with its own ``global_step`` mixes bytes of two different saves.
    """

    def __init__(self, ballast_mb: float = 32.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.register_buffer("ballast", torch.zeros(int(ballast_mb * 2**20) // 4))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ballast.fill_(float(self.global_step))
