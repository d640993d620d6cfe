"""Train TinyModel with GenesisCheckpoint in its own process; used by the signal and crash tests.

Prints one JSON line prefixed with RESULT: when fit returns normally.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models import FLAVOURS, SIGNALS, flavour, loaders

from lightning_genesis_ckpt import GenesisCheckpoint


def weights_digest(model: Any) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def print_result(trainer: Any, ckpt: GenesisCheckpoint, digest: str, **extra: Any) -> None:
    """The RESULT: line the tests parse: where the run ended and what it resumed from."""
    resumed = ckpt.resumed_from
    result = {
        "digest": digest,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "resumed_from": None if resumed is None else resumed.name,
        "resumed_step": None if resumed is None else resumed.global_step,
        **extra,
    }
    print("RESULT:" + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dirpath")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--signal", choices=sorted(SIGNALS))
    p.add_argument("--raise-at", action="store_true")
    p.add_argument("--at-epoch", type=int, default=1)
    p.add_argument("--at-batch", type=int, default=3)
    p.add_argument("--at-val-batch", type=int, default=None, help="signal before this validation batch")
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--preemption-signals", default=None, help="comma-separated (default: the callback's)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--flavour", choices=FLAVOURS, default="pytorch_lightning")
    p.add_argument("--storage-options", type=json.loads, default=None, help="JSON passed to fsspec")
    args = p.parse_args()
    # Ctrl+C at a terminal reaches a process whose SIGINT disposition is Python's default handler. A runner
    # that starts jobs in the background (nohup, `cmd &` in a script) passes SIGINT down as *ignored*, and
    # the simulated Ctrl+C would then do nothing: put the terminal's disposition back.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    f = flavour(args.flavour)
    f.pl.seed_everything(0)
    model = f.TinyModel(hidden=args.hidden, width=args.width)
    train, val = loaders(width=args.width)
    callbacks: list[Any] = [
        GenesisCheckpoint(
            args.dirpath,
            monitor="val_loss",
            storage_options=args.storage_options,
            **({"preemption_signals": args.preemption_signals.split(",")} if args.preemption_signals else {}),
        )
    ]
    if args.signal:
        callbacks.append(f.SignalAt(args.at_epoch, args.at_batch, SIGNALS[args.signal], args.at_val_batch))
    if args.raise_at:
        callbacks.append(f.RaiseAt(args.at_epoch, args.at_batch))
    trainer = f.make_trainer(callbacks, args.epochs, accumulate_grad_batches=args.accumulate)
    trainer.fit(model, train, val)
    ckpt = callbacks[0]
    assert isinstance(ckpt, GenesisCheckpoint)
    print_result(trainer, ckpt, weights_digest(model), interrupted=trainer.interrupted)


if __name__ == "__main__":
    main()
