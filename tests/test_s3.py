"""What only an object store can show: requests counted at a real S3-protocol server, multipart uploads, secrets.

The server is moto's, on loopback (``s3_server`` in conftest); the client is s3fs, configured only through the
``storage_options`` a user would pass.
"""

from __future__ import annotations

import errno
import gc
import io
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from conftest import BUCKET, StoreTarget, make_target, pending_uploads
from fsspec.asyn import sync_wrapper
from s3fs import S3FileSystem
from s3server import ACCESS_KEY, SECRET_KEY, S3Server

from lightning_genesis_ckpt import CheckpointRecord, CheckpointStore
from lightning_genesis_ckpt.core.manifest import Manifest
from lightning_genesis_ckpt.core.names import epoch_name
from lightning_genesis_ckpt.storage import serialization
from lightning_genesis_ckpt.storage.atomicity import DeferredCommit, strategy_for
from lightning_genesis_ckpt.storage.resume import resolve
from lightning_genesis_ckpt.storage.serialization import format_checksum

MiB = 2**20


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
    """A fresh, empty checkpoint directory on the S3 server."""
    return make_target(request, tmp_path, "s3")


def test_commit_strategy_follows_capabilities(s3: StoreTarget) -> None:
    # No atomic rename on an object store: the deferred (transactional) commit, whatever the class is called.
    assert isinstance(strategy_for(s3.fs()), DeferredCommit)
    assert isinstance(s3.store().commit_strategy, DeferredCommit)


# ------------------------------------------------------------------------------- multipart uploads
@pytest.mark.parametrize("mib", [0, 12], ids=["before-any-part", "after-two-parts"])
def test_failed_write_leaves_no_multipart_upload(s3: StoreTarget, s3_server: S3Server, mib: int) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options, default_block_size=5 * MiB)
    path = s3.store().path("big.pth")
    mark = s3_server.mark()
    failed = False
    try:
        with DeferredCommit(fs).open_write(path) as f:
            f.write(b"\x00" * 1024)
            for _ in range(mib):
                f.write(b"\x01" * MiB)
            raise RuntimeError("fails on purpose")
    except RuntimeError:
        failed = True  # the exception is not kept: its traceback would keep the file object alive
    assert failed
    # The abandoned file object is collected: it must not start (or finish) an upload then.
    del f
    gc.collect()
    sent = [str(r) for r in s3_server.requests_since(mark)]
    if mib:
        assert sum("partNumber" in r for r in sent) == 2, sent  # it really was a multipart upload...
        assert sent[-1].startswith("DELETE") and "uploadId" in sent[-1], sent  # ...and it was aborted
    else:
        assert sent == []  # nothing had gone up, nothing goes up afterwards
    assert pending_uploads(s3) == []
    assert not fs.exists(path)


def test_failed_save_leaves_no_multipart_upload(s3: StoreTarget) -> None:
    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("cannot pickle this on purpose")

    store = s3.store()
    store.save("x.pth", {"w": torch.ones(3)})
    with pytest.raises(RuntimeError, match="on purpose"):
        store.save("x.pth", {"w": torch.ones(3), "bad": Unpicklable()})
    gc.collect()
    assert pending_uploads(s3) == []


class FlakyS3(S3FileSystem):
    """s3fs whose connection drops when the second part of any multipart upload is sent."""

    protocol = ("s3flaky",)

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part" and kwargs.get("PartNumber") == 2:
            raise OSError(errno.ECONNRESET, "Connection reset by peer (injected)")
        return await super()._call_s3(method, *args, **kwargs)

    call_s3 = sync_wrapper(_call_s3)  # s3fs's files call the blocking twin, bound to the base method


def test_network_failure_mid_upload_leaves_no_parts_and_the_old_checkpoint(s3: StoreTarget) -> None:
    fsspec.register_implementation("s3flaky", FlakyS3, clobber=True)
    url = s3.url.replace("s3://", "s3flaky://")
    store = CheckpointStore(url, {**s3.storage_options, "default_block_size": 5 * MiB})
    good = store.save("x.pth", {"w": torch.ones(10)})
    before = s3.fs().cat_file(s3.store().path("x.pth"))
    big = {"w": torch.zeros(3 * MiB)}  # 12 MiB: the tensor goes up as part 1, the rest fails as part 2
    with pytest.raises(OSError, match="injected"):
        store.save("x.pth", big)
    with pytest.raises(OSError, match="injected"):
        store.save("y.pth", big)
    gc.collect()
    assert pending_uploads(s3) == []
    assert s3.names() == ["genesis_manifest.json", "x.pth"]
    assert s3.fs().cat_file(s3.store().path("x.pth")) == before
    assert s3.store().manifest().records == {"x.pth": good}


def test_large_checkpoint_goes_up_in_parts_and_round_trips(s3: StoreTarget, s3_server: S3Server) -> None:
    store = CheckpointStore(s3.url, {**s3.storage_options, "default_block_size": 5 * MiB})
    mark = s3_server.mark()
    obj = {"w": torch.randn(3 * MiB)}
    rec = store.save("big.pth", obj)
    sent = [str(r) for r in s3_server.requests_since(mark)]
    assert sum("partNumber" in r for r in sent) >= 2, sent
    assert rec.size > 12 * MiB and pending_uploads(s3) == []
    assert torch.equal(s3.store().load("big.pth")["w"], obj["w"])


def test_truncated_object_is_caught_before_its_bytes_are_downloaded(
    s3: StoreTarget, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    store = s3.store()
    store.save("checkpoint_epoch_0.pth", {"w": torch.ones(3)}, role="epoch", global_step=1)
    store.save("checkpoint_epoch_1.pth", {"w": torch.ones(3) * 2}, role="epoch", global_step=2)
    fs = s3.fs()  # another client overwrites the newest object through the server
    path = store.path("checkpoint_epoch_1.pth")
    fs.pipe_file(path, fs.cat_file(path)[:100])
    mark = s3_server.mark()
    with caplog.at_level(logging.WARNING):
        found = resolve(s3.store())
    assert found.record is not None and found.record.name == "checkpoint_epoch_0.pth"
    assert "checkpoint_epoch_1.pth" in caplog.text and "truncated" in caplog.text
    sent = [str(r) for r in s3_server.requests_since(mark) if r.path.endswith("/checkpoint_epoch_1.pth")]
    assert sent == [f"HEAD /{path}"]  # the size alone condemned it: no GET


def test_large_checkpoint_is_loaded_through_a_local_spool_file(
    s3: StoreTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3.store()
    obj = {"w": torch.randn(50_000)}
    store.save("a.pth", obj)
    monkeypatch.setattr(serialization, "SPOOL_IN_MEMORY", 64 * 1024)  # 200 KB is "large" now
    assert torch.equal(s3.store().load("a.pth")["w"], obj["w"])


# --------------------------------------------------------------------------------- request counts
def populate(target: StoreTarget, n: int) -> list[CheckpointRecord]:
    """``n`` committed rolling checkpoints, uploaded concurrently, with one manifest listing them all."""
    store = target.store()
    blobs: dict[str, bytes] = {}
    records = []
    for epoch in range(n):
        buf = io.BytesIO()
        torch.save({"w": torch.full((4,), float(epoch)), "epoch": epoch}, buf)
        data = buf.getvalue()
        name = epoch_name(epoch)
        blobs[store.path(name)] = data
        records.append(
            CheckpointRecord(
                name=name,
                role="epoch",
                size=len(data),
                checksum=format_checksum(zlib.crc32(data)),
                created=1e9 + epoch,
                seq=epoch + 1,
                epoch=epoch,
                global_step=10 * (epoch + 1),
            )
        )
    fs = target.fs()
    fs.pipe(blobs)
    manifest = Manifest({r.name: r for r in records}, n + 1)
    fs.pipe_file(store.manifest_path, manifest.encode())
    return records


def test_resolving_among_1000_checkpoints_takes_a_handful_of_requests(
    s3: StoreTarget, s3_server: S3Server
) -> None:
    populate(s3, 1000)
    assert len(s3.names()) == 1001
    store = s3.store(verbose=False)  # a new process's view: nothing cached
    mark = s3_server.mark()
    start = time.perf_counter()
    found = resolve(store)
    elapsed = time.perf_counter() - start
    sent = s3_server.requests_since(mark)
    print(f"\nresolution among 1000 checkpoints: {len(sent)} requests, {elapsed * 1000:.0f} ms: ", *sent)
    assert found.record is not None and found.record.name == "checkpoint_epoch_999.pth"
    assert torch.equal(found.checkpoint["w"], torch.full((4,), 999.0))
    assert len(sent) <= 5, [str(r) for r in sent]
    assert not [r for r in sent if r.is_listing], "resolution must not list the directory"
    # The manifest and the chosen checkpoint, nothing else: no object is touched twice.
    touched = sorted({r.path.rsplit("/", 1)[-1] for r in sent})
    assert touched == ["checkpoint_epoch_999.pth", "genesis_manifest.json"]


def test_retention_deletes_in_one_batch(s3: StoreTarget, s3_server: S3Server) -> None:
    populate(s3, 30)
    store = s3.store(verbose=False)
    store.acquire_lock()
    store.delete([epoch_name(29)])  # the run's first transaction: the steady state starts after it
    mark = s3_server.mark()
    doomed = [epoch_name(e) for e in range(25)]
    assert store.delete(doomed) == doomed
    sent = s3_server.requests_since(mark)
    store.release_lock()
    # The manifest re-read under the lock, the lock checked, the manifest forgets them (one conditional PUT),
    # then one DeleteObjects request removes all 25.
    assert [str(r) for r in sent] == [
        f"GET /{store.manifest_path}",
        f"HEAD /{store.root}/genesis.lock",
        f"PUT /{store.manifest_path}",
        f"POST /{BUCKET}?delete",
    ]
    assert sent[2].condition is not None and sent[2].condition.startswith("If-Match")
    assert s3.names() == sorted(["genesis_manifest.json", *(epoch_name(e) for e in range(25, 29))])


def test_an_improved_epoch_is_eight_requests_and_one_manifest_write(
    s3: StoreTarget, s3_server: S3Server
) -> None:
    store = s3.store(verbose=False)
    store.acquire_lock()
    for epoch in range(2):
        with store.transaction() as tx:
            record = tx.write(epoch_name(epoch), {"w": torch.ones(3) * epoch}, role="epoch", epoch=epoch)
            tx.copy(record.name, "best_model.pth")
    mark = s3_server.mark()
    # A new rolling checkpoint, best_model.pth replaced by a copy of it, the previous one deleted.
    with store.transaction() as tx:
        record = tx.write(epoch_name(2), {"w": torch.ones(3) * 2}, role="epoch", epoch=2)
        tx.copy(record.name, "best_model.pth")
        tx.delete([epoch_name(1)])
    sent = s3_server.requests_since(mark)
    store.release_lock()
    shown = [f"{'COPY' if r.copy_source else r.method} {r.path.rsplit('/', 1)[-1]}" for r in sent]
    assert shown == [
        "GET genesis_manifest.json",  # re-read under the lock
        f"PUT .genesis-tmp-intent-{epoch_name(2)}",  # intent markers, holding the records
        f"PUT {epoch_name(2)}",  # a small checkpoint: one PUT
        "PUT .genesis-tmp-intent-best_model.pth",
        "COPY best_model.pth",  # server-side
        "HEAD genesis.lock",  # the lease, checked right before the manifest write
        "PUT genesis_manifest.json",  # the commit point, conditional on the version read
        f"POST {BUCKET}",  # DeleteObjects: the old checkpoint and both markers, in one request
    ], shown
    assert "delete" in sent[-1].query
    manifest_puts = [r for r in sent if r.method == "PUT" and r.path.endswith("genesis_manifest.json")]
    assert len(manifest_puts) == 1 and manifest_puts[0].condition.startswith("If-Match")
    assert sorted(s3.store().manifest().records) == ["best_model.pth", epoch_name(0), epoch_name(2)]


# --------------------------------------------------------------------------------- secrets and paths
def test_secrets_never_reach_files_or_logs(s3: StoreTarget, caplog: pytest.LogCaptureFixture) -> None:
    from test_callback import fit

    with caplog.at_level(logging.DEBUG):
        fit(s3, 2, monitor="val_loss")
        _, trainer, cb = fit(s3, 3, monitor="val_loss")
    assert cb.resumed_from is not None
    assert str(trainer.ckpt_path).startswith(f"{s3.url}/")
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("lightning_genesis_ckpt"))
    assert f"{s3.url}/checkpoint_epoch_2.pth" in ours  # our log lines name files by their full URL
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET_KEY not in everything
    assert ACCESS_KEY not in ours
    fs = s3.fs()
    root = s3.store().root
    for name in s3.names():
        data = fs.cat_file(f"{root}/{name}")
        assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, name


def test_missing_credentials_fail_at_setup_naming_the_directory(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {k: v for k, v in s3_server.storage_options().items() if k not in ("key", "secret")}
    url = f"s3://{BUCKET}/no-credentials"
    # The botocore error surfaces as an OSError (what the callback's setup raises) naming the URL and the fix.
    with pytest.raises(PermissionError, match=r"cannot be reached.*storage_options") as err:
        CheckpointStore(url, options).ensure_writable()
    assert url in str(err.value)
