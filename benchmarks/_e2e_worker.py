"""One end-to-end Lightning training run in a fresh process; prints one JSON line.

A 20-epoch fit of an MLP whose checkpoint is ~100 MB, checkpointing every epoch with the configured callback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Wide(pl.LightningModule):
    def __init__(self, width: int = 2048, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", choices=["none", "modelcheckpoint", "genesis", "genesis-async"])
    p.add_argument("dir")
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_genesis_ckpt").setLevel(logging.ERROR)
    torch.manual_seed(0)
    x = torch.randn(256, 2048)
    data = DataLoader(TensorDataset(x, x[:, :1]), batch_size=64, shuffle=True)
    callbacks: list[pl.Callback] = []
    if args.config == "modelcheckpoint":
        from pytorch_lightning.callbacks import ModelCheckpoint

        callbacks.append(
            ModelCheckpoint(dirpath=args.dir, save_last=True, save_top_k=1, monitor="train_loss")
        )
    elif args.config.startswith("genesis"):
        from lightning_genesis_ckpt import GenesisCheckpoint

        kwargs = {"async_save": True} if args.config == "genesis-async" else {}
        callbacks.append(GenesisCheckpoint(args.dir, monitor="train_loss", keep_last=1, **kwargs))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=args.config != "none",
    )
    model = Wide()
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start
    size = sum(p.numel() * 4 for p in model.parameters()) * 3  # weights + two Adam moments
    print(json.dumps({"config": args.config, "seconds": elapsed, "approx_ckpt_bytes": size}))
    os.makedirs(args.dir, exist_ok=True)


if __name__ == "__main__":
    main()
