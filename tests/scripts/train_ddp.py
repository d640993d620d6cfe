"""A real 2-process DDP fit on CPU (gloo) with GenesisCheckpoint; Lightning launches rank 1 from this script.

Each rank prints one line prefixed with RESULT: when fit returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models import flavour, loaders
from train import print_result, weights_digest

from lightning_genesis_ckpt import GenesisCheckpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dirpath")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--fail-on-rank", type=int)
    p.add_argument("--at-epoch", type=int, default=1)
    p.add_argument("--at-batch", type=int, default=2)
    p.add_argument("--monitor", default="val_loss")
    p.add_argument("--every-n-steps", type=int, help="step checkpoints (every_n_train_steps)")
    p.add_argument("--crash-at", type=int, nargs=2, help="EPOCH BATCH: every rank raises there, no snapshot")
    p.add_argument("--catch", action="store_true", help="print the error fit raised as FIT_ERROR: and exit 3")
    args = p.parse_args()

    f = flavour("pytorch_lightning")
    f.pl.seed_everything(0)
    model = f.TinyModel()
    train, val = loaders()
    ckpt = {"every_n_train_steps": args.every_n_steps, "save_on_exception": args.crash_at is None}
    callbacks = [GenesisCheckpoint(args.dirpath, monitor=args.monitor, **ckpt)]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.crash_at is not None:
        callbacks.append(f.RaiseAt(*args.crash_at))
    if args.fail_on_rank is not None and args.fail_on_rank == rank:
        callbacks.append(f.RaiseAt(args.at_epoch, args.at_batch))
    trainer = f.pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    try:
        trainer.fit(model, train, val)
    except Exception as e:
        if not args.catch:
            raise
        error = {"rank": rank, "type": type(e).__name__, "message": str(e)}
        # Both ranks share one stdout pipe: one write(2) of a line under PIPE_BUF is never interleaved with
        # the other rank's output (print may split it into several writes).
        sys.stdout.flush()
        os.write(1, ("\nFIT_ERROR:" + json.dumps(error) + "\n").encode())
        sys.exit(3)
    print_result(trainer, callbacks[0], weights_digest(model), rank=trainer.global_rank)


if __name__ == "__main__":
    main()
