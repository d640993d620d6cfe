"""One measurement in a fresh process; prints one JSON line. Driven by benchmarks/run_all.py.

Save modes (each times one save of ``--bytes`` of float32 weights in 16 tensors):
  floor           the durable floor: torch.save into a temp file beside the target, fsync, rename, fsync the
                  directory -- the least any crash-safe save must do
  floor-manifest  the floor, then one small manifest (a JSON line naming the file and its size) written
                  the same way: the reference the issue sets for small saves
  torch           torch.save into an open file + fsync (not atomic: a crash can leave a torn file)
  lightning       lightning_fabric's _atomic_save (what ModelCheckpoint / Trainer.save_checkpoint use)
  genesis         ``genesis.save(state, path)``: atomic, fsync'd, checksummed, manifest committed
  manager         ``CheckpointManager(dir).save_epoch_checkpoint(state, 1)``
  callback        a real one-epoch ``Trainer.fit`` with ``GenesisCheckpoint``: the callback's epoch save of
                  the trainer's own checkpoint dict (commit of checkpoint, best copy, retention)
  callback-floor  the same fit, the same checkpoint dict saved at the durable floor instead

Load modes (one store-written file; ``--warm`` reads it once first, else the page cache is dropped):
  load-plain, load-mmap                 torch.load(weights_only=True[, mmap=True]) (no verification)
  load-genesis, load-genesis-mmap       CheckpointStore.load of the same file: checksum-verified, one pass

Every save mode first does one tiny save of the same kind into another directory, so lazy imports and first
calls are outside the timed region, and calls ``os.sync()`` so writeback left by earlier runs does not land
in this one's fsync.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

MiB = 2**20


def make_state(nbytes: int, tensors: int = 16) -> dict[str, torch.Tensor]:
    per = nbytes // 4 // tensors
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.empty(per).uniform_(generator=g) for i in range(tensors)}


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def durable_write(target: str, write: Callable[[Any], None]) -> None:
    """``write(f)`` into a temp file beside ``target``, fsync, rename onto ``target``, fsync the directory."""
    directory = os.path.dirname(target)
    tmp = os.path.join(directory, ".tmp-" + os.path.basename(target))
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def floor_save(obj: Any, target: str) -> None:
    durable_write(target, lambda f: torch.save(obj, f))


def floor_manifest_save(obj: Any, directory: str) -> None:
    target = os.path.join(directory, "bench.pth")
    floor_save(obj, target)
    # The reference charges the manifest's write only: computing a checksum is the measured save's own work.
    entry = {"files": {"bench.pth": {"size": os.path.getsize(target), "crc32": 0}}, "version": 1}
    durable_write(os.path.join(directory, "manifest.json"), lambda f: f.write(json.dumps(entry).encode()))


def saver(mode: str) -> Callable[[Any, str], None]:
    """The function that saves ``state`` into directory ``d`` the way ``mode`` does."""
    from lightning_fabric.utilities.cloud_io import _atomic_save

    import lightning_genesis_ckpt as genesis

    def torch_fsync(obj: Any, d: str) -> None:
        with open(os.path.join(d, "bench.pth"), "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    savers: dict[str, Callable[[Any, str], None]] = {
        "floor": lambda obj, d: floor_save(obj, os.path.join(d, "bench.pth")),
        "floor-manifest": floor_manifest_save,
        "torch": torch_fsync,
        "lightning": lambda obj, d: _atomic_save(obj, os.path.join(d, "bench.pth")),
        "genesis": lambda obj, d: genesis.save(obj, os.path.join(d, "bench.pth")),
        "manager": lambda obj, d: genesis.CheckpointManager(d).save_epoch_checkpoint(obj, 1),
    }
    return savers[mode]


def time_save(mode: str, directory: str, nbytes: int) -> dict[str, Any]:
    save = saver(mode)
    warm = directory + "-warmup"
    os.makedirs(warm, exist_ok=True)
    save({"w": torch.zeros(256)}, warm)
    state = make_state(nbytes)
    os.makedirs(directory, exist_ok=True)
    os.sync()
    base = maxrss_bytes()
    cpu, start = time.process_time(), time.perf_counter()
    save(state, directory)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": elapsed, "cpu": cpu, "extra_rss": maxrss_bytes() - base}


def time_callback_save(mode: str, directory: str, nbytes: int) -> dict[str, Any]:
    """One epoch of a real fit; the epoch-end save of its checkpoint dict is what is timed."""
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_genesis_ckpt import GenesisCheckpoint
    from lightning_genesis_ckpt.adapter import commits

    class Weights(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 1)
            # Trained by plain SGD (no optimizer state), so the checkpoint is these bytes plus metadata.
            self.layers = nn.ParameterList(nn.Parameter(t) for t in make_state(nbytes).values())

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.head(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    timing: dict[str, Any] = {}
    original = commits.commit

    def timed_commit(store: Any, checkpoint: dict[str, Any], *args: Any) -> Any:
        os.sync()
        base = maxrss_bytes()
        cpu, start = time.process_time(), time.perf_counter()
        if mode == "callback-floor":
            floor_save(checkpoint, os.path.join(directory + "-floor", "bench.pth"))
        else:
            result = original(store, checkpoint, *args)
        timing.update(
            seconds=time.perf_counter() - start,
            cpu=time.process_time() - cpu,
            extra_rss=maxrss_bytes() - base,
        )
        return original(store, checkpoint, *args) if mode == "callback-floor" else result

    commits.commit = timed_commit  # type: ignore[assignment]
    os.makedirs(directory + "-floor", exist_ok=True)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    data = DataLoader(TensorDataset(torch.randn(4, 8), torch.randn(4, 1)), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[GenesisCheckpoint(directory, monitor="loss", verbose=False)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Weights(), data)
    return timing


def time_load(mode: str, directory: str, nbytes: int, warm: bool) -> dict[str, Any]:
    from lightning_genesis_ckpt import CheckpointStore

    target = os.path.join(directory, "bench.pth")
    store = CheckpointStore(directory, verbose=False)
    # One file for every load mode: written by the store, so the verified loads have its record.
    if store.manifest().get("bench.pth") is None:
        store.save("bench.pth", make_state(nbytes))
    if not warm:
        # Drop this file from the page cache so loads are comparable (best effort).
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    else:
        with open(target, "rb") as f:
            while f.read(8 * MiB):
                pass
    mmap = mode.endswith("-mmap")
    base = maxrss_bytes()
    start = time.perf_counter()
    if mode.startswith("load-genesis"):
        state = store.load("bench.pth", mmap=mmap)  # checksum-verified
    else:
        state = torch.load(target, weights_only=True, mmap=mmap)
    # Touch a strided sample of every tensor: each one is faulted in, as a first use would start.
    total = sum(float(t[:: max(1, t.numel() // 1024)].sum()) for k, t in state.items() if "layer" in k)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "extra_rss": maxrss_bytes() - base, "x": total}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("dir")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--warm", action="store_true", help="loads: from the page cache (read once first)")
    args = p.parse_args()
    logging.getLogger("lightning_genesis_ckpt").setLevel(logging.WARNING)
    if args.mode.startswith("load-"):
        os.makedirs(args.dir, exist_ok=True)
        result = time_load(args.mode, args.dir, args.bytes, args.warm)
    elif args.mode.startswith("callback"):
        result = time_callback_save(args.mode, args.dir, args.bytes)
    else:
        result = time_save(args.mode, args.dir, args.bytes)
    print(json.dumps({"mode": args.mode, **result}))


if __name__ == "__main__":
    main()
