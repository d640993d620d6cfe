"""Named versions on the manifest: save, tag, list, load latest or by name."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
from conftest import StoreTarget

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import CheckpointManager, CheckpointStore, Version
from lightning_genesis_ckpt.core.names import MANIFEST_NAME


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(4, 4), "b": torch.randn(4)}


def test_save_list_and_load_versions(store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    v1 = genesis.save_version(
        url, {"model": weights(1), "epoch": 3, "val_acc": 0.81}, "v1", storage_options=opts
    )
    v2 = genesis.save_version(
        url, {"model": weights(2)}, "v2", metrics={"val_acc": 0.86}, storage_options=opts
    )
    listed = genesis.list_versions(url, storage_options=opts)
    assert [v.name for v in listed] == ["v1", "v2"] and listed == [v1, v2]
    assert (v1.epoch, dict(v1.metrics), dict(v2.metrics)) == (3, {"val_acc": 0.81}, {"val_acc": 0.86})
    assert datetime.datetime.fromisoformat(v2.created_iso).tzinfo is not None
    latest = genesis.load_version(url, storage_options=opts)
    assert torch.equal(latest["model"]["w"], weights(2)["w"]) and set(latest) == {"model"}
    assert genesis.load_version(url, "v1", storage_options=opts)["epoch"] == 3
    # Built on the manifest: one record (and one file) per version, checksummed.
    store = store_url.store()
    assert {r.name: r.role for r in store.records()} == {
        "version_v1.pth": "version",
        "version_v2.pth": "version",
    }
    store.verify("version_v1.pth")


def test_unknown_version_lists_the_known_ones(store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    with pytest.raises(FileNotFoundError, match="no versions yet"):
        genesis.load_version(url, storage_options=opts)
    genesis.save_version(url, weights(0), "baseline", storage_options=opts)
    with pytest.raises(FileNotFoundError, match=r"no version 'v9' \(versions: baseline\)"):
        genesis.load_version(url, "v9", storage_options=opts)


def test_versions_are_not_overwritten_by_accident(store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    genesis.save_version(url, weights(0), "v1", storage_options=opts)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        genesis.save_version(url, weights(1), "v1", storage_options=opts)
    genesis.save_version(url, weights(1), "v1", overwrite=True, storage_options=opts)
    assert torch.equal(genesis.load_version(url, "v1", storage_options=opts)["w"], weights(1)["w"])
    assert [v.name for v in genesis.list_versions(url, storage_options=opts)] == ["v1"]


@pytest.mark.parametrize("name", ["latest", "", "../x", "a/b", "-lead", "x" * 101, "sp ace"])
def test_invalid_version_names(store_url: StoreTarget, name: str) -> None:
    url, opts = store_url.url, store_url.storage_options
    with pytest.raises(ValueError, match="invalid version name"):
        genesis.save_version(url, weights(0), name, storage_options=opts)


def test_tag_the_best_model_of_a_run(store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    mgr = CheckpointManager(url, storage_options=opts)
    for epoch in range(3):
        mgr.save_epoch_checkpoint({"model": weights(epoch), "epoch": epoch}, epoch)
    mgr.save_best_model({"model": weights(1), "epoch": 1}, metric=0.9)
    version = genesis.tag_version(url, "release-1.0", storage_options=opts)
    assert (version.name, version.epoch, version.metrics["metric"]) == ("release-1.0", 1, 0.9)
    assert torch.equal(
        genesis.load_version(url, "release-1.0", storage_options=opts)["model"]["w"], weights(1)["w"]
    )
    if store_url.backend == "local":  # a hard link: the version costs no second copy of the bytes
        assert (
            os.stat(Path(url) / "version_release-1.0.pth").st_ino
            == os.stat(Path(url) / "best_model.pth").st_ino
        )
    # Versions are neither resumed from nor rolled away.
    for epoch in range(3, 9):
        mgr.save_epoch_checkpoint({"model": weights(epoch), "epoch": epoch}, epoch)
    latest = mgr.load_latest_checkpoint()
    assert latest is not None and latest["epoch"] == 8
    assert [v.name for v in genesis.list_versions(url, storage_options=opts)] == ["release-1.0"]


def test_tagging_a_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save("best_model.pth", weights(0))
    (tmp_path / "best_model.pth").write_bytes(b"damaged")
    with pytest.raises(genesis.CheckpointCorruptError):
        genesis.tag_version(str(tmp_path), "v1")
    with pytest.raises(FileNotFoundError):
        genesis.tag_version(str(tmp_path), "v1", source="nope.pth")
    assert genesis.list_versions(str(tmp_path)) == []


def test_versions_survive_a_lost_manifest(store_url: StoreTarget) -> None:
    url, opts = store_url.url, store_url.storage_options
    genesis.save_version(url, {"model": weights(0)}, "v1", metrics={"acc": 0.5}, storage_options=opts)
    mgr = CheckpointManager(url, storage_options=opts)
    mgr.save_best_model({"model": weights(1)}, 0.7)
    genesis.tag_version(url, "v2", storage_options=opts)
    store = store_url.store()
    store.fs.rm_file(store.path(MANIFEST_NAME))
    rebuilt = genesis.list_versions(url, storage_options=opts)
    assert [(v.name, dict(v.metrics)) for v in rebuilt] == [("v1", {"acc": 0.5}), ("v2", {"metric": 0.7})]
    assert isinstance(rebuilt[0], Version)
