"""One measurement in a fresh process; prints one JSON line. Driven by benchmarks/run_all.py.

Modes:
  raw         write the same bytes torch.save would produce (pre-serialized into a buffer outside the timing)
              + fsync: the physical limit of the disk
  torch       torch.save into an open file + flush + fsync
  lightning   lightning_fabric's _atomic_save (what ModelCheckpoint / Trainer.save_checkpoint use)
  genesis     CheckpointStore.save: atomic, fsync'd, checksummed, manifest updated
  load-plain  torch.load of a saved file
  load-mmap   torch.load(mmap=True) of a saved file (what genesis uses for inference loads)
  load-genesis, load-genesis-mmap   CheckpointStore.load of the same file: checksum-verified, one pass
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
    p.add_argument("--warm", action="store_true", help="loads: from the page cache (read once first)")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    target = os.path.join(args.dir, "bench.pth")

    if args.mode.startswith("load-"):
        from lightning_genesis_ckpt import CheckpointStore

        store = CheckpointStore(args.dir, verbose=False)
        # One file for every load mode: written by the store, so the verified loads have its record.
        if store.manifest().get("bench.pth") is None:
            store.save("bench.pth", make_state(args.bytes))
        if not args.warm:
            # Drop this file from the page cache so loads are comparable (best effort).
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        else:
            with open(target, "rb") as f:
                while f.read(8 << 20):
                    pass
        mmap = args.mode.endswith("-mmap")
        base = maxrss_bytes()
        start = time.perf_counter()
        if args.mode.startswith("load-genesis"):
            state = store.load("bench.pth", mmap=mmap)  # checksum-verified
        else:
            state = torch.load(target, weights_only=True, mmap=mmap)
        # Touch a strided sample of every tensor: each one is faulted in, as a first use would start.
        total = sum(float(t[:: max(1, t.numel() // 1024)].sum()) for k, t in state.items() if "layer" in k)
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
