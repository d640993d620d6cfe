"""Rolling and top-k deletion remove only what this store committed, never a checkpoint still needed."""

from __future__ import annotations

import dataclasses
import io
import logging
import uuid
from collections.abc import Iterator

import fsspec
import pytest
import torch
from conftest import StoreTarget
from models import RaiseAt, TinyModel
from test_callback import ScriptedScore, fit

from lightning_genesis_ckpt import CheckpointStore
from lightning_genesis_ckpt.core.names import MANIFEST_NAME, TMP_PREFIX


@pytest.fixture
def sibling_urls(store_url: StoreTarget) -> Iterator[tuple[StoreTarget, StoreTarget]]:
    """``.../run1`` and ``.../run10``: one is a string prefix of the other, as object-store keys are."""
    yield (
        dataclasses.replace(store_url, url=f"{store_url.url}/run1"),
        dataclasses.replace(store_url, url=f"{store_url.url}/run10"),
    )


def url_to_fs(url: str | StoreTarget) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root of a directory, with a StoreTarget's storage options."""
    if isinstance(url, StoreTarget):
        return fsspec.core.url_to_fs(url.url, skip_instance_cache=True, **url.storage_options)
    return fsspec.core.url_to_fs(url)


def put(url: str | StoreTarget, name: str, data: bytes) -> None:
    fs, root = url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{name}", data)


def listing(url: str | StoreTarget) -> dict[str, bytes]:
    fs, root = url_to_fs(url)
    return {p.rstrip("/").rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(root, detail=False)}


def foreign_files() -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    return {
        "my_weights.pth": bytes(buf.getbuffer()),  # a torch file without our metadata
        "epoch=0-step=12.ckpt": b"ModelCheckpoint's file",  # another tool's checkpoint
        "notes.txt": b"mine",
        f"{TMP_PREFIX}x": b"looks like our temp file, but in the other run's directory",
    }


def test_a_run_never_touches_a_sibling_prefix_or_foreign_files(
    sibling_urls: tuple[StoreTarget, StoreTarget],
) -> None:
    mine, other = sibling_urls
    for name, data in foreign_files().items():
        put(other, name, data)
    for name, data in list(foreign_files().items())[:3]:
        put(mine, name, data)
    before_other, before_mine = listing(other), listing(mine)
    fit(mine, 4, keep_last=1)  # rotates three times, retires nothing it did not write
    store = mine.store()
    store.sweep_temp()
    after = listing(mine)
    assert {k: after[k] for k in before_mine} == before_mine
    assert sorted(set(after) - set(before_mine)) == ["checkpoint_epoch_3.pth", MANIFEST_NAME]
    store.fs.rm_file(store.manifest_path)
    store.manifest(refresh=True)  # rebuild reads every file: and adopts only its own
    assert sorted(store.manifest().records) == ["checkpoint_epoch_3.pth"]
    assert listing(other) == before_other


def test_the_checkpoint_just_committed_is_never_rolled_out(tmp_path) -> None:
    """Resuming explicitly from an old checkpoint: the new epochs are older than those kept by number."""
    d = str(tmp_path / "ck")
    scores = [5.0, 1.0, 4.0, 3.0, 2.0, 6.0]  # epoch 1 best; keep_last=2 keeps epochs 4 and 5
    fit(d, 6, model=ScriptedScore(scores), monitor="score", keep_last=2, save_top_k=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(
            d,
            6,
            model=ScriptedScore(scores),
            monitor="score",
            keep_last=2,
            save_top_k=1,
            ckpt_path=f"{d}/checkpoint_epoch_1.pth",
            extra=[RaiseAt(epoch=3, batch=0)],
        )
    # Epoch 2 was this run's only checkpoint when it crashed: rolling it out at once would leave nothing of
    # the run's own progress.
    store = CheckpointStore(d)
    assert "checkpoint_epoch_2.pth" in store.manifest().records
    store.verify("checkpoint_epoch_2.pth")


def test_deletion_left_half_done_is_finished_only_for_names_it_uncommitted(store_url: StoreTarget) -> None:
    store = store_url.store()
    for name in ("a.pth", "b.pth"):
        store.save(name, {"w": torch.ones(2)})
    put(store_url, "user.pth", b"not ours")
    manifest = store.manifest().without(["a.pth", "b.pth"])
    put(
        store_url, MANIFEST_NAME, manifest.encode()
    )  # as if killed right after this write: both files still there
    store_url.store().save("b.pth", {"w": torch.zeros(2)})  # committed again; taking the lock cleans up first
    assert store_url.store().finish_deletions() == []
    assert sorted(listing(store_url)) == ["b.pth", MANIFEST_NAME, "user.pth"]
    assert store_url.store().manifest().deleting == {}


def test_memory_run_rotates_only_its_own_files() -> None:
    url = f"memory://deletion-safety/{uuid.uuid4().hex}"
    for name, data in list(foreign_files().items())[:3]:
        put(url, name, data)
    fit(url, 3, model=TinyModel(), keep_last=1)
    files = listing(url)
    assert sorted(files) == sorted(["checkpoint_epoch_2.pth", MANIFEST_NAME, *list(foreign_files())[:3]])


def test_a_normal_run_leaves_no_false_alarm_for_the_next(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    d = str(tmp_path / "ck")
    fit(d, 3, keep_last=1)  # its last deletion is recorded only with the next manifest write
    with caplog.at_level(logging.WARNING):
        fit(d, 4, keep_last=1)
    assert "interrupted deletion" not in caplog.text
    assert set(CheckpointStore(d).manifest().deleting) <= {"checkpoint_epoch_2.pth"}
