"""The writer's lock, on every backend of the ``store_url`` fixture (see lightning_genesis_ckpt/lock.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from conftest import StoreTarget

from lightning_genesis_ckpt import CheckpointStore, StoreLockedError
from lightning_genesis_ckpt.core.names import LOCK_NAME, MANIFEST_NAME
from lightning_genesis_ckpt.storage.lock import LockInfo, _pid_namespace, _start_time


@pytest.fixture
def stores(store_url: StoreTarget) -> Iterator[tuple[CheckpointStore, CheckpointStore]]:
    a, b = store_url.store(), store_url.store()
    yield a, b
    a.release_lock()
    b.release_lock()


def write_lock(store: CheckpointStore, **fields: object) -> None:
    now = time.time()
    info = {
        "token": "someone-else",
        "host": "gpu-node-17",
        "pidns": 1,
        "pid": 4242,
        "start": None,
        "acquired": now,
        "heartbeat": now,
        "lease_s": 60.0,
        **fields,
    }
    store.fs.makedirs(store.root, exist_ok=True)
    store.fs.pipe_file(store.path(LOCK_NAME), json.dumps(info).encode())


def lock_on_disk(store: CheckpointStore) -> LockInfo | None:
    if not store.fs.exists(store.path(LOCK_NAME)):
        return None
    return LockInfo.decode(store.fs.cat_file(store.path(LOCK_NAME)))


def test_a_second_store_of_the_process_shares_the_holders_lock(stores: tuple[CheckpointStore, ...]) -> None:
    # Another process is refused (tests/test_two_writers.py, tests/test_live_writers.py); a store of the same
    # process goes through the holder, and the lock lasts until the last of them lets go.
    a, b = stores
    a.acquire_lock()
    b.acquire_lock()
    holder = lock_on_disk(a)
    assert holder is not None and holder.pid == os.getpid()
    a.save("x.pth", {"w": torch.ones(3)})
    b.save("y.pth", {"w": torch.ones(3)})
    a.release_lock()
    assert lock_on_disk(a) == holder, "b still holds it"
    a.save("z.pth", {"w": torch.ones(3)})  # through b, the holder now
    b.release_lock()
    assert lock_on_disk(a) is None
    assert sorted(a.manifest(refresh=True).records) == ["x.pth", "y.pth", "z.pth"]


def test_live_lock_of_another_host_is_respected(stores: tuple[CheckpointStore, ...]) -> None:
    a, _ = stores
    write_lock(a, heartbeat=time.time() - 10)
    with pytest.raises(StoreLockedError, match=r"pid 4242 on host gpu-node-17.*abandoned in (4|5)\d s"):
        a.acquire_lock()
    assert lock_on_disk(a).token == "someone-else"  # untouched


@pytest.mark.parametrize(
    ("why", "fields", "match"),
    [
        ("expired lease", {"heartbeat": time.time() - 3600}, "longer than its 60 s lease"),
        ("dead pid here", {"host": socket.gethostname(), "pidns": _pid_namespace()}, "has ended"),
        # the pid is alive (this process) but started at another time: a reused pid
        (
            "reused pid",
            {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(), "start": 1},
            "has ended",
        ),
    ],
)
def test_stale_lock_is_replaced_with_a_warning(
    stores: tuple[CheckpointStore, ...], caplog: pytest.LogCaptureFixture, why: str, fields: dict, match: str
) -> None:
    a, _ = stores
    if why == "dead pid here":
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        fields = {**fields, "pid": int(dead.stdout)}
    if why == "reused pid" and _start_time(os.getpid()) is None:
        pytest.skip("no /proc/<pid>/stat here: process start times are unknown, reused pids look alive")
    write_lock(a, **fields)
    with caplog.at_level(logging.WARNING):
        a.acquire_lock()
    assert "replacing the stale lock" in caplog.text and match in caplog.text
    assert lock_on_disk(a).pid == os.getpid()


def test_unreadable_lock_is_stale(
    stores: tuple[CheckpointStore, ...], caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = stores
    a.fs.makedirs(a.root, exist_ok=True)
    a.fs.pipe_file(a.path(LOCK_NAME), b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        a.acquire_lock()
    assert "cannot be parsed" in caplog.text


def test_a_taken_over_lock_stops_the_next_commit(
    stores: tuple[CheckpointStore, ...], store_url: StoreTarget
) -> None:
    a, _ = stores
    a.acquire_lock()
    a.save("x.pth", {"w": torch.ones(3)})
    # Another run judged ours abandoned and took over: it wrote its lock, then the manifest (a fencing write).
    write_lock(a)
    manifest = store_url.store().manifest()
    a.fs.pipe_file(
        a.manifest_path, dataclasses.replace(manifest, generation=manifest.generation + 1).encode()
    )
    with pytest.raises(StoreLockedError, match="lost its lock"):
        a.save("y.pth", {"w": torch.ones(3)})
    with pytest.raises(StoreLockedError, match="lost its lock"):
        a.delete(["x.pth"])
    assert sorted(store_url.store().manifest().records) == ["x.pth"]
    assert not a.fs.exists(a.path("y.pth"))
    a.release_lock()
    assert lock_on_disk(a).token == "someone-else", "release must not remove the new owner's lock"


def test_heartbeat_is_refreshed_in_the_background(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.acquire_lock(lease_s=0.2)
    try:
        first = lock_on_disk(store).heartbeat
        deadline = time.monotonic() + 30
        while lock_on_disk(store).heartbeat == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock_on_disk(store).heartbeat > first
    finally:
        store.release_lock()


def test_the_lock_file_is_never_a_checkpoint(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_url.store()
    store.acquire_lock()
    try:
        with pytest.raises(ValueError, match="reserved"):
            store.save(LOCK_NAME, {"w": torch.ones(1)})
        store.save("checkpoint_epoch_0.pth", {"w": torch.ones(3)}, epoch=0, global_step=1)
        store.fs.rm_file(store.path(MANIFEST_NAME))
        with caplog.at_level(logging.WARNING):
            rebuilt = store_url.store().manifest()
        assert list(rebuilt.records) == ["checkpoint_epoch_0.pth"]
        assert LOCK_NAME not in caplog.text
        assert store.sweep_temp() == [] and lock_on_disk(store) is not None
    finally:
        store.release_lock()
