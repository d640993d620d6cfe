"""Resuming 10,000 batches into an epoch: GenesisCheckpoint's fast-forward vs re-iterating the loader.

    .venv/bin/python benchmarks/fastforward.py                 # 10,000 batches, 5 fresh processes per method
    .venv/bin/python benchmarks/fastforward.py --batches 2000 --repeats 3   # quicker

Set-up (once): a real Trainer trains 10,000 steps into a 10,050-batch epoch and saves a step checkpoint.
Then, in fresh processes, interleaved run by run:

* ``genesis``: a fresh Trainer auto-resumes from that checkpoint; timed from ``on_train_start`` (just before
  GenesisCheckpoint positions the loader) to the first batch of the resumed epoch reaching the model. Also
  reported: the whole resume, from the ``fit`` call (checkpoint load included) to that batch.
* ``reiterate``: the same DataLoader from the same seed, its iterator advanced past 10,000 batches by
  loading and discarding them, then the first batch: the cost of resuming by re-reading, which is what
  HF Trainer did before ``skip_first_batches`` and what Accelerate's ``skip_first_batches`` still does for an
  iterable or dispatched loader (for a plain map-style loader Accelerate also skips at the sampler level).

The dataset's ``__getitem__`` does what an image pipeline does per sample: uint8 to float, a random crop, a
random flip and a normalisation (tens of microseconds). Medians are reported; nothing here is a test.
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BATCH = 16
EXTRA = 50  # batches left in the epoch after the resume point


def build(batches: int) -> tuple[Any, Any, Any]:
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    class Images(Dataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.pool = torch.randint(0, 256, (512, 3, 40, 40), dtype=torch.uint8, generator=g)
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.pool[i % len(self.pool)].float().div_(255)
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = x[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            x = (x - 0.5) / 0.25
            return x, torch.tensor(i % 10)

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    pl.seed_everything(0)
    loader = DataLoader(Images((batches + EXTRA) * BATCH), batch_size=BATCH, shuffle=True)
    return pl, Model(), loader


def trainer(pl: Any, d: str, max_steps: int, extra: list[Any]) -> Any:
    from lightning_genesis_ckpt import GenesisCheckpoint

    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        callbacks=[*extra, GenesisCheckpoint(d, every_n_train_steps=max_steps, verbose=False)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def setup(d: str, batches: int) -> dict[str, Any]:
    pl, model, loader = build(batches)
    start = time.perf_counter()
    trainer(pl, d, batches, []).fit(model, loader)
    return {"trained_s": time.perf_counter() - start}


def genesis(d: str, batches: int) -> dict[str, Any]:
    # A copy per run: the resumed fit commits a checkpoint of its own, the next run must start from the set-up's.
    run_dir = tempfile.mkdtemp(dir=Path(d).parent)
    d = shutil.copytree(d, Path(run_dir) / "ck").as_posix()
    pl, model, loader = build(batches)
    times: dict[str, float] = {}

    class Timer(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            times["train_start"] = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            times.setdefault("first_batch", time.perf_counter())
            times.setdefault("batch_idx", batch_idx)

    fit_call = time.perf_counter()
    trainer(pl, d, batches + 1, [Timer()]).fit(model, loader)
    if times["batch_idx"] != batches:
        raise RuntimeError(f"resumed at batch {times['batch_idx']}, not {batches}")
    return {
        "skip_s": times["first_batch"] - times["train_start"],
        "resume_s": times["first_batch"] - fit_call,
    }


def reiterate(d: str, batches: int) -> dict[str, Any]:
    _, _, loader = build(batches)
    start = time.perf_counter()
    it = iter(loader)
    for _ in range(batches):
        next(it)
    next(it)
    return {"skip_s": time.perf_counter() - start}


def child(method: str, d: str, batches: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, __file__, "--child", method, "--dir", d, "--batches", str(batches)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", choices=["setup", "genesis", "reiterate"])
    p.add_argument("--dir")
    args = p.parse_args()
    if args.child:
        fn = {"setup": setup, "genesis": genesis, "reiterate": reiterate}[args.child]
        print(json.dumps(fn(args.dir, args.batches)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = str(Path(tmp) / "ck")
        trained = child("setup", d, args.batches)["trained_s"]
        runs: dict[str, list[dict[str, Any]]] = {"genesis": [], "reiterate": []}
        for _ in range(args.repeats):
            for method in runs:  # interleaved: drift in CPU load hits both alike
                runs[method].append(child(method, d, args.batches))
    med = {m: statistics.median(r["skip_s"] for r in rs) for m, rs in runs.items()}
    resume = statistics.median(r["resume_s"] for r in runs["genesis"])
    result = {
        "batches_skipped": args.batches,
        "batch_size": BATCH,
        "repeats": args.repeats,
        "setup_training_s": round(trained, 2),
        "genesis_fast_forward_s": round(med["genesis"], 4),
        "genesis_whole_resume_s": round(resume, 3),
        "reiterate_s": round(med["reiterate"], 3),
        "speedup": round(med["reiterate"] / med["genesis"], 1),
        "all_runs": runs,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
