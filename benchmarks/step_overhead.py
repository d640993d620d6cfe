"""The cost of frequent step checkpoints: GenesisCheckpoint (sync and async) vs Lightning's ModelCheckpoint.

    .venv/bin/python benchmarks/step_overhead.py                       # 16 and 128 MiB, every 25 steps, 5 runs
    .venv/bin/python benchmarks/step_overhead.py --sizes 16 --repeats 3   # quicker

Each run is a fresh process: a real Trainer fits a model of the given size (float32 Linear layers, plain
SGD with momentum, so the checkpoint is about twice the weights) for ``--steps`` optimizer steps in one epoch,
on a local temp directory, with one of:

* ``none``: no checkpointing (``enable_checkpointing=False``), the baseline;
* ``lightning``: ``ModelCheckpoint(every_n_train_steps=N)`` (keeps the newest, as by default);
* ``genesis``: ``GenesisCheckpoint(every_n_train_steps=N, keep_last=1, every_n_epochs=0)``;
* ``genesis-async``: the same with ``async_save=True``.

A timing callback takes ``perf_counter`` at every ``on_train_batch_start``, so each step's time includes the
hooks after it (the save, for a save step). Reported, as medians over the runs (interleaved: one run of each
mode, then the next round): the median step time of the steps that do not save ("between saves": it must not
move), the mean time of the save steps beyond that median ("per save": what one save blocks the loop), and
the total ``fit`` time relative to ``none``. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MODES = ("none", "lightning", "genesis", "genesis-async")


def run_one(mode: str, size_mib: int, every: int, steps: int, directory: str) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_genesis_ckpt import GenesisCheckpoint

    width = 1024
    layers = max(1, size_mib * 2**20 // (width * width * 4))

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.net(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-6, momentum=0.9)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer: Any, *args: Any) -> None:
            self.starts.append(time.perf_counter())

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(steps * 4, width)), batch_size=4)
    clock = Clock()
    callbacks: list[Any] = [clock]
    if mode == "lightning":
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=directory, every_n_train_steps=every))
    elif mode.startswith("genesis"):
        callbacks.append(
            GenesisCheckpoint(
                directory,
                every_n_train_steps=every,
                keep_last=1,
                every_n_epochs=0,
                async_save=mode == "genesis-async",
                verbose=False,
            )
        )
    trainer = pl.Trainer(
        max_epochs=1,
        max_steps=steps,
        callbacks=callbacks,
        # GenesisCheckpoint is a Checkpoint callback: with it listed, Lightning adds no default ModelCheckpoint.
        enable_checkpointing=mode != "none",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(Model(), data)
    total = time.perf_counter() - start
    durations = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)]
    # Step i (1-based) saves when i % every == 0; the last step's time includes the end of fit.
    saving = [d for i, d in enumerate(durations[:-1], 1) if i % every == 0]
    between = [d for i, d in enumerate(durations[:-1], 1) if i % every != 0 and i > 2]  # after warm-up
    return {"total": total, "between": statistics.median(between), "save_steps": saving}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="16,128", help="model sizes in MiB (weights; the state is ~2x)")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "SIZE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, size, directory = args.worker
        print(json.dumps(run_one(mode, int(size), args.every, args.steps, directory)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for size in sizes:
            for mode in MODES:
                directory = tempfile.mkdtemp(prefix="genesis-step-bench-", dir=os.environ.get("BENCH_DIR"))
                try:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            *("--every", str(args.every), "--steps", str(args.steps)),
                            *("--worker", mode, str(size), directory),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=900,
                        check=True,
                    )
                finally:
                    shutil.rmtree(directory, ignore_errors=True)
                results.setdefault((size, mode), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"step checkpoints every {args.every} steps, {args.steps} steps, medians of {args.repeats} fresh runs\n"
    )
    print(
        "| model (MiB) | mode | step between saves (ms) | per save, beyond a step (ms) | fit time vs none |"
    )
    print("|---|---|---|---|---|")
    table = []
    for size in sizes:
        base = statistics.median(r["total"] for r in results[(size, "none")])
        for mode in MODES:
            runs = results[(size, mode)]
            between = statistics.median(r["between"] for r in runs)
            per_save = (
                statistics.median(statistics.mean(r["save_steps"]) - r["between"] for r in runs)
                if mode != "none"
                else 0.0
            )
            ratio = statistics.median(r["total"] for r in runs) / base
            table.append(
                {
                    "size_mib": size,
                    "mode": mode,
                    "between_s": between,
                    "per_save_s": per_save,
                    "fit_vs_none": ratio,
                }
            )
            shown = "-" if mode == "none" else f"{per_save * 1000:.1f}"
            print(f"| {size} | {mode} | {between * 1000:.2f} | {shown} | {ratio:.3f}x |")
    print()
    print(json.dumps({"every": args.every, "steps": args.steps, "repeats": args.repeats, "rows": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
