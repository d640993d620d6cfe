"""A real Fabric loop on CPU with FabricCheckpointer: single process, or 2-process DDP (Fabric launches rank 1).

Prints one RESULT: line per rank at the end: the step it resumed from, the final step and a weights digest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from lightning.fabric import Fabric
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lightning_genesis_ckpt import FabricCheckpointer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dirpath")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--crash-at", type=int, help="raise after this many steps (inside the guard)")
    p.add_argument("--sigterm-at", type=int, help="SIGTERM this process after this many steps")
    args = p.parse_args()

    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    ckpt = FabricCheckpointer(fabric, args.dirpath, keep_last=2, monitor="loss", save_top_k=1)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    resumed = ckpt.resume(state)
    with ckpt.guard(state):
        while state["step"] < args.steps:
            # Data from the global RNG, per rank: an exact resume must restore it.
            x = torch.randn(16, 8) + fabric.global_rank
            y = x[:, :4].sum(1, keepdim=True)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            state["step"] += 1
            if state["step"] % args.save_every == 0:
                ckpt.save(state, metrics={"loss": loss.item()})
            if args.crash_at == state["step"]:
                raise RuntimeError("injected crash")
            if args.sigterm_at == state["step"] and fabric.global_rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            if ckpt.preempted():
                break
    digest = sum(float(p.double().sum()) for p in model.parameters())
    result = {
        "rank": fabric.global_rank,
        "resumed_step": None if resumed is None else resumed.global_step,
        "resumed_from": None if resumed is None else resumed.name,
        "step": state["step"],
        "digest": f"{digest:.12f}",
    }
    print("RESULT:" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
