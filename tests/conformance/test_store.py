"""The store test-suite. Every backend in the ``store_url`` fixture runs all of it."""

from __future__ import annotations

import errno
import json
import logging
import zlib

import fsspec
import pytest
import torch
from conftest import StoreTarget

from lightning_genesis_ckpt import CheckpointCorruptError, CheckpointStore, ManifestError
from lightning_genesis_ckpt.core.names import MANIFEST_NAME, TMP_PREFIX
from lightning_genesis_ckpt.storage.resume import resolve


def state(seed: int = 0, n: int = 1000) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "step": seed}


def raw_bytes(store: CheckpointStore, name: str) -> bytes:
    with store.fs.open(store.path(name), "rb") as f:
        return f.read()


def write_raw(store: CheckpointStore, name: str, data: bytes) -> None:
    with store.fs.open(store.path(name), "wb") as f:
        f.write(data)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


def test_save_load_roundtrip_and_record(store_url: StoreTarget) -> None:
    store = store_url.store()
    obj = state(1)
    rec = store.save("a.pth", obj, epoch=3, global_step=30, metrics={"val_loss": 0.5}, monitor="val_loss")
    assert rec.size == len(raw_bytes(store, "a.pth"))
    assert rec.checksum == f"crc32:{zlib.crc32(raw_bytes(store, 'a.pth')):08x}"
    assert (rec.epoch, rec.global_step, rec.metric(), rec.role) == (3, 30, 0.5, "manual")
    assert {"torch", "lightning", "lightning_genesis_ckpt"} <= set(rec.versions)
    loaded = store.load("a.pth")
    assert torch.equal(loaded["w"], obj["w"])
    assert loaded["genesis_ckpt"]["global_step"] == 30
    assert "genesis_ckpt" not in obj, "the caller's dict must not be modified"
    # A second store over the same URL reads the same committed state from the manifest.
    again = store_url.store()
    assert [r.name for r in again.records()] == ["a.pth"]
    assert again.manifest().get("a.pth") == rec


def test_overwrite_replaces_record_with_newer_seq(store_url: StoreTarget) -> None:
    store = store_url.store()
    first = store.save("x.pth", state(1))
    second = store.save("x.pth", state(2))
    assert second.seq > first.seq
    assert [r.name for r in store.records()] == ["x.pth"]
    assert torch.equal(store.load("x.pth")["w"], state(2)["w"])


def test_failed_save_leaves_previous_file_intact(store_url: StoreTarget) -> None:
    store = store_url.store()
    good = store.save("x.pth", state(1))
    before = raw_bytes(store, "x.pth")
    with pytest.raises(RuntimeError, match="on purpose"):
        store.save("x.pth", {"w": torch.ones(10), "bad": Unpicklable()})
    assert raw_bytes(store, "x.pth") == before
    assert store_url.store().manifest().get("x.pth") == good
    assert not [n for n in store.list_names() if n.startswith(TMP_PREFIX)]


class SimulatedCrash(BaseException):
    """Stands for a kill: no ``except OSError`` cleanup of the store runs, the process just stops."""


class ManifestWriteFails(CheckpointStore):
    """A store whose manifest writes fail once armed.

    ``arm(error, after=n)`` lets ``n`` more manifest writes through and fails the next one with ``error``:
    an ``OSError`` is a failure the store reports and cleans up after; :class:`SimulatedCrash` is a kill at
    that moment, leaving the directory exactly as a dead writer would.
    """

    error: BaseException | None = None
    allowed = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.objects = FailingManifest(self.objects, self)

    def arm(self, error: BaseException, after: int = 0) -> None:
        self.error, self.allowed = error, after


class FailingManifest:
    """The store's conditional object access, failing manifest writes when its store is armed."""

    def __init__(self, inner, store: ManifestWriteFails) -> None:
        self.inner, self.store = inner, store

    def read(self, path):
        return self.inner.read(path)

    def tag(self, path):
        return self.inner.tag(path)

    def _maybe_fail(self, path: str) -> None:
        if path.endswith(MANIFEST_NAME) and self.store.error is not None:
            if self.store.allowed == 0:
                raise self.store.error
            self.store.allowed -= 1

    def create(self, path, data):
        self._maybe_fail(path)
        return self.inner.create(path, data)

    def replace(self, path, data, tag, **kwargs):
        self._maybe_fail(path)
        return self.inner.replace(path, data, tag, **kwargs)


def test_failed_commit_of_a_new_name_removes_the_data(store_url: StoreTarget) -> None:
    store = ManifestWriteFails(store_url.url, store_url.storage_options)
    store.save("checkpoint_epoch_0.pth", state(0), role="epoch", global_step=1)
    store.arm(OSError(errno.EIO, "manifest write failed (injected)"))
    with pytest.raises(OSError, match="injected"):
        store.save("checkpoint_epoch_1.pth", state(1), role="epoch", global_step=2)
    # Uncommitted data would only take space on a disk that may be full: gone, with its intent marker.
    assert store_url.names() == ["checkpoint_epoch_0.pth", MANIFEST_NAME]
    assert [r.name for r in store_url.store().records()] == ["checkpoint_epoch_0.pth"]


def test_crash_between_publish_and_commit_leaves_an_ignored_orphan_then_swept(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = ManifestWriteFails(store_url.url, store_url.storage_options)
    store.save("checkpoint_epoch_0.pth", state(0), role="epoch", global_step=1)
    write_raw(store, "checkpoint_epoch_7.pth", b"a user's file the manifest does not list")
    store.arm(SimulatedCrash())
    with pytest.raises(SimulatedCrash):
        store.save("checkpoint_epoch_1.pth", state(1), role="epoch", global_step=2)
    # The data is complete under its final name, but nothing lists it: resume never sees it.
    assert "checkpoint_epoch_1.pth" in store_url.names()
    fresh = store_url.store()
    assert [r.name for r in fresh.records()] == ["checkpoint_epoch_0.pth"]
    assert resolve(fresh).record.name == "checkpoint_epoch_0.pth"
    # The next start sweeps it (its intent marker proves it ours); files it cannot prove ours stay.
    with caplog.at_level(logging.WARNING):
        assert "checkpoint_epoch_1.pth" in fresh.sweep_temp()
    assert "never committed" in caplog.text and "could not remove" not in caplog.text
    assert store_url.names() == ["checkpoint_epoch_0.pth", "checkpoint_epoch_7.pth", MANIFEST_NAME]


def test_crash_while_replacing_a_name_ends_in_old_or_complete_new_content(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = ManifestWriteFails(store_url.url, store_url.storage_options)
    store.save("checkpoint_epoch_0.pth", state(0), role="epoch", global_step=10)
    store.save("interrupt_checkpoint.pth", state(1), role="interrupt", global_step=15)
    # The crash hits the commit: the new bytes are under the name, the manifest still lists the old ones.
    store.arm(SimulatedCrash())
    with pytest.raises(SimulatedCrash):
        store.save("interrupt_checkpoint.pth", state(2), role="interrupt", global_step=18)
    # A reader already loads the complete new bytes: they match the record the name's intent marker holds.
    assert torch.equal(store_url.store().load("interrupt_checkpoint.pth")["w"], state(2)["w"])
    fresh = store_url.store()
    with caplog.at_level(logging.WARNING):
        fresh.sweep_temp()  # the next holder settles it: the new bytes get their record
        found = resolve(fresh)
    # The new bytes are complete (publishing is atomic) and their marker holds their record: they are used,
    # once verified, and the directory says so; never a half-visible file.
    assert found.record is not None and found.record.name == "interrupt_checkpoint.pth"
    assert (found.record.global_step, found.skipped) == (18, [])
    assert torch.equal(fresh.load("interrupt_checkpoint.pth")["w"], state(2)["w"])
    assert "was being replaced" in caplog.text
    assert not [n for n in store_url.names() if n.startswith(TMP_PREFIX)]


class CrashingMarkers(CheckpointStore):
    """A store killed while it announces a write: before any byte of it is published under its name."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        strategy = self.commit_strategy

        class Crash(type(strategy)):  # type: ignore[misc]
            def write_small(
                self, path: str, data: bytes, *, durable: bool = True, content: bool = True
            ) -> None:
                raise SimulatedCrash

        strategy.__class__ = Crash


def test_crash_before_a_replacement_publishes_keeps_the_old_content(store_url: StoreTarget) -> None:
    store_url.store().save("checkpoint_epoch_0.pth", state(0), role="epoch", global_step=10)
    old = store_url.store().save("interrupt_checkpoint.pth", state(1), role="interrupt", global_step=15)
    with pytest.raises(SimulatedCrash):
        CrashingMarkers(store_url.url, store_url.storage_options).save(
            "interrupt_checkpoint.pth", state(2), role="interrupt", global_step=18
        )
    fresh = store_url.store()
    fresh.sweep_temp()
    assert resolve(fresh).record == old
    assert torch.equal(fresh.load("interrupt_checkpoint.pth")["w"], state(1)["w"])
    assert not [n for n in store_url.names() if n.startswith(TMP_PREFIX)]


def test_copy_is_byte_identical_and_committed(store_url: StoreTarget) -> None:
    store = store_url.store()
    src = store.save("checkpoint_epoch_1.pth", state(1), epoch=1, global_step=10)
    dst = store.copy("checkpoint_epoch_1.pth", "best_model.pth")
    assert dst.role == "best" and dst.checksum == src.checksum and dst.seq > src.seq
    assert raw_bytes(store, "best_model.pth") == raw_bytes(store, "checkpoint_epoch_1.pth")
    store.verify("best_model.pth")
    # Deleting the source leaves the copy whole (hard links on local disk share bytes, not fate).
    store.delete(["checkpoint_epoch_1.pth"])
    store.verify("best_model.pth")


def test_delete_touches_only_listed_files(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.save("a.pth", state(1))
    write_raw(store, "users_notes.txt", b"mine")
    assert store.delete(["a.pth", "users_notes.txt", "never_existed.pth"]) == ["a.pth"]
    assert not store.fs.exists(store.path("a.pth"))
    assert raw_bytes(store, "users_notes.txt") == b"mine"
    assert store.records() == []


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], id="bit-flip"),
        pytest.param(lambda b: b"", id="zero-length"),
    ],
)
def test_verify_detects_damage(store_url: StoreTarget, damage) -> None:
    store = store_url.store()
    store.save("a.pth", state(1))
    write_raw(store, "a.pth", damage(raw_bytes(store, "a.pth")))
    with pytest.raises(CheckpointCorruptError, match=r"a\.pth"):
        store.verify("a.pth")
    with pytest.raises(CheckpointCorruptError, match=r"a\.pth"):
        store.load("a.pth")


def test_missing_manifest_is_rebuilt_with_warning(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_url.store()
    store.save("checkpoint_epoch_0.pth", state(0), epoch=0, global_step=5, metrics={"m": 1.0}, monitor="m")
    store.save("checkpoint_epoch_1.pth", state(1), epoch=1, global_step=10)
    write_raw(store, "users_file.pth", b"not ours")
    torch.save({"w": torch.zeros(3)}, "/dev/null")
    original = store.manifest()
    store.fs.rm_file(store.manifest_path)
    with caplog.at_level(logging.WARNING):
        rebuilt = store_url.store().manifest()
    assert "missing; rebuilding" in caplog.text
    assert sorted(rebuilt.records) == ["checkpoint_epoch_0.pth", "checkpoint_epoch_1.pth"]
    for name, rec in rebuilt.records.items():
        old = original.records[name]
        assert (rec.checksum, rec.size, rec.epoch, rec.global_step, rec.role) == (
            old.checksum,
            old.size,
            old.epoch,
            old.global_step,
            old.role,
        )
    assert rebuilt.records["checkpoint_epoch_0.pth"].metric() == 1.0
    assert rebuilt.records["checkpoint_epoch_1.pth"].seq > rebuilt.records["checkpoint_epoch_0.pth"].seq


def test_garbage_manifest_is_rebuilt_with_warning(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_url.store()
    store.save("checkpoint_epoch_0.pth", state(0), epoch=0, global_step=5)
    write_raw(store, MANIFEST_NAME, b"{not json")
    with caplog.at_level(logging.WARNING):
        rebuilt = store_url.store().manifest()
    assert "not valid JSON" in caplog.text
    assert list(rebuilt.records) == ["checkpoint_epoch_0.pth"]


def test_newer_manifest_format_is_refused_not_overwritten(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.save("a.pth", state(0))
    doc = json.loads(raw_bytes(store, MANIFEST_NAME))
    doc["version"] = 99
    write_raw(store, MANIFEST_NAME, json.dumps(doc).encode())
    with pytest.raises(ManifestError, match="newer format version 99"):
        store_url.store().manifest()


def test_sweep_removes_only_our_temp_files(store_url: StoreTarget) -> None:
    store = store_url.store()
    store.save("a.pth", state(0))
    write_raw(store, f"{TMP_PREFIX}0123456789ab-a.pth", b"partial")
    write_raw(store, "tmp_user_file", b"keep")
    assert store.sweep_temp() == [f"{TMP_PREFIX}0123456789ab-a.pth"]
    assert sorted(store.list_names()) == ["a.pth", MANIFEST_NAME, "tmp_user_file"]


@pytest.mark.parametrize("name", ["../escape.pth", "a/b.pth", "..", ".", "", "x\x00y", "..\\x.pth"])
def test_names_cannot_escape_the_directory(store_url: StoreTarget, name: str) -> None:
    store = store_url.store()
    with pytest.raises(ValueError, match="invalid checkpoint file name"):
        store.save(name, state(0))


def test_reserved_names_are_refused(store_url: StoreTarget) -> None:
    store = store_url.store()
    with pytest.raises(ValueError, match="reserved"):
        store.save(MANIFEST_NAME, state(0))


def test_url_for_keeps_the_protocol(store_url: StoreTarget) -> None:
    store = store_url.store()
    url = store.url_for("a.pth")
    assert url.endswith("/a.pth")
    if "://" in store_url.url:
        assert url.startswith(store_url.url.split("://")[0] + "://")
        # ...and names the same file when handed back to fsspec, as Lightning does with ckpt_path.
        fs, path = fsspec.core.url_to_fs(url, **store_url.storage_options)
        assert path == store.path("a.pth") and type(fs) is type(store.fs)


def test_unsafe_pickle_is_refused(store_url: StoreTarget, tmp_path) -> None:
    store = store_url.store()
    marker = tmp_path / "pwned"
    store.save("evil.pth", {"x": Exploit(str(marker))}, embed_metadata=False)
    from lightning_genesis_ckpt import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError, match="trusted=True"):
        store.load("evil.pth")
    assert not marker.exists()


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("verbose", [True, False])
def test_a_slow_load_logs_one_line_with_size_and_speed(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, verbose: bool
) -> None:
    from lightning_genesis_ckpt.core.display import human_size
    from lightning_genesis_ckpt.storage import reader

    store = store_url.store(verbose=verbose)
    rec = store.save("big.pth", state(1, n=100_000))
    monkeypatch.setattr(reader, "SLOW_LOAD_S", 0.0)  # every load counts as slow
    with caplog.at_level(logging.INFO, logger="lightning_genesis_ckpt"):
        store.load("big.pth")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded")]
    if verbose:
        assert len(lines) == 1 and human_size(rec.size) in lines[0] and " 0 MiB/s" not in lines[0]
    else:
        assert lines == []
