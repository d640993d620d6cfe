"""Train BigModel with GenesisCheckpoint; the victim of the kill -9 tests (tests/crash_harness.py).

``crash_worker.py DIR [options]`` trains once. ``crash_worker.py --serve`` imports torch and Lightning once and
then forks one training process per request read from stdin (a JSON line: argv, env, log file), answering
with the child's pid and, once it is gone, its exit status. Every training run is still its own process that
really receives SIGKILL; the fork only saves the five seconds each fresh interpreter spends importing torch,
which would otherwise dominate a test of hundreds of kills.

Lines printed (flushed at once, so a killed run has printed all of them):
``FIT_START {"resumed_from": ..., "resumed_step": ...}`` once the checkpoint to resume from is chosen,
``EPOCH <n>`` as each epoch starts, ``RESULT {...}`` when fit returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pytorch_lightning as pl
from models import BigModel, loaders, make_trainer
from train import weights_digest

from lightning_genesis_ckpt import GenesisCheckpoint


class Progress(pl.Callback):
    def __init__(self, genesis: GenesisCheckpoint) -> None:
        self.genesis = genesis

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After auto-resume chose its checkpoint, before any training (and even when none is left to do).
        rec = self.genesis.resumed_from
        info = {
            "resumed_from": None if rec is None else rec.name,
            "resumed_step": None if rec is None else rec.global_step,
        }
        print("FIT_START " + json.dumps(info), flush=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"EPOCH {trainer.current_epoch}", flush=True)


def train(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dirpath")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--ballast-mb", type=float, default=32.0)
    p.add_argument("--keep-last", type=int, default=2)
    args = p.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = BigModel(ballast_mb=args.ballast_mb)
    train_loader, val_loader = loaders()
    genesis = GenesisCheckpoint(args.dirpath, monitor="val_loss", keep_last=args.keep_last)
    trainer = make_trainer([genesis, Progress(genesis)], args.epochs)
    trainer.fit(model, train_loader, val_loader)
    result = {"digest": weights_digest(model), "epoch": trainer.current_epoch, "step": trainer.global_step}
    print("RESULT " + json.dumps(result), flush=True)


def serve() -> None:
    print("READY", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the training process
            code = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(request["env"])
                train(request["argv"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        train(sys.argv[1:])
