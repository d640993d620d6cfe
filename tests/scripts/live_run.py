"""A training run that stays live for the writer tests: it trains, then waits between two epochs.

``live_run.py DIR --pause-at N --go FILE [--storage-options JSON]`` trains BigModel with GenesisCheckpoint and,
at the start of epoch N (after epoch N-1's checkpoint has committed), waits until FILE exists (at most 120 s)
before it goes on to the end. It prints ``EPOCH <n>`` as each epoch starts, ``PAUSED`` while it waits and
``RESULT {...}`` when fit returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pytorch_lightning as pl
from models import BigModel, loaders, make_trainer
from train import weights_digest

from lightning_genesis_ckpt import GenesisCheckpoint


class PauseAt(pl.Callback):
    def __init__(self, epoch: int, go: str) -> None:
        self.epoch, self.go = epoch, go

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"EPOCH {trainer.current_epoch}", flush=True)
        if trainer.current_epoch == self.epoch:
            print("PAUSED", flush=True)
            deadline = time.monotonic() + 120
            while not os.path.exists(self.go) and time.monotonic() < deadline:
                time.sleep(0.02)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dirpath")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pause-at", type=int, default=6)
    p.add_argument("--go", required=True)
    p.add_argument("--ballast-mb", type=float, default=4.0)
    p.add_argument("--storage-options", type=json.loads, default=None)
    args = p.parse_args()
    pl.seed_everything(0, verbose=False)
    model = BigModel(ballast_mb=args.ballast_mb)
    train_loader, val_loader = loaders()
    genesis = GenesisCheckpoint(
        args.dirpath, monitor="val_loss", keep_last=2, storage_options=args.storage_options
    )
    trainer = make_trainer([genesis, PauseAt(args.pause_at, args.go)], args.epochs)
    trainer.fit(model, train_loader, val_loader)
    result = {"digest": weights_digest(model), "epoch": trainer.current_epoch, "step": trainer.global_step}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
