"""One of several processes racing to take a stale lock, round after round.

``lock_race.py URL --storage-options JSON`` prints ``READY``, then for each line ``<round> <unix time>`` on
stdin waits until that time, tries to lock the directory and prints ``<round> WON`` or ``<round> LOST``. The
winner keeps the lock until the next line ``release``, then releases it and prints ``<round> RELEASED``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_genesis_ckpt import CheckpointStore, StoreLockedError


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--storage-options", type=json.loads, default=None)
    args = p.parse_args()
    print("READY", flush=True)
    store: CheckpointStore | None = None
    current = ""
    for line in sys.stdin:
        if line.strip() == "release":
            if store is not None:
                store.release_lock()
                print(f"{current} RELEASED", flush=True)
                store = None
            continue
        current, at = line.split()
        attempt = CheckpointStore(args.url, args.storage_options, verbose=False)
        while time.time() < float(at):
            pass  # spin: every process starts within microseconds of the others
        try:
            attempt.acquire_lock()
        except StoreLockedError:
            print(f"{current} LOST", flush=True)
            continue
        store = attempt
        print(f"{current} WON", flush=True)


if __name__ == "__main__":
    main()
