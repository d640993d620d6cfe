"""Step time while a background save runs, against steps with no save in flight; prints one JSON line.

A real Lightning fit with ``GenesisCheckpoint(async_save=True)``: each training step is a fixed CPU workload
(matmuls on one intra-op thread, so a second core is free for the writer as it would be next to a GPU step),
and the checkpoint is ``--bytes`` of extra weights. Every step's wall time is recorded with whether a save
was in flight when it began. The epoch-end hook itself (the staging copy) is not a step and is excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_genesis_ckpt import GenesisCheckpoint


class Work(pl.LightningModule):
    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.w = nn.Linear(384, 384)
        self.ballast = nn.Parameter(torch.randn(nbytes // 4), requires_grad=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        for _ in range(40):
            x = torch.tanh(self.w(x))
        return x.pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.w.parameters(), lr=1e-4)


class StepClock(pl.Callback):
    def __init__(self, saver: Any) -> None:
        self.saver = saver
        self.rows: list[tuple[float, bool]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.busy = self.saver.busy
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.rows.append((time.perf_counter() - self.start, self.busy))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    cb = GenesisCheckpoint(args.dir, keep_last=2, async_save=True, verbose=False)
    clock = StepClock(cb._saver)  # benchmark-only peek at "is a save in flight"
    data = DataLoader(TensorDataset(torch.randn(args.steps * 64, 384)), batch_size=64)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[cb, clock],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Work(args.bytes), data)
    busy = [t for t, b in clock.rows if b]
    idle = [t for t, b in clock.rows[args.steps :] if not b]  # epoch 0 warms up
    print(
        json.dumps(
            {
                "bytes": args.bytes,
                "steps_during_save": len(busy),
                "idle_step": statistics.median(idle),
                "busy_step": statistics.median(busy) if busy else None,
            }
        )
    )


if __name__ == "__main__":
    main()
