"""One measurement in a fresh process; prints one JSON line. Driven by benchmarks/run_all.py.

Modes:
  raw         write the same bytes torch.save would produce (pre-serialized into a buffer outside the timing)
              + fsync: the physical limit of the disk
  torch       torch.save into an open file + flush + fsync
  lightning   lightning_fabric's _atomic_save (what ModelCheckpoint / Trainer.save_checkpoint use)
  genesis     CheckpointStore.save: atomic, fsync'd, checksummed, manifest updated
  load-plain  torch.load of a saved file
  load-mmap   torch.load(mmap=True) of a saved file (what genesis uses for inference loads)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import time

import torch


def make_state(nbytes: int, tensors: int = 16) -> dict[str, torch.Tensor]:
    per = nbytes // 4 // tensors
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(tensors)}


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("dir")
    p.add_argument("--bytes", type=int, required=True)
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    target = os.path.join(args.dir, "bench.pth")

    if args.mode.startswith("load-"):
        if not os.path.exists(target):
            torch.save(make_state(args.bytes), target)
        # Drop this file from the page cache so loads are comparable (best effort; needs root).
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        base = maxrss_bytes()
        start = time.perf_counter()
        state = torch.load(target, weights_only=True, mmap=args.mode == "load-mmap")
        # Touch a strided sample of every tensor: each one is faulted in, as a first use would start.
        total = sum(float(t[:: max(1, t.numel() // 1024)].sum()) for t in state.values())
        elapsed = time.perf_counter() - start
        print(
            json.dumps(
                {"mode": args.mode, "seconds": elapsed, "extra_rss": maxrss_bytes() - base, "x": total}
            )
        )
        return

    # Imports happen before the clock starts: only the save itself is timed.
    from lightning_fabric.utilities.cloud_io import _atomic_save

    from lightning_genesis_ckpt import CheckpointStore

    state = make_state(args.bytes)
    payload = None
    if args.mode == "raw":
        buf = io.BytesIO()
        torch.save(state, buf)
        payload = buf.getbuffer()
    base = maxrss_bytes()
    start = time.perf_counter()
    if args.mode == "raw":
        assert payload is not None
        with open(target, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    elif args.mode == "torch":
        with open(target, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    elif args.mode == "lightning":
        _atomic_save(state, target)
    elif args.mode == "genesis":
        CheckpointStore(args.dir, verbose=False).save("bench.pth", state)
    else:
        raise SystemExit(f"unknown mode {args.mode}")
    elapsed = time.perf_counter() - start
    size = os.path.getsize(target)
    print(
        json.dumps({"mode": args.mode, "seconds": elapsed, "extra_rss": maxrss_bytes() - base, "size": size})
    )


if __name__ == "__main__":
    main()
