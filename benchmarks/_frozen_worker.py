"""One frozen-exclusion measurement in a fresh process; prints one JSON line. Driven by benchmarks/frozen.py.

A LoRA-like LightningModule (``--base-mib`` of frozen Linear layers, rank-16 adapters and a head that train,
AdamW over the trainable parameters) runs 3 short epochs with GenesisCheckpoint saving every epoch, with
``exclude_frozen`` on (``slim``) or off (``full``). Reported: the bytes of one rolling checkpoint, the bytes
of the trainable state plus its optimizer state (the goal's yardstick), and the median seconds of the epoch
saves after the first (the first ``slim`` save also writes the store's one base copy: reported apart).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_genesis_ckpt import GenesisCheckpoint

WIDTH = 2048


class Lora(pl.LightningModule):
    def __init__(self, layers: int, rank: int = 16) -> None:
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(layers))
        self.base.requires_grad_(False)
        self.a = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, rank) * 0.01) for _ in range(layers))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(rank, WIDTH)) for _ in range(layers))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for base, a, b in zip(self.base, self.a, self.b, strict=True):
            x = torch.relu(base(x) + x @ a @ b)
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class TimedCheckpoint(GenesisCheckpoint):
    """Times each epoch save (the whole hook: dump, exclusion, write, commit)."""

    seconds: list[float]

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.seconds.append(time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["full", "slim"])
    p.add_argument("dir")
    p.add_argument("--base-mib", type=int, required=True)
    args = p.parse_args()
    logging.getLogger("lightning_genesis_ckpt").setLevel(logging.WARNING)
    layers = max(1, args.base_mib * 2**20 // (WIDTH * WIDTH * 4))
    torch.manual_seed(0)
    model = Lora(layers)
    x = torch.randn(64, WIDTH)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    cb = TimedCheckpoint(args.dir, keep_last=2, exclude_frozen=args.mode == "slim", verbose=False)
    cb.seconds = []
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    print(
        json.dumps(
            {
                "mode": args.mode,
                "frozen_bytes": frozen,
                "trainable_bytes": trainable,
                # AdamW keeps exp_avg and exp_avg_sq per trainable parameter: the state to save is 3x.
                "trainable_plus_optimizer": 3 * trainable,
                "checkpoint_bytes": os.path.getsize(os.path.join(args.dir, "checkpoint_epoch_2.pth")),
                "first_save_seconds": cb.seconds[0],
                "save_seconds": statistics.median(cb.seconds[1:]),
            }
        )
    )


if __name__ == "__main__":
    main()
