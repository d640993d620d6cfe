"""Directory checkpoints (sharded strategies) through the store API, on every backend."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
from conformance.test_store import ManifestWriteFails, SimulatedCrash, raw_bytes
from conftest import StoreTarget

from lightning_genesis_ckpt import CheckpointCorruptError, CheckpointStore
from lightning_genesis_ckpt.core.manifest import Manifest
from lightning_genesis_ckpt.core.names import DIRECTORY_RECORD, MANIFEST_NAME, TMP_PREFIX
from lightning_genesis_ckpt.storage.resume import resolve

TREE = {"meta.pt": b"metadata" * 10, "__0_0.distcp": os.urandom(3000), "sub/__1_0.distcp": os.urandom(1234)}


def writer(tree: dict[str, bytes]):
    def write(directory: str) -> None:
        for rel, data in tree.items():
            path = Path(directory, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    return write


def tree_of(directory: str) -> dict[str, bytes]:
    """The files of a local directory checkpoint, but for the record it carries of itself."""
    root = Path(directory)
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != DIRECTORY_RECORD
    }


def file_path(store: CheckpointStore, name: str, rel: str) -> str:
    return f"{store.path(name)}/{rel}"


def write_inside(store: CheckpointStore, rel: str, data: bytes) -> None:
    """Write ``rel`` (a path below the store's directory) behind the store's back."""
    path = f"{store.root}/{rel}"
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with store.fs.open(path, "wb") as f:
        f.write(data)


def visible(target: StoreTarget) -> list[str]:
    """Top-level names a reader could mistake for data: everything but the store's own temp files."""
    return [n for n in target.names() if not n.startswith(TMP_PREFIX)]


def test_commit_verify_and_local_copy(store_url: StoreTarget) -> None:
    store = store_url.store()
    rec = store.save_directory("checkpoint_epoch_0.pth", writer(TREE), epoch=0, global_step=5)
    assert rec.is_directory and rec.role == "epoch" and sorted(rec.files) == sorted(TREE)
    assert rec.size == sum(len(b) for b in TREE.values())
    assert rec.files["meta.pt"].size == len(TREE["meta.pt"])
    assert visible(store_url) == ["checkpoint_epoch_0.pth", MANIFEST_NAME]
    fresh = store_url.store()
    assert fresh.verify("checkpoint_epoch_0.pth") == rec
    with fresh.local_copy("checkpoint_epoch_0.pth") as local:
        assert tree_of(local) == TREE
        if store_url.backend == "local":
            assert local == store.path("checkpoint_epoch_0.pth")  # the committed directory itself, no copy
    if store_url.backend != "local":
        assert not os.path.exists(local), "the download is removed when the block ends"
    # A version-2 manifest, because it lists a directory; plain-file stores stay version 1.
    assert json.loads(raw_bytes(store, MANIFEST_NAME))["version"] == 2
    with pytest.raises(IsADirectoryError, match="local_copy"):
        fresh.load("checkpoint_epoch_0.pth")
    assert resolve(fresh).record == rec


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing", "extra"])
def test_damaged_file_makes_the_checkpoint_corrupt_and_resume_skips_it(
    store_url: StoreTarget, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_url.store()
    good = store.save_directory("checkpoint_epoch_0.pth", writer(TREE), epoch=0, global_step=5)
    store.save_directory("checkpoint_epoch_1.pth", writer(TREE), epoch=1, global_step=10)
    path = file_path(store, "checkpoint_epoch_1.pth", "sub/__1_0.distcp")
    data = TREE["sub/__1_0.distcp"]
    if damage == "altered":
        write_inside(
            store, "checkpoint_epoch_1.pth/sub/__1_0.distcp", data[:10] + bytes([data[10] ^ 1]) + data[11:]
        )
    elif damage == "truncated":
        write_inside(store, "checkpoint_epoch_1.pth/sub/__1_0.distcp", data[:100])
    elif damage == "missing":
        store.fs.rm_file(path)
    else:
        write_inside(store, "checkpoint_epoch_1.pth/stray.distcp", b"from another save")
    fresh = store_url.store()
    expected = FileNotFoundError if damage == "missing" else CheckpointCorruptError
    with pytest.raises(expected, match="sub/__1_0.distcp" if damage != "extra" else "stray.distcp"):
        fresh.verify("checkpoint_epoch_1.pth")
    with pytest.raises(expected), fresh.local_copy("checkpoint_epoch_1.pth"):
        pass
    with caplog.at_level(logging.WARNING):
        found = resolve(fresh)
    assert found.record == good and [n for n, _ in found.skipped] == ["checkpoint_epoch_1.pth"]
    assert "skipping checkpoint" in caplog.text and "checkpoint_epoch_1.pth" in caplog.text


def test_crash_in_the_strategys_write_leaves_nothing_visible(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.save_directory("checkpoint_epoch_0.pth", writer(TREE), epoch=0, global_step=5)

    def crash(directory: str) -> None:
        writer(TREE)(directory)
        raise SimulatedCrash

    with pytest.raises(SimulatedCrash):
        store.save_directory("checkpoint_epoch_1.pth", crash, epoch=1, global_step=10)
    assert visible(store_url) == ["checkpoint_epoch_0.pth", MANIFEST_NAME]
    assert [r.name for r in store_url.store().records()] == ["checkpoint_epoch_0.pth"]


def test_killed_writers_temp_directory_is_swept(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.save_directory("checkpoint_epoch_0.pth", writer(TREE))
    leftover = f"{TMP_PREFIX}0123456789ab-checkpoint_epoch_1.pth"
    write_inside(store, f"{leftover}/__0_0.distcp", b"half a shard")
    assert leftover in store_url.names()
    assert store_url.store().sweep_temp() == [leftover]
    assert store_url.names() == ["checkpoint_epoch_0.pth", MANIFEST_NAME]


def test_crash_before_the_manifest_write_leaves_an_ignored_orphan_then_swept(store_url: StoreTarget) -> None:
    store = ManifestWriteFails(store_url.url, store_url.storage_options)
    store.save_directory("checkpoint_epoch_0.pth", writer(TREE), epoch=0, global_step=5)
    store.arm(SimulatedCrash())
    with pytest.raises(SimulatedCrash):
        store.save_directory("checkpoint_epoch_1.pth", writer(TREE), epoch=1, global_step=10)
    assert "checkpoint_epoch_1.pth" in store_url.names()  # published, never committed
    fresh = store_url.store()
    assert [r.name for r in fresh.records()] == ["checkpoint_epoch_0.pth"]
    assert resolve(fresh).record.name == "checkpoint_epoch_0.pth"
    assert "checkpoint_epoch_1.pth" in fresh.sweep_temp()
    assert store_url.names() == ["checkpoint_epoch_0.pth", MANIFEST_NAME]


def test_failed_commit_removes_the_published_tree(store_url: StoreTarget) -> None:
    store = ManifestWriteFails(store_url.url, store_url.storage_options)
    store.save_directory("checkpoint_epoch_0.pth", writer(TREE))
    store.arm(OSError(errno.EIO, "manifest write failed (injected)"))
    with pytest.raises(OSError, match="injected"):
        store.save_directory("checkpoint_epoch_1.pth", writer(TREE))
    assert store_url.names() == ["checkpoint_epoch_0.pth", MANIFEST_NAME]


def test_failed_commit_of_a_replacement_puts_the_old_tree_back(tmp_path: Path) -> None:
    # On a local disk the old tree sits under the pending temp name after the exchange; a failed commit swaps it
    # back. (write_directory's cleanup once removed it first, so the swap had nothing to bring back.)
    store = ManifestWriteFails(str(tmp_path), None)
    store.save_directory("interrupt_checkpoint.pth", writer(TREE), global_step=5)
    store.arm(OSError(errno.EIO, "manifest write failed (injected)"))
    with pytest.raises(OSError, match="injected"):
        store.save_directory("interrupt_checkpoint.pth", writer({"meta.pt": b"new"}), global_step=9)
    fresh = CheckpointStore(str(tmp_path))
    assert fresh.manifest().records["interrupt_checkpoint.pth"].global_step == 5
    fresh.verify("interrupt_checkpoint.pth")
    assert tree_of(fresh.path("interrupt_checkpoint.pth")) == TREE
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "interrupt_checkpoint.pth"]


def test_retention_delete_removes_whole_directories(store_url: StoreTarget) -> None:
    store = store_url.store()
    for epoch in range(3):
        store.save_directory(f"checkpoint_epoch_{epoch}.pth", writer(TREE), epoch=epoch, global_step=epoch)
    store.save("notes.pth", {"x": 1})
    assert store.delete(["checkpoint_epoch_0.pth", "notes.pth"]) == ["checkpoint_epoch_0.pth", "notes.pth"]
    assert visible(store_url) == ["checkpoint_epoch_1.pth", "checkpoint_epoch_2.pth", MANIFEST_NAME]
    assert not store_url.fs().find(store.path("checkpoint_epoch_0.pth"))


def test_interrupted_deletion_of_a_directory_is_finished(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.save_directory("checkpoint_epoch_0.pth", writer(TREE))
    store.save_directory("checkpoint_epoch_1.pth", writer(TREE))
    manifest = store.manifest().without(["checkpoint_epoch_0.pth"])
    # A writer killed between the manifest write and the removal.
    store_url.fs().pipe_file(store.manifest_path, manifest.encode())
    fresh = store_url.store()
    assert fresh.finish_deletions() == ["checkpoint_epoch_0.pth"]
    assert visible(store_url) == ["checkpoint_epoch_1.pth", MANIFEST_NAME]


def test_replace_in_place_shows_old_or_new_never_a_mix(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.save_directory("interrupt_checkpoint.pth", writer(TREE), global_step=5)
    new_tree = {"meta.pt": b"new", "__0_0.distcp": b"new shard"}  # fewer files: none of the old may remain
    rec = store.save_directory("interrupt_checkpoint.pth", writer(new_tree), global_step=9)
    assert rec.role == "interrupt" and rec.global_step == 9
    fresh = store_url.store()
    fresh.verify("interrupt_checkpoint.pth")
    with fresh.local_copy("interrupt_checkpoint.pth") as local:
        assert tree_of(local) == new_tree
    assert visible(store_url) == [MANIFEST_NAME, "interrupt_checkpoint.pth"]
    assert fresh.sweep_temp() == []


def test_crash_while_replacing_never_yields_a_mix(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = ManifestWriteFails(store_url.url, store_url.storage_options)
    store.save_directory("checkpoint_epoch_0.pth", writer(TREE), epoch=0, global_step=1)
    store.save_directory("interrupt_checkpoint.pth", writer(TREE), global_step=5)
    store.arm(SimulatedCrash())  # dies at the commit, after the new tree is in place
    with pytest.raises(SimulatedCrash):
        store.save_directory("interrupt_checkpoint.pth", writer({"meta.pt": b"new"}), global_step=9)
    fresh = store_url.store()
    with caplog.at_level(logging.WARNING):
        fresh.sweep_temp()
        found = resolve(fresh)
    # The new tree is complete and its intent marker holds its record: it is recognised and used (on a local
    # disk the two trees were exchanged atomically; an object store uploaded it after removing the old one).
    assert found.record is not None
    assert (found.record.name, found.record.global_step) == ("interrupt_checkpoint.pth", 9)
    with fresh.local_copy("interrupt_checkpoint.pth") as local:
        assert tree_of(local) == {"meta.pt": b"new"}
    assert "the new content is complete and is used" in caplog.text
    assert not [n for n in store_url.names() if n.startswith(TMP_PREFIX)]


def test_a_replacement_left_by_format_version_2_is_settled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Version 2 exchanged the trees and carried the new tree's record in the manifest's ``incoming``.
    store = CheckpointStore(str(tmp_path))
    old = store.save_directory("interrupt_checkpoint.pth", writer(TREE), global_step=5)
    new = store.save_directory("interrupt_checkpoint.pth", writer({"meta.pt": b"new"}), global_step=9)
    name = {"interrupt_checkpoint.pth"}
    legacy = Manifest({old.name: old}, replacing=frozenset(name), incoming={new.name: new})
    (tmp_path / MANIFEST_NAME).write_bytes(legacy.encode())
    with caplog.at_level(logging.WARNING):
        found = resolve(CheckpointStore(str(tmp_path)))
    assert found.record is not None and found.record.global_step == 9
    assert "the new directory is complete and is used" in caplog.text


def test_copy_of_a_directory(store_url: StoreTarget) -> None:
    store = store_url.store()
    src = store.save_directory("checkpoint_epoch_1.pth", writer(TREE), epoch=1, global_step=10)
    best = store.copy("checkpoint_epoch_1.pth", "best_model.pth")
    assert best.role == "best" and best.files == src.files and best.checksum == src.checksum
    store.save_directory("checkpoint_epoch_2.pth", writer({"meta.pt": b"2"}), epoch=2, global_step=20)
    store.copy("checkpoint_epoch_2.pth", "best_model.pth")  # replaces the old copy
    store.delete(["checkpoint_epoch_1.pth"])
    with store.local_copy("best_model.pth") as local:
        assert tree_of(local) == {"meta.pt": b"2"}


def test_uncommitted_name_is_not_overwritten(store_url: StoreTarget) -> None:
    store = store_url.store()
    write_inside(store, "mine.pth/data", b"a user's directory")
    with pytest.raises(FileExistsError, match="this store did not write it"):
        store.save_directory("mine.pth", writer(TREE))
    assert store.fs.cat_file(f"{store.root}/mine.pth/data") == b"a user's directory"


def test_empty_write_is_refused(store_url: StoreTarget) -> None:
    store = store_url.store()
    with pytest.raises(ValueError, match="holds no files"):
        store.save_directory("a.pth", lambda d: None)
    assert visible(store_url) == []


def test_manifest_round_trip_and_strict_types() -> None:
    store_doc = {
        "format": "lightning-genesis-ckpt/manifest",
        "version": 2,
        "next_seq": 2,
        "checkpoints": [
            {
                "name": "d.pth",
                "role": "epoch",
                "size": 3,
                "checksum": "crc32:00000000",
                "created": 0.0,
                "seq": 1,
                "files": {"a/b": {"size": 3, "checksum": "crc32:00000001"}},
            }
        ],
    }
    m = Manifest.decode(json.dumps(store_doc).encode(), "m")
    assert m.records["d.pth"].files["a/b"].size == 3
    assert Manifest.decode(m.encode(), "m") == m
    from lightning_genesis_ckpt import ManifestError

    for bad in ({"../x": {"size": 1, "checksum": "c"}}, {"a": {"size": "1", "checksum": "c"}}, ["a"]):
        doc = json.loads(json.dumps(store_doc))
        doc["checkpoints"][0]["files"] = bad
        with pytest.raises(ManifestError, match="malformed"):
            Manifest.decode(json.dumps(doc).encode(), "m")
    doc = json.loads(json.dumps(store_doc))
    doc["version"] = 1
    with pytest.raises(ManifestError, match="version 2"):
        Manifest.decode(json.dumps(doc).encode(), "m")


def test_cli_lists_and_verifies_a_directory_checkpoint(tmp_path: Path) -> None:
    from test_cli import cli

    store = CheckpointStore(str(tmp_path / "ck"))
    store.save_directory("checkpoint_epoch_0.pth", writer(TREE), epoch=0, global_step=5)
    out = cli("ls", str(tmp_path / "ck"))
    assert out.returncode == 0 and "checkpoint_epoch_0.pth/ (3 files)" in out.stdout and "ok" in out.stdout
    out = cli("verify", str(tmp_path / "ck" / "checkpoint_epoch_0.pth"))
    assert out.returncode == 0 and "all 3 files match the manifest" in out.stdout, out.stdout + out.stderr
    (tmp_path / "ck" / "checkpoint_epoch_0.pth" / "meta.pt").write_bytes(b"altered")
    out = cli("verify", str(tmp_path / "ck"))
    assert out.returncode == 1 and "meta.pt" in out.stdout
