"""A writer that is paused between publishing a checkpoint and committing it: the fencing tests' victim.

``hold_and_commit.py URL --storage-options JSON --lease S`` locks the directory with a lease of S seconds,
prints ``LOCKED <pid>`` (its pid as the test's PID namespace numbers it), then saves ``a.pth``. With ``GENESIS_CKPT_TEST_STOP_AT=after-rename-before-manifest`` in
its environment it stops itself (SIGSTOP) once the data is published, before the manifest write; the test
continues it with SIGCONT. It prints ``COMMITTED`` if the save committed, or ``FENCED <error>`` if the store
refused to commit because another run holds the lock now.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch

from lightning_genesis_ckpt import CheckpointStore, StoreLockedError


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--storage-options", type=json.loads, default=None)
    p.add_argument("--lease", type=float, default=1.0)
    args = p.parse_args()
    store = CheckpointStore(args.url, args.storage_options, verbose=False)
    store.acquire_lock(lease_s=args.lease)
    # Run under ``unshare --pid`` the process has another pid in its own namespace than the test sees.
    with open("/proc/self/stat") as f:
        print(f"LOCKED {f.read().split()[0]}", flush=True)
    try:
        store.save("a.pth", {"w": torch.ones(1000)})
    except StoreLockedError as e:
        print(f"FENCED {e}", flush=True)
        return
    finally:
        store.release_lock()
    print("COMMITTED", flush=True)


if __name__ == "__main__":
    main()
