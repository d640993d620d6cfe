"""Demo: train, get interrupted by a real SIGTERM, run again, resume exactly where it stopped.

    make demo

Each run is a separate Python process, as after a real preemption. Checkpoints go to ./demo_checkpoints
(or the URL given as the first argument, e.g. memory://demo only lives inside one process, so use a path).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

EPOCHS = 6
INTERRUPT_EPOCH, INTERRUPT_BATCH = 3, 7


def worker(dirpath: str, interrupt: bool) -> None:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_genesis_ckpt import GenesisCheckpoint

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)}

    class Preempt(pl.Callback):
        """Stands in for a cluster scheduler: a real SIGTERM to this process, mid-epoch."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if (trainer.current_epoch, batch_idx) == (INTERRUPT_EPOCH, INTERRUPT_BATCH):
                print(f"--> sending SIGTERM at epoch {INTERRUPT_EPOCH}, batch {INTERRUPT_BATCH}", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)

    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    y = (x[:, :8].sum(1, keepdim=True) - x[:, 8:16].sum(1, keepdim=True)) * 0.1
    train = DataLoader(TensorDataset(x[:1536], y[:1536]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1536:], y[1536:]), batch_size=256)
    callbacks: list[pl.Callback] = [GenesisCheckpoint(dirpath, monitor="val_loss", keep_last=3)]
    if interrupt:
        callbacks.append(Preempt())
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model := Regressor(), train, val)
    digest = sum(float(p.double().sum()) for p in model.parameters())
    print(
        f"--> finished: epoch {trainer.current_epoch}, step {trainer.global_step}, weight checksum {digest:.10f}"
    )


def table(dirpath: str) -> str:
    from lightning_genesis_ckpt import CheckpointStore

    store = CheckpointStore(dirpath, verbose=False)
    rows = [("file", "role", "epoch", "step", "val_loss", "size", "checksum")]
    for r in store.records():
        loss = r.metrics.get("val_loss")
        rows.append(
            (
                r.name,
                r.role,
                str(r.epoch),
                str(r.global_step),
                "-" if loss is None else f"{loss:.4f}",
                f"{r.size / 1024:.1f} KiB",
                r.checksum,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirpath", nargs="?", default="demo_checkpoints")
    p.add_argument("--worker", choices=["interrupted", "resume"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.dirpath, interrupt=args.worker == "interrupted")
        return

    if "://" not in args.dirpath and os.path.isdir(args.dirpath):
        shutil.rmtree(args.dirpath)
    start = time.perf_counter()
    for step, (mode, title) in enumerate(
        [("interrupted", "training (a scheduler will preempt it)"), ("resume", "the same command again")], 1
    ):
        print(f"\n=== run {step}: {title}", flush=True)
        proc = subprocess.run([sys.executable, __file__, args.dirpath, "--worker", mode])
        print(f"=== run {step} exited with code {proc.returncode}")
        if mode == "interrupted":
            print(f"\nwhat {args.dirpath} holds after the interruption:\n{table(args.dirpath)}")
        elif proc.returncode != 0:
            sys.exit(proc.returncode)
    print(f"\nwhat {args.dirpath} holds at the end:\n{table(args.dirpath)}")
    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
