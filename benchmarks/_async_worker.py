"""Time the training loop spends blocked in GenesisCheckpoint's epoch-end hook: async vs sync saves.

Runs a real Lightning fit with a model whose checkpoint is about --bytes, once with async_save=False and once
with async_save=True, in this one process, and prints medians as one JSON line. Each training step sleeps
--step-seconds to stand in for accelerator work that leaves the CPU free (as a GPU step does); epochs are
long enough that a save finishes before the next epoch ends, which is the regime async saving is for.
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


class Timed(GenesisCheckpoint):
    blocked: list[float]

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.blocked = [*getattr(self, "blocked", []), time.perf_counter() - start]


class Big(pl.LightningModule):
    def __init__(self, nbytes: int, step_seconds: float) -> None:
        super().__init__()
        self.step_seconds = step_seconds
        # SGD without momentum: the checkpoint is about the size of the weights.
        side = int((nbytes / 4 / 4) ** 0.5)
        self.layers = nn.ModuleList(nn.Linear(side, side, bias=False) for _ in range(4))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        time.sleep(self.step_seconds)
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


def run(dirpath: str, nbytes: int, saves: int, async_save: bool, step_seconds: float) -> list[float]:
    model = Big(nbytes, step_seconds)
    side = model.layers[0].in_features
    data = DataLoader(TensorDataset(torch.randn(32, side)), batch_size=8)
    cb = Timed(dirpath, keep_last=2, async_save=async_save, verbose=False)
    trainer = pl.Trainer(
        max_epochs=saves,
        accelerator="cpu",
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return cb.blocked


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--step-seconds", type=float, default=0.5)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    sync = run(f"{args.dir}/sync", args.bytes, args.saves, False, args.step_seconds)
    blocked = run(f"{args.dir}/async", args.bytes, args.saves, True, args.step_seconds)
    # The final epoch's hook waits for nothing extra, but fit's end waits for its save: that wait is not in
    # the loop and is reported by the end-to-end benchmark instead.
    print(
        json.dumps(
            {
                "sync": statistics.median(sync),
                "blocked": statistics.median(blocked),
                "saves": args.saves,
                "bytes": args.bytes,
            }
        )
    )


if __name__ == "__main__":
    main()
