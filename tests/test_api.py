"""The Genesis serialization API: save / load / save_checkpoint / load_checkpoint on local disk and memory://."""

from __future__ import annotations

import logging
import os
import pickle
import uuid
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StoreTarget
from faulty import PROTOCOL, FaultyMemoryFileSystem
from torch import nn

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import CheckpointCorruptError, UnsafeCheckpointError
from lightning_genesis_ckpt.api.functional import file_store, save_into
from lightning_genesis_ckpt.core.names import BACKUP_SUFFIX, MANIFEST_NAME, TMP_PREFIX
from lightning_genesis_ckpt.storage.atomicity import RenameCommit


def model_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(nn.Linear(8, 4).state_dict())


Options = Mapping[str, Any] | None


def raw(path: str, options: Options = None) -> bytes:
    store, name = file_store(path, options)
    with store.fs.open(store.path(name), "rb") as f:
        return f.read()


def write_raw(path: str, data: bytes, options: Options = None) -> None:
    store, name = file_store(path, options)
    with store.fs.open(store.path(name), "wb") as f:
        f.write(data)


def names_in(path: str, options: Options = None) -> list[str]:
    store, _ = file_store(path, options)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_roundtrip_is_exact_and_checksummed(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    path = f"{store_url.url}/model.pth"
    state = model_state(0)
    before = dict(state)
    record = genesis.save(state, path, storage_options=opts)
    assert state == before, "save must not clear or change the caller's dict"
    loaded = genesis.load(path, storage_options=opts)
    assert_same(loaded, state)  # exactly what was saved: no embedded metadata key
    assert record.checksum == f"crc32:{zlib.crc32(raw(path, opts)):08x}"
    store, _ = file_store(path, opts)
    assert store.manifest().get("model.pth") == record


def test_overwrite_keeps_a_backup_until_the_new_file_commits(tmp_path: Path) -> None:
    path = str(tmp_path / "model.pth")
    genesis.save(model_state(0), path)
    old = raw(path)
    seen = []

    class Watching(RenameCommit):
        def _before_rename(self, tmp: str, final: str) -> None:
            if final == path:
                with open(path + BACKUP_SUFFIX, "rb") as f:
                    seen.append(f.read())

    store, name = file_store(path)
    store.commit_strategy = Watching()
    save_into(store, name, model_state(1))
    assert seen == [old], "the previous content must sit in the backup while the new one is written"
    assert_same(genesis.load(path), model_state(1))
    assert names_in(path) == [MANIFEST_NAME, "model.pth"]


class FailMarker(RenameCommit):
    """Announcing the write fails (the intent marker): nothing was touched."""

    def write_small(self, path: str, data: bytes, *, durable: bool = True, content: bool = True) -> None:
        raise OSError(28, "No space left on device")


class FailBeforeRename(RenameCommit):
    def _before_rename(self, tmp: str, final: str) -> None:
        raise OSError(28, "No space left on device")


class FailingManifest:
    """The store's manifest writes fail: the data file has landed under its name, the commit fails."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def read(self, path: str) -> Any:
        return self.inner.read(path)

    def tag(self, path: str) -> Any:
        return self.inner.tag(path)

    def create(self, path: str, data: bytes) -> Any:
        raise OSError(28, "No space left on device")

    def replace(self, path: str, data: bytes, tag: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("fail", ["marker", "data", "manifest"])
def test_failed_overwrite_leaves_the_original_intact_locally(
    tmp_path: Path, fail: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "model.pth")
    record = genesis.save(model_state(0), path)
    old = raw(path)
    store, name = file_store(path)
    if fail == "manifest":
        store.objects = FailingManifest(store.objects)
    else:
        store.commit_strategy = FailMarker() if fail == "marker" else FailBeforeRename()
    with pytest.raises(OSError, match="No space"), caplog.at_level(logging.WARNING):
        save_into(store, name, model_state(1))
    assert raw(path) == old
    assert file_store(path)[0].manifest().get("model.pth") == record
    assert names_in(path) == [MANIFEST_NAME, "model.pth"], "no backup or temporary file left behind"
    assert ("restored it from its backup" in caplog.text) == (fail == "manifest")
    assert_same(genesis.load(path), model_state(0))


@pytest.fixture
def faulty_dir() -> Iterator[str]:
    url = f"{PROTOCOL}://tests/{uuid.uuid4().hex}"
    yield url
    FaultyMemoryFileSystem.fail_on = None
    FaultyMemoryFileSystem.store.clear()
    FaultyMemoryFileSystem.pseudo_dirs[:] = [""]


@pytest.mark.parametrize("fail", ["marker", "data", "commit"])
def test_failed_overwrite_leaves_the_original_intact_on_an_object_store(
    faulty_dir: str, fail: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = f"{faulty_dir}/model.pth"
    record = genesis.save(model_state(0), path)
    old = raw(path)
    target = {"marker": "/.genesis-tmp-intent-model.pth", "data": "/model.pth", "commit": "/" + MANIFEST_NAME}

    def fail_on(p: str, mode: str) -> bool:
        return mode == "wb" and p.endswith(target[fail])

    FaultyMemoryFileSystem.fail_on = fail_on
    with pytest.raises(OSError, match="injected"), caplog.at_level(logging.WARNING):
        genesis.save(model_state(1), path)
    FaultyMemoryFileSystem.fail_on = None
    # Only a failure after the data landed under its name needs the backup.
    assert ("restored it from its backup" in caplog.text) == (fail == "commit")
    assert raw(path) == old
    assert file_store(path)[0].manifest().get("model.pth") == record
    assert names_in(path) == [MANIFEST_NAME, "model.pth"]
    assert_same(genesis.load(path), model_state(0))


def test_an_interrupted_save_is_settled_from_the_backup(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    # What a save killed between writing the data and committing the manifest leaves on an object store:
    # new bytes under the name, the manifest still naming the old ones, and the backup.
    opts = store_url.storage_options
    path = f"{store_url.url}/model.pth"
    genesis.save(model_state(0), path, storage_options=opts)
    write_raw(path + BACKUP_SUFFIX, raw(path, opts), opts)
    other = f"{store_url.url}/other.pth"
    genesis.save(model_state(1), other, storage_options=opts)
    write_raw(path, raw(other, opts), opts)
    before = names_in(path, opts)
    with caplog.at_level(logging.WARNING):
        # A load reads the committed version from the backup, and changes nothing on disk.
        assert_same(genesis.load(path, storage_options=opts), model_state(0))
    assert "a save was interrupted" in caplog.text
    assert names_in(path, opts) == before
    # The next save (a writer) settles it.
    genesis.save(model_state(2), path, storage_options=opts)
    assert BACKUP_SUFFIX not in " ".join(names_in(path, opts))
    assert_same(genesis.load(path, storage_options=opts), model_state(2))


def test_a_stale_backup_is_cleared_by_the_next_save(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    path = f"{store_url.url}/model.pth"
    genesis.save(model_state(0), path, storage_options=opts)
    write_raw(path + BACKUP_SUFFIX, b"left over by a killed process", opts)
    genesis.save(model_state(1), path, storage_options=opts)
    assert names_in(path, opts) == [MANIFEST_NAME, "model.pth"]
    assert_same(genesis.load(path, storage_options=opts), model_state(1))


def test_missing_file_is_file_not_found(store_url: StoreTarget) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        genesis.load(f"{store_url.url}/nope.pth", storage_options=store_url.storage_options)


@pytest.mark.parametrize("listed", [True, False], ids=["in-manifest", "plain-torch-file"])
@pytest.mark.parametrize("damage", ["truncated", "zero-length", "garbage"])
def test_damaged_file_raises_an_unpickling_error_naming_it(
    store_url: StoreTarget, listed: bool, damage: str
) -> None:
    opts = store_url.storage_options
    path = f"{store_url.url}/model.pth"
    if listed:
        genesis.save(model_state(0), path, storage_options=opts)
        data = raw(path, opts)
    else:
        store, _ = file_store(path, opts)
        store.fs.makedirs(store.root, exist_ok=True)
        with store.fs.open(store.path("model.pth"), "wb") as f:
            torch.save(model_state(0), f)
        data = raw(path, opts)
    write_raw(
        path,
        {"truncated": data[: len(data) // 2], "zero-length": b"", "garbage": os.urandom(500)}[damage],
        opts,
    )
    with pytest.raises(pickle.UnpicklingError, match=r"model\.pth") as info:
        genesis.load(path, storage_options=opts)
    assert isinstance(info.value, CheckpointCorruptError)


def test_plain_torch_files_load_and_unrelated_files_are_never_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "train.py").write_text("print('user code')\n")
    (tmp_path / "data.bin").write_bytes(os.urandom(1000))
    torch.save(model_state(3), tmp_path / "old.pth")
    with caplog.at_level(logging.WARNING):
        assert_same(genesis.load(str(tmp_path / "old.pth")), model_state(3))
        genesis.save(model_state(4), str(tmp_path / "new.pth"))
        assert_same(genesis.load(str(tmp_path / "new.pth")), model_state(4))
    assert caplog.text == "", (
        "a user's directory is not a checkpoint directory: nothing to rebuild or warn about"
    )
    assert sorted(file_store(str(tmp_path / "new.pth"))[0].manifest().records) == ["new.pth"]


def test_relative_paths_use_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    genesis.save(model_state(0), "model.pth")
    assert (tmp_path / "model.pth").exists() and (tmp_path / MANIFEST_NAME).exists()
    assert_same(genesis.load(Path("model.pth")), model_state(0))


def test_dill_objects_need_trusted_to_load(store_url: StoreTarget, tmp_path: Path) -> None:
    opts = store_url.storage_options
    path = f"{store_url.url}/fn.pth"
    offset = 3

    def closure(x: int) -> int:
        return x + offset

    genesis.save({"square": lambda x: x * x, "shift": closure}, path, serializer="dill", storage_options=opts)
    with pytest.raises(UnsafeCheckpointError, match="trusted=True") as info:
        genesis.load(path, storage_options=opts)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert "it was saved with dill" in str(info.value) and "\x1b" not in str(info.value)
    loaded = genesis.load(path, trusted=True, storage_options=opts)
    assert (loaded["square"](4), loaded["shift"](4)) == (16, 7)


def test_code_in_a_file_is_never_run_unless_trusted(store_url: StoreTarget, tmp_path: Path) -> None:
    opts = store_url.storage_options
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = f"{store_url.url}/evil.pth"
    genesis.save({"x": Exploit()}, path, storage_options=opts)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth"):
        genesis.load(path, storage_options=opts)
    assert not marker.exists()


def test_save_checkpoint_roundtrip_restores_model_and_optimizer(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    path = f"{store_url.url}/ckpt.pth"
    genesis.save_checkpoint(model.state_dict(), opt.state_dict(), path, storage_options=opts)
    assert set(genesis.load(path, storage_options=opts)) == {"model_state_dict", "optimizer_state_dict"}
    model_sd, opt_sd = genesis.load_checkpoint(path, storage_options=opts)
    fresh = nn.Linear(8, 4)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh.load_state_dict(model_sd)
    fresh_opt.load_state_dict(opt_sd)
    assert_same(fresh.state_dict(), model.state_dict())
    assert fresh_opt.state_dict()["param_groups"][0]["lr"] == 0.01
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_load_checkpoint_of_another_layout_says_what_to_use(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    path = f"{store_url.url}/weights.pth"
    genesis.save(model_state(0), path, storage_options=opts)
    with pytest.raises(ValueError, match=r"genesis\.load\(\)"):
        genesis.load_checkpoint(path, storage_options=opts)


def test_map_location(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    path = f"{store_url.url}/model.pth"
    genesis.save(model_state(0), path, storage_options=opts)
    loaded = genesis.load(path, map_location="meta", storage_options=opts)
    assert all(t.device.type == "meta" for t in loaded.values())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no cuda device"):
            genesis.load(path, map_location="cuda", storage_options=opts)


def test_mmap_load_is_exact_and_survives_a_later_save(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    path = f"{store_url.url}/model.pth"
    genesis.save(model_state(0), path, storage_options=opts)
    mapped = genesis.load(path, mmap=True, storage_options=opts)
    assert_same(mapped, model_state(0))
    # A later save is a new file renamed over the name: the mapped pages still hold the old, committed state.
    genesis.save(model_state(1), path, storage_options=opts)
    assert_same(mapped, model_state(0))
    assert_same(genesis.load(path, mmap=True, storage_options=opts), model_state(1))


@pytest.mark.parametrize(
    ("path", "parent", "name"),
    [
        ("model.pth", ".", "model.pth"),
        ("/abs/dir/model.pth", "/abs/dir", "model.pth"),
        ("/model.pth", "/", "model.pth"),
        ("memory://bucket/dir/x.pth", "memory://bucket/dir", "x.pth"),
    ],
)
def test_file_store_splits_paths_and_urls(path: str, parent: str, name: str) -> None:
    store, got = file_store(path)
    assert (store.url, got) == (parent, name)


def test_a_directory_is_not_a_file_path() -> None:
    with pytest.raises(ValueError, match="directory"):
        genesis.save({}, "some/dir/")


def test_no_temporary_files_after_saves(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    for i in range(3):
        genesis.save(model_state(i), f"{store_url.url}/m.pth", storage_options=opts)
    assert not [n for n in names_in(f"{store_url.url}/m.pth", opts) if n.startswith(TMP_PREFIX)]
