"""Recovery adopts only what the store wrote under that name, on every backend of the ``store_url`` fixture."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StoreTarget

from lightning_genesis_ckpt import CheckpointManager, ManifestError
from lightning_genesis_ckpt.core.manifest import Manifest
from lightning_genesis_ckpt.core.names import BEST_NAME, MANIFEST_NAME, epoch_name
from lightning_genesis_ckpt.storage.resume import resolve

from .test_writers import files, put


def state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"w": torch.randn(32), "epoch": seed}


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def lose_manifest(target: StoreTarget) -> None:
    target.fs().rm_file(target.store().manifest_path)


def rolling(target: StoreTarget, epochs: range) -> None:
    store = target.store(verbose=False)
    for epoch in epochs:
        store.save(epoch_name(epoch), state(epoch), role="epoch", epoch=epoch, global_step=10 * (epoch + 1))


def test_a_users_copy_under_another_name_is_never_adopted_or_deleted(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    rolling(store_url, range(3))
    store = store_url.store(verbose=False)
    store.copy(epoch_name(1), BEST_NAME)
    fs, root = store_url.fs(), store.root
    fs.copy(f"{root}/{epoch_name(2)}", f"{root}/keep_for_paper.pth")  # cp checkpoint_epoch_2.pth keep...
    fs.copy(f"{root}/{epoch_name(0)}", f"{root}/{epoch_name(7)}")  # ... even under one of our names
    kept = {n: files(store_url)[n] for n in ("keep_for_paper.pth", epoch_name(7))}
    lose_manifest(store_url)
    with caplog.at_level(logging.WARNING):
        rebuilt = store_url.store().manifest()
    assert "rebuilding" in caplog.text
    assert sorted(rebuilt.records) == sorted([BEST_NAME, *(epoch_name(e) for e in range(3))])
    assert rebuilt.get(BEST_NAME).role == "best"
    assert resolve(store_url.store(), load=False).record.name == epoch_name(2)
    # Retention after the rebuild (the holder persists it first) never touches the copies.
    manager = CheckpointManager(store_url.url, max_to_keep=1, storage_options=store_url.storage_options)
    manager.save_epoch_checkpoint(state(3), 3)
    manager.close()
    now = files(store_url)
    assert {n: now[n] for n in kept} == kept
    assert sorted(store_url.store().manifest().records) == [BEST_NAME, epoch_name(3)]


def test_unlisted_files_under_our_names_are_never_overwritten(store_url: StoreTarget) -> None:
    rolling(store_url, range(1))
    # A directory the original Genesis utility wrote into as well: our names, none of our metadata.
    theirs = {epoch_name(1): torch_bytes(state(100)), BEST_NAME: torch_bytes(state(101))}
    for name, data in theirs.items():
        put(store_url, name, data)
    store = store_url.store(verbose=False)
    for name in theirs:
        with pytest.raises(FileExistsError, match=name):
            store.save(name, state(1), role="epoch", epoch=1, global_step=20)
    with pytest.raises(FileExistsError, match=BEST_NAME):
        store.copy(epoch_name(0), BEST_NAME)
    assert {n: files(store_url)[n] for n in theirs} == theirs
    assert sorted(store_url.store().manifest().records) == [epoch_name(0)]


def test_a_deleting_entry_removes_only_the_file_it_listed(store_url: StoreTarget) -> None:
    rolling(store_url, range(3))
    store = store_url.store(verbose=False)
    manifest = store.manifest()
    # A writer killed right after the manifest forgot epochs 0 and 1: both files are still there.
    put(store_url, MANIFEST_NAME, manifest.without([epoch_name(0), epoch_name(1)]).encode())
    # The user then put a file of their own back under one of the names.
    mine = torch_bytes({"mine": torch.ones(3)})
    put(store_url, epoch_name(1), mine)
    holder = store_url.store(verbose=False)
    holder.acquire_lock()
    holder.release_lock()
    left = files(store_url)
    assert epoch_name(0) not in left, "the listed file is removed"
    assert left[epoch_name(1)] == mine, "a file that is no longer the one listed is left alone"
    assert store_url.store().manifest().deleting == {}


def test_directory_checkpoints_are_rebuilt_with_the_manifest(store_url: StoreTarget) -> None:
    def shards(seed: int) -> Any:
        def write(path: str) -> None:
            os.makedirs(os.path.join(path, "shards"))
            torch.save(state(seed), os.path.join(path, "shards", "rank0.pt"))
            with open(os.path.join(path, ".metadata"), "wb") as f:
                f.write(b"meta %d" % seed)

        return write

    store = store_url.store(verbose=False)
    store.save_directory(epoch_name(0), shards(0), role="epoch", epoch=0, global_step=10)
    store.save_directory(epoch_name(1), shards(1), role="epoch", epoch=1, global_step=20)
    store.copy(epoch_name(1), BEST_NAME)
    before = store.manifest()
    lose_manifest(store_url)
    rebuilt = store_url.store().manifest()
    assert sorted(rebuilt.records) == sorted(before.records)
    for name, old in before.records.items():
        new = rebuilt.records[name]
        assert (new.files, new.role, new.epoch, new.global_step) == (
            old.files,
            old.role,
            old.epoch,
            old.global_step,
        )
    # The run goes on: the next save of a rebuilt name replaces it instead of failing.
    store_url.store(verbose=False).save_directory(
        epoch_name(1), shards(2), role="epoch", epoch=1, global_step=20
    )
    with store_url.store().local_copy(epoch_name(1)) as local:
        assert Path(local, ".metadata").read_bytes() == b"meta 2"


def test_a_malformed_embedded_record_skips_that_file_only(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    rolling(store_url, range(2))
    bad = {**state(5), "genesis_ckpt": {"name": epoch_name(5), "epoch": "five", "created": [1, 2]}}
    put(store_url, epoch_name(5), torch_bytes(bad))
    lose_manifest(store_url)
    with caplog.at_level(logging.WARNING):
        rebuilt = store_url.store().manifest()
    assert sorted(rebuilt.records) == [epoch_name(0), epoch_name(1)]
    assert epoch_name(5) in caplog.text and "malformed" in caplog.text


def over_long_integer(data: bytes) -> bytes:
    return re.sub(rb'"next_seq": \d+', b'"next_seq": ' + b"9" * 5000, data)


def deep_nesting(data: bytes) -> bytes:
    return data.replace(b"{", b'{"extra": ' + b"[" * 100_000 + b"]" * 100_000 + b", ", 1)


def wrong_types(data: bytes) -> bytes:
    return json.dumps({**json.loads(data), "checkpoints": [{"name": 5}]}).encode()


def bad_deleting(data: bytes) -> bytes:
    return json.dumps({**json.loads(data), "deleting": {"x": []}}).encode()


@pytest.mark.parametrize("damage", [over_long_integer, deep_nesting, wrong_types, bad_deleting])
def test_every_unreadable_manifest_is_rebuilt_with_a_warning(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    rolling(store_url, range(2))
    put(store_url, MANIFEST_NAME, damage(files(store_url)[MANIFEST_NAME]))
    with caplog.at_level(logging.WARNING):
        rebuilt = store_url.store().manifest()
    assert sorted(rebuilt.records) == [epoch_name(0), epoch_name(1)]
    assert "rebuilding" in caplog.text


def test_only_a_newer_format_is_refused(store_url: StoreTarget) -> None:
    rolling(store_url, range(1))
    doc = json.loads(files(store_url)[MANIFEST_NAME])
    put(store_url, MANIFEST_NAME, json.dumps({**doc, "version": 99, "checkpoints": "anything"}).encode())
    with pytest.raises(ManifestError, match="newer format version 99"):
        store_url.store().manifest()
    with pytest.raises(ManifestError, match="newer format version 99"):
        Manifest.decode(files(store_url)[MANIFEST_NAME], MANIFEST_NAME)
