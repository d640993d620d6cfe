"""Damaged and foreign files: a specific error naming the file, or during resume a skip with a warning and the
next candidate; never a raw error from inside torch, never damaged data loaded."""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import StoreTarget
from models import TinyModel, loaders, make_trainer

from lightning_genesis_ckpt import CheckpointCorruptError, CheckpointStore, GenesisCheckpoint, ManifestError
from lightning_genesis_ckpt.adapter.ckpt_paths import validate_training_checkpoint
from lightning_genesis_ckpt.core.names import LOCK_NAME, MANIFEST_NAME
from lightning_genesis_ckpt.storage.resume import resolve


def training_checkpoint(step: int) -> dict[str, Any]:
    return {
        "state_dict": {"w": torch.full((500,), float(step))},
        "loops": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }


def foreign_zip(_: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes.txt", "a valid zip that is not a checkpoint")
    return buf.getvalue()


def torch_but_not_lightning(_: bytes) -> bytes:
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(3)}, buf)
    return buf.getvalue()


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda b: b[: len(b) // 3],
    "zero-length": lambda b: b"",
    "random-bytes": lambda b: os.urandom(len(b)),
    "bit-flip": lambda b: b[:300] + bytes([b[300] ^ 0x10]) + b[301:],
    "foreign-zip": foreign_zip,
    "torch-not-lightning": torch_but_not_lightning,
}
# Damage that loading alone detects (no checksum to compare against): everything but a bit flip inside a
# stored tensor, and a valid torch file of the wrong shape, which only the resume validation catches.
LOAD_DETECTS = ["truncated", "zero-length", "random-bytes", "foreign-zip"]


def store_with_two(url: str | StoreTarget) -> CheckpointStore:
    store = url.store() if isinstance(url, StoreTarget) else CheckpointStore(url)
    store.save("checkpoint_epoch_0.pth", training_checkpoint(1), epoch=0, global_step=1)
    store.save("checkpoint_epoch_1.pth", training_checkpoint(2), epoch=1, global_step=2)
    return store


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_is_skipped_and_the_previous_one_loaded(
    store_url: StoreTarget, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_with_two(store_url)
    path = store.path("checkpoint_epoch_1.pth")
    store.fs.pipe_file(path, DAMAGE[damage](store.fs.cat_file(path)))
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint_epoch_1\.pth"):
        store.load("checkpoint_epoch_1.pth")  # listed: the checksum catches every kind
    with caplog.at_level(logging.WARNING):
        found = resolve(store_url.store(), validate=validate_training_checkpoint)
    assert found.record is not None and found.record.name == "checkpoint_epoch_0.pth"
    assert torch.equal(found.checkpoint["state_dict"]["w"], torch.full((500,), 1.0))
    assert [n for n, _ in found.skipped] == ["checkpoint_epoch_1.pth"]
    assert "skipping checkpoint" in caplog.text and "checkpoint_epoch_1.pth" in caplog.text


@pytest.mark.parametrize("damage", LOAD_DETECTS)
def test_unlisted_damaged_file_is_a_corrupt_error_naming_it(store_url: StoreTarget, damage: str) -> None:
    store = store_with_two(store_url)
    good = store.fs.cat_file(store.path("checkpoint_epoch_0.pth"))
    store.fs.pipe_file(store.path("somebodys.pth"), DAMAGE[damage](good))
    with pytest.raises(
        CheckpointCorruptError, match=r"somebodys\.pth.*cannot be read as a torch checkpoint"
    ) as info:
        store.load("somebodys.pth")
    assert isinstance(info.value.__cause__, Exception)  # torch's own error is kept as the cause


def test_manifest_naming_missing_files(store_url: StoreTarget, caplog: pytest.LogCaptureFixture) -> None:
    store = store_with_two(store_url)
    store.fs.rm_file(store.path("checkpoint_epoch_1.pth"))
    with pytest.raises(
        FileNotFoundError, match=r"checkpoint_epoch_1\.pth is listed in the manifest but missing"
    ):
        store.load("checkpoint_epoch_1.pth")
    with caplog.at_level(logging.WARNING):
        found = resolve(store_url.store())
    assert found.record is not None and found.record.name == "checkpoint_epoch_0.pth"
    assert "checkpoint_epoch_1.pth" in caplog.text


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(lambda m: m[: len(m) // 2], id="truncated"),
        pytest.param(lambda m: b"", id="empty"),
        pytest.param(lambda m: os.urandom(200), id="random-bytes"),
        pytest.param(
            lambda m: m.replace(b'"checkpoint_epoch_1.pth"', b'"../../outside.pth"'), id="escaping-name"
        ),
        pytest.param(
            lambda m: m.replace(b'"checkpoint_epoch_1.pth"', b'"genesis_manifest.json"'), id="own-name"
        ),
    ],
)
def test_unusable_manifest_is_rebuilt_with_a_warning(
    store_url: StoreTarget, garbage: Callable[[bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    store = store_with_two(store_url)
    store.fs.pipe_file(store.manifest_path, garbage(store.fs.cat_file(store.manifest_path)))
    with caplog.at_level(logging.WARNING):
        fresh = store_url.store()
        records = fresh.manifest().records
    assert "rebuilding it from the checkpoint files" in caplog.text and MANIFEST_NAME in caplog.text
    assert sorted(records) == ["checkpoint_epoch_0.pth", "checkpoint_epoch_1.pth"]
    found = resolve(fresh, validate=validate_training_checkpoint)
    assert found.record is not None and found.record.name == "checkpoint_epoch_1.pth"


def test_future_manifest_stops_training_at_setup(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    store = store_with_two(d)
    doc = json.loads(store.fs.cat_file(store.manifest_path))
    doc["version"] = 7
    future = json.dumps(doc).encode()
    store.fs.pipe_file(store.manifest_path, future)
    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    trainer = make_trainer([GenesisCheckpoint(d)], 1)
    with pytest.raises(ManifestError, match=r"genesis_manifest\.json.*newer format version 7.*upgrade"):
        trainer.fit(TinyModel(), train, val)
    assert trainer.global_step == 0
    assert Path(d, MANIFEST_NAME).read_bytes() == future, "a newer manifest must never be overwritten"
    assert not Path(d, LOCK_NAME).exists()


def test_corrupt_everything_resumes_nothing_and_loads_nothing() -> None:
    """Nothing usable: start fresh with a warning, rather than load damaged data or crash."""
    url = f"memory://bad-files/{uuid.uuid4().hex}"
    store = store_with_two(url)
    for name in ("checkpoint_epoch_0.pth", "checkpoint_epoch_1.pth"):
        store.fs.pipe_file(store.path(name), os.urandom(1000))
    found = resolve(CheckpointStore(url), validate=validate_training_checkpoint)
    assert found.record is None and found.checkpoint is None and len(found.skipped) == 2
