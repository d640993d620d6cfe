"""import_checkpoint and CheckpointStore.register: adopting the library mid-project."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import StoreTarget
from lightning_files import stock_lightning_checkpoint
from models import TinyModel, loaders, make_trainer

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointStore,
    GenesisCheckpoint,
)


def plain_state(epoch: int) -> dict:
    torch.manual_seed(epoch)
    return {"epoch": epoch, "model": {"w": torch.randn(3, 3)}, "val_acc": 0.5 + epoch / 100}


def test_register_checksums_a_file_already_in_the_directory(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.fs.makedirs(store.root, exist_ok=True)
    with store.fs.open(store.path("theirs.pth"), "wb") as f:
        torch.save({"w": torch.ones(2)}, f)
    with store.fs.open(store.path("theirs.pth"), "rb") as f:
        data = f.read()
    record = store.register("theirs.pth", epoch=2)
    assert (record.size, record.checksum, record.role, record.epoch) == (
        len(data),
        f"crc32:{zlib.crc32(data):08x}",
        "manual",
        2,
    )
    assert store_url.store().verify("theirs.pth") == record
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        store.register("nope.pth")


def test_import_copies_a_plain_file_in_and_verifies_it_from_then_on(
    tmp_path: Path, store_url: StoreTarget
) -> None:
    opts = store_url.storage_options
    src = tmp_path / "elsewhere" / "model_v3.pth"
    src.parent.mkdir()
    torch.save(plain_state(3), src)
    record = genesis.import_checkpoint(str(src), store_url.url, storage_options=opts)
    assert (record.name, record.role, record.epoch, record.metrics["val_acc"]) == (
        "model_v3.pth",
        "manual",
        3,
        0.53,
    )
    assert record.checksum == f"crc32:{zlib.crc32(src.read_bytes()):08x}"
    store = store_url.store()
    with store.fs.open(store.path("model_v3.pth"), "rb") as f:
        assert f.read() == src.read_bytes()
    assert src.exists(), "the source is copied, never moved"
    assert genesis.load(store.url_for("model_v3.pth"), storage_options=opts)["epoch"] == 3


def test_import_in_place_does_not_copy(tmp_path: Path) -> None:
    torch.save(plain_state(1), tmp_path / "checkpoint_epoch_1.pth")
    inode = os.stat(tmp_path / "checkpoint_epoch_1.pth").st_ino
    record = genesis.import_checkpoint(str(tmp_path / "checkpoint_epoch_1.pth"), str(tmp_path))
    assert (record.role, record.epoch) == ("epoch", 1)
    assert os.stat(tmp_path / "checkpoint_epoch_1.pth").st_ino == inode
    with pytest.raises(FileExistsError, match="overwrite=True"):
        genesis.import_checkpoint(str(tmp_path / "checkpoint_epoch_1.pth"), str(tmp_path))


def test_imported_epoch_files_are_what_the_manager_resumes_from(
    tmp_path: Path, store_url: StoreTarget
) -> None:
    url, opts = store_url.url, store_url.storage_options
    for epoch in (4, 12):
        torch.save(plain_state(epoch), tmp_path / f"checkpoint_epoch_{epoch}.pth")
        genesis.import_checkpoint(str(tmp_path / f"checkpoint_epoch_{epoch}.pth"), url, storage_options=opts)
    torch.save(plain_state(7), tmp_path / "snapshot.pth")
    genesis.import_checkpoint(
        str(tmp_path / "snapshot.pth"), url, name="interrupt_checkpoint.pth", storage_options=opts
    )
    mgr = CheckpointManager(url, storage_options=opts)
    loaded = mgr.load_latest_checkpoint()
    assert loaded is not None and loaded["epoch"] == 7 and mgr.last_loaded is not None
    assert mgr.last_loaded.role == "interrupt"


def test_refuses_damaged_missing_and_taken(tmp_path: Path, store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointCorruptError, match=r"bad\.pth"):
        genesis.import_checkpoint(str(bad), url, storage_options=opts)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        genesis.import_checkpoint(str(tmp_path / "missing.pth"), url, storage_options=opts)
    assert store_url.store().records() == []
    torch.save(plain_state(1), tmp_path / "a.pth")
    genesis.import_checkpoint(str(tmp_path / "a.pth"), url, storage_options=opts)
    torch.save(plain_state(2), tmp_path / "a2.pth")
    with pytest.raises(FileExistsError):
        genesis.import_checkpoint(str(tmp_path / "a2.pth"), url, name="a.pth", storage_options=opts)
    genesis.import_checkpoint(
        str(tmp_path / "a2.pth"), url, name="a.pth", overwrite=True, storage_options=opts
    )
    assert genesis.load(store_url.store().url_for("a.pth"), storage_options=opts)["epoch"] == 2


def test_a_stock_lightning_checkpoint_is_imported_and_resumed_from(tmp_path: Path) -> None:
    stock = tmp_path / "lightning_logs" / "last.ckpt"
    stock.parent.mkdir()
    stock_lightning_checkpoint(stock, epochs=2)
    dirpath = str(tmp_path / "genesis")
    record = genesis.import_checkpoint(str(stock), dirpath)
    saved = torch.load(stock, weights_only=True)
    assert (record.role, record.epoch, record.global_step) == ("epoch", saved["epoch"], 6)
    # From here on the callback resumes from it like from its own checkpoint.
    pl.seed_everything(0)
    cb = GenesisCheckpoint(dirpath, keep_last=1)
    train, val = loaders()
    trainer = make_trainer([cb], 3, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(TinyModel(), train, val)
    assert cb.resumed_from is not None and cb.resumed_from.name == "last.ckpt"
    assert trainer.global_step == 9, "one more epoch of 3 steps after the imported 6"
    assert "last.ckpt" not in CheckpointStore(dirpath).manifest().records, "retired like a rolling checkpoint"
