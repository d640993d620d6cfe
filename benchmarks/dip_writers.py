"""Which part of a background save slows the training loop: a raw write, torch.save, or our save.

    .venv/bin/python benchmarks/dip_writers.py [--bytes N] [--scratch DIR]

A fixed CPU step (matmuls, one intra-op thread) runs in a loop while a thread writes N bytes (default
256 MiB) three ways, twice each: ``os.write`` of pre-serialized bytes + fsync (pure C, the GIL released),
``torch.save`` + fsync, and ``CheckpointStore.save``. Prints each one's median step time against the idle
step (docs/performance.md). Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_genesis_ckpt import CheckpointStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes", type=int, default=256 << 20)
    p.add_argument("--scratch", default=str(Path(__file__).resolve().parent.parent / ".bench-scratch"))
    args = p.parse_args()
    root = Path(args.scratch) / "dip-writers"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.set_num_threads(1)
    state = {f"l{i}": torch.randn(args.bytes // 4 // 16) for i in range(16)}
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    w, x0 = torch.nn.Linear(384, 384), torch.randn(64, 384)

    def step() -> float:
        start, x = time.perf_counter(), x0
        with torch.no_grad():
            for _ in range(40):
                x = torch.tanh(w(x))
        return time.perf_counter() - start

    def raw() -> None:
        fd = os.open(root / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        view = memoryview(payload)
        for i in range(0, len(view), 8 << 20):
            os.write(fd, view[i : i + (8 << 20)])
        os.fsync(fd)
        os.close(fd)

    def plain() -> None:
        with open(root / "t.pth", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    store = CheckpointStore(str(root / "store"), verbose=False)
    count = [0]

    def genesis() -> None:
        count[0] += 1
        store.save(f"c{count[0]}.pth", state)

    def during(write: Callable[[], None]) -> tuple[float, int]:
        thread, times = threading.Thread(target=write), []
        thread.start()
        while thread.is_alive():
            times.append(step())
        return statistics.median(times), len(times)

    idle = statistics.median(step() for _ in range(30))
    for name, write in [("os.write", raw), ("torch.save", plain), ("genesis", genesis)] * 2:
        busy, n = during(write)
        print(
            f"{name:10s} step {busy * 1e3:.1f} ms vs idle {idle * 1e3:.1f} ms: {100 * (busy / idle - 1):+.0f}% ({n} steps)"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
