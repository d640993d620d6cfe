"""Concurrent writers, on every backend of the ``store_url`` fixture: the lock is the store's rule.

Every writer (the store's own operations, a transaction, ``CheckpointManager``, ``tag_version``,
``save_version``, ``import_checkpoint``, ``genesis.save``, ``genesis-ckpt prune``) goes through the lock: in the
holder's process it goes through the holder, from anywhere else it is refused naming the holder. Read-only use
never removes or rewrites anything. The cases with real processes are in ``tests/test_live_writers.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StoreTarget

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import CheckpointManager, CheckpointStore, StoreLockedError, cli
from lightning_genesis_ckpt.core.names import (
    BEST_NAME,
    INTERRUPT_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    TMP_PREFIX,
    epoch_name,
    intent_name,
)

HOLDER = "pid 4242 on host gpu-node-17"


def state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"w": torch.randn(64), "epoch": seed}


def files(target: StoreTarget) -> dict[str, bytes]:
    """Every file in the directory and its bytes, read fresh through a filesystem of the test's own."""
    fs = target.fs()
    root = target.store().root
    return {name: fs.cat_file(f"{root}/{name}") for name in target.names()}


def put(target: StoreTarget, name: str, data: bytes) -> None:
    fs = target.fs()
    root = target.store().root
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{name}", data)


def foreign_lock(target: StoreTarget) -> None:
    """The lock of a live run on another machine: its heartbeat is fresh."""
    now = time.time()
    info = {
        "token": "another-run",
        "host": "gpu-node-17",
        "pidns": 1,
        "pid": 4242,
        "start": None,
        "acquired": now,
        "heartbeat": now,
        "lease_s": 600.0,
    }
    put(target, LOCK_NAME, json.dumps(info).encode())


def cli_options(target: StoreTarget) -> list[str]:
    return [
        arg
        for k, v in target.storage_options.items()
        for arg in ("-o", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")
    ]


def run_cli(target: StoreTarget, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*args, *cli_options(target)])
    return code, out.getvalue(), err.getvalue()


def a_run(target: StoreTarget) -> CheckpointStore:
    """A directory a finished run left: two rolling checkpoints and best_model.pth, lock released."""
    store = target.store(verbose=False)
    for epoch in range(2):
        store.save(epoch_name(epoch), state(epoch), role="epoch", epoch=epoch, global_step=10 * (epoch + 1))
    store.copy(epoch_name(1), BEST_NAME)
    return store


def test_every_writer_is_refused_while_another_run_holds_the_directory(
    store_url: StoreTarget, tmp_path: Path
) -> None:
    url, opts = store_url.url, store_url.storage_options
    a_run(store_url)
    foreign_lock(store_url)
    elsewhere = tmp_path / "elsewhere.pth"
    torch.save(state(7), elsewhere)
    before = files(store_url)

    def transaction() -> None:
        with store_url.store().transaction() as tx:
            tx.write("x.pth", state(3))

    writers: dict[str, Callable[[], Any]] = {
        "store.save": lambda: store_url.store().save("x.pth", state(3)),
        "store.copy": lambda: store_url.store().copy(epoch_name(0), "y.pth"),
        "store.delete": lambda: store_url.store().delete([epoch_name(0)]),
        "transaction": transaction,
        "manager": lambda: CheckpointManager(url, storage_options=opts).save_epoch_checkpoint(state(2), 2),
        "save_version": lambda: genesis.save_version(url, state(4), "v1", storage_options=opts),
        "tag_version": lambda: genesis.tag_version(url, "v2", epoch_name(0), storage_options=opts),
        "import": lambda: genesis.import_checkpoint(str(elsewhere), url, storage_options=opts),
        "genesis.save": lambda: genesis.save(state(5), f"{url}/model.pth", storage_options=opts),
    }
    for write in writers.values():
        with pytest.raises(StoreLockedError, match=HOLDER):
            write()
    code, _, err = run_cli(store_url, "prune", url, "--keep-last", "1")
    assert code == 2 and HOLDER in err and "Traceback" not in err
    assert files(store_url) == before


def test_read_only_use_never_removes_or_rewrites_anything(store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    a_run(store_url)
    # What a killed writer leaves behind, for the holder to clean up: a temporary file, and a checkpoint it
    # published but never committed (its intent marker proves it ours).
    put(store_url, f"{TMP_PREFIX}0123456789ab-checkpoint_epoch_2.pth", b"half a checkpoint")
    buf = io.BytesIO()
    torch.save(state(2), buf)
    put(store_url, epoch_name(2), buf.getvalue())
    put(store_url, intent_name(epoch_name(2)), b"")
    before = files(store_url)

    mgr = CheckpointManager(url, storage_options=opts)
    assert mgr.load_latest_checkpoint()["epoch"] == 1
    assert mgr.load_best_model() is not None
    reader = store_url.store()
    assert [r.name for r in reader.records()] == [epoch_name(0), epoch_name(1), BEST_NAME]
    reader.verify(BEST_NAME)
    assert genesis.load(f"{url}/{epoch_name(0)}", storage_options=opts)["epoch"] == 0
    assert genesis.validate_checkpoint(f"{url}/{BEST_NAME}", storage_options=opts)[0]
    assert genesis.list_versions(url, storage_options=opts) == []
    for command in (("ls", url, "--verify"), ("verify", url), ("resume-path", url)):
        code, _, err = run_cli(store_url, *command)
        assert code == 0, err
    assert files(store_url) == before, "a reader removed or rewrote a file"

    # Only the lock holder cleans up.
    holder = store_url.store()
    holder.acquire_lock()
    try:
        left = set(store_url.names())
        assert epoch_name(2) not in left and not [n for n in left if n.startswith(TMP_PREFIX)]
    finally:
        holder.release_lock()


def test_writers_in_the_holders_process_go_through_the_holder(store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    holder = store_url.store(verbose=False)
    holder.acquire_lock()
    try:
        holder.save(epoch_name(0), state(0), role="epoch", epoch=0, global_step=10)
        # Other writers in this process, each with a store of its own, while the holder runs.
        genesis.tag_version(url, "v1", epoch_name(0), storage_options=opts)
        genesis.save_version(url, state(9), "v2", storage_options=opts)
        mgr = CheckpointManager(url, storage_options=opts)
        mgr.save_best_model(state(1), 0.5)
        # The holder's next commits must keep what they committed: it re-reads the manifest under the lock.
        holder.save(epoch_name(1), state(1), role="epoch", epoch=1, global_step=20)
        with holder.transaction() as tx:
            tx.delete([epoch_name(0)])
        listed = set(store_url.store().manifest().records)
        assert listed == {epoch_name(1), "version_v1.pth", "version_v2.pth", BEST_NAME}
        for name in listed:
            store_url.store().verify(name)
        mgr.close()
    finally:
        holder.release_lock()
    assert LOCK_NAME not in store_url.names()


def test_an_epoch_is_one_transaction_with_one_manifest_write(store_url: StoreTarget) -> None:
    store = store_url.store(verbose=False)
    store.acquire_lock()
    try:
        for epoch in range(2):
            store.save(epoch_name(epoch), state(epoch), role="epoch", epoch=epoch, global_step=epoch + 1)
        store.save(INTERRUPT_NAME, state(5), role="interrupt", epoch=1, global_step=2)
        generation = store.manifest().generation
        # A new rolling checkpoint, best_model.pth as a copy of it, two old files retired.
        with store.transaction() as tx:
            record = tx.write(epoch_name(2), state(2), role="epoch", epoch=2, global_step=3)
            tx.copy(record.name, BEST_NAME)
            tx.delete([epoch_name(0), INTERRUPT_NAME])
            assert store_url.store().manifest().get(epoch_name(2)) is None, "committed before the end"
        manifest = store_url.store().manifest()
        assert manifest.generation == generation + 1
        assert sorted(manifest.records) == [BEST_NAME, epoch_name(1), epoch_name(2)]
        assert manifest.get(BEST_NAME).checksum == record.checksum
        assert epoch_name(0) not in store_url.names() and INTERRUPT_NAME not in store_url.names()
        # The next epoch replaces best_model.pth in place: still one manifest write.
        with store.transaction() as tx:
            record = tx.write(epoch_name(3), state(3), role="epoch", epoch=3, global_step=4)
            tx.copy(record.name, BEST_NAME)
        assert store_url.store().manifest().generation == generation + 2
        assert torch.equal(store_url.store().load(BEST_NAME)["w"], state(3)["w"])
        assert not [n for n in store_url.names() if n.startswith(TMP_PREFIX)]
    finally:
        store.release_lock()


def test_a_failed_transaction_commits_nothing(store_url: StoreTarget) -> None:
    store = store_url.store(verbose=False)
    store.save(epoch_name(0), state(0), role="epoch", epoch=0, global_step=1)
    before = files(store_url)
    with pytest.raises(RuntimeError, match="on purpose"), store.transaction() as tx:
        tx.write(epoch_name(1), state(1), role="epoch", epoch=1, global_step=2)
        tx.delete([epoch_name(0)])
        raise RuntimeError("fails on purpose")
    assert files(store_url) == before
    assert MANIFEST_NAME in before and LOCK_NAME not in store_url.names()
