"""Parallel object-store transfers (storage/transfers.py) against the moto S3 server on loopback.

Concurrency is shown without clocks: a filesystem subclass holds each watched request until a second one is
in flight (a bounded wait), and records the most that were ever in flight at once.
"""

from __future__ import annotations

import asyncio
import errno
import gc
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
import torch
from conftest import StoreTarget, make_target, pending_uploads
from fsspec.asyn import sync_wrapper
from s3fs import S3FileSystem
from s3server import S3Server

from lightning_genesis_ckpt import CheckpointStore
from lightning_genesis_ckpt.core.errors import CheckpointCorruptError
from lightning_genesis_ckpt.storage import transfers
from lightning_genesis_ckpt.storage.atomicity import DeferredCommit

MiB = 2**20
PART = 5 * MiB  # S3's smallest part: a few parts stay a few megabytes


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
    return make_target(request, tmp_path, "s3")


class WatchedS3(S3FileSystem):
    """s3fs that counts the part uploads and ranged GETs in flight, and can fail one part on cue."""

    protocol = ("s3watched",)
    active: ClassVar[dict[str, int]] = {}
    most: ClassVar[dict[str, int]] = {}
    fail_part: ClassVar[int | None] = None

    @classmethod
    def reset(cls) -> None:
        cls.active, cls.most, cls.fail_part = {}, {}, None

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        watched = method == "upload_part" or (method == "get_object" and "Range" in kwargs)
        if not watched:
            return await super()._call_s3(method, *args, **kwargs)
        cls = type(self)
        cls.active[method] = cls.active.get(method, 0) + 1
        cls.most[method] = max(cls.most.get(method, 0), cls.active[method])
        try:
            # Hold the first request until a second one is in flight; for at most 10 s, after which the
            # test sees "at most one at a time" in ``most`` and fails.
            for _ in range(1000):
                if cls.most[method] >= 2:
                    break
                await asyncio.sleep(0.01)
            if method == "upload_part" and kwargs.get("PartNumber") == cls.fail_part:
                raise OSError(errno.ECONNRESET, "Connection reset by peer (injected)")
            return await super()._call_s3(method, *args, **kwargs)
        finally:
            cls.active[method] -= 1

    call_s3 = sync_wrapper(_call_s3)  # the blocking twin, bound to this class's _call_s3


@pytest.fixture
def watched(s3: StoreTarget) -> tuple[str, dict[str, Any]]:
    """The target's URL through :class:`WatchedS3`, with 5 MiB parts and 3 in flight."""
    fsspec.register_implementation("s3watched", WatchedS3, clobber=True)
    WatchedS3.reset()
    options = {**s3.storage_options, "default_block_size": PART, "max_concurrency": 3}
    return s3.url.replace("s3://", "s3watched://"), options


def state(mib: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(mib)
    return {"a": torch.randn(mib * MiB // 8, generator=g), "b": torch.randn(mib * MiB // 8, generator=g)}


def test_a_state_of_several_parts_goes_up_and_comes_down_concurrently_and_verified(
    s3: StoreTarget, s3_server: S3Server, watched: tuple[str, dict[str, Any]]
) -> None:
    url, options = watched
    obj = state(26)  # 26 MiB: six parts, six ranges
    mark = s3_server.mark()
    record = CheckpointStore(url, options).save("big.pth", obj)
    parts = [r for r in s3_server.requests_since(mark) if "partNumber" in r.query]
    assert len(parts) == 6 and record.size > 25 * MiB
    assert WatchedS3.most["upload_part"] in (2, 3)  # overlapping, and never more than max_concurrency
    assert pending_uploads(s3) == []

    mark = s3_server.mark()
    loaded = CheckpointStore(url, options).load("big.pth")
    assert torch.equal(loaded["a"], obj["a"]) and torch.equal(loaded["b"], obj["b"])
    gets = [r for r in s3_server.requests_since(mark) if r.method == "GET" and r.path.endswith("/big.pth")]
    assert len(gets) == 6  # one per range, each conditional on the version the HEAD saw
    assert all(r.condition is not None and r.condition.startswith("If-Match") for r in gets)
    assert WatchedS3.most["get_object"] in (2, 3)


def test_a_part_failing_mid_upload_leaves_nothing_visible_and_no_upload_in_progress(
    s3: StoreTarget, s3_server: S3Server, watched: tuple[str, dict[str, Any]]
) -> None:
    url, options = watched
    store = CheckpointStore(url, options)
    old = store.save("x.pth", {"w": torch.ones(4)})
    WatchedS3.fail_part = 3  # parts 1, 2 and 4 may be in flight or done when 3 fails
    mark = s3_server.mark()
    with pytest.raises(OSError, match="injected"):
        store.save("x.pth", state(26))
    with pytest.raises(OSError, match="injected"):
        store.save("y.pth", state(26))
    gc.collect()
    assert pending_uploads(s3) == []
    assert s3.names() == ["genesis_manifest.json", "x.pth"]
    assert s3.store().manifest().records == {"x.pth": old}
    assert torch.equal(s3.store().load("x.pth")["w"], torch.ones(4))
    # The abort came after every part it discarded had been answered: nothing was sent after it.
    for key in ("x.pth", "y.pth"):
        sent = [
            r for r in s3_server.requests_since(mark) if r.path.endswith(f"/{key}") and "uploadId" in r.query
        ]
        assert sent and sent[-1].method == "DELETE", [str(r) for r in sent]


class NoAbortS3(WatchedS3):
    """:class:`WatchedS3` whose AbortMultipartUpload fails too (the outage that failed the part goes on)."""

    protocol = ("s3noabort",)

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "abort_multipart_upload":
            raise OSError(errno.ENETUNREACH, "Network is unreachable (injected abort failure)")
        return await super()._call_s3(method, *args, **kwargs)

    call_s3 = sync_wrapper(_call_s3)


def test_an_abort_that_fails_too_does_not_hide_the_error_of_the_save(
    s3: StoreTarget, watched: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    url, options = watched
    fsspec.register_implementation("s3noabort", NoAbortS3, clobber=True)
    store = CheckpointStore(url.replace("s3watched://", "s3noabort://"), options)
    old = store.save("x.pth", {"w": torch.ones(4)})
    WatchedS3.fail_part = 2
    with pytest.raises(OSError, match=r"Connection reset by peer \(injected\)") as raised:
        store.save("x.pth", state(16))
    assert "abort failure" not in str(raised.value)
    assert "could not abort the upload" in caplog.text and "lifecycle rule" in caplog.text
    assert s3.store().manifest().records == {"x.pth": old}  # the committed file is untouched
    assert torch.equal(s3.store().load("x.pth")["w"], torch.ones(4))


def test_an_aborted_stream_sends_nothing_after_its_abort(s3: StoreTarget, s3_server: S3Server) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options, default_block_size=PART)
    path = s3.store().path("big.pth")
    mark = s3_server.mark()
    with pytest.raises(RuntimeError, match="on purpose"), DeferredCommit(fs).open_write(path) as f:
        for _ in range(17):
            f.write(b"\x01" * MiB)  # three parts sent, two megabytes still buffered
        raise RuntimeError("fails on purpose")
    sent = [str(r) for r in s3_server.requests_since(mark)]
    assert sum("partNumber" in r for r in sent) == 3, sent
    assert sent[-1].startswith("DELETE") and "uploadId" in sent[-1], sent
    assert pending_uploads(s3) == [] and not fs.exists(path)


def test_a_corrupted_object_is_detected_when_loaded_by_ranges(
    s3: StoreTarget, watched: tuple[str, dict[str, Any]]
) -> None:
    url, options = watched
    CheckpointStore(url, options).save("big.pth", state(16))
    fs = s3.fs()
    path = s3.store().path("big.pth")
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the third range: same size, so every range is read
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        CheckpointStore(url, options).load("big.pth")
    assert WatchedS3.most["get_object"] >= 2


class ReplacingS3(S3FileSystem):
    """s3fs where another writer replaces the object right before the second range of the first read."""

    protocol = ("s3replacing",)
    replacement: ClassVar[bytes | None] = None

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        cls = type(self)
        second_range = method == "get_object" and str(kwargs.get("Range", "")).startswith(f"bytes={PART}-")
        if second_range and cls.replacement is not None:
            body, cls.replacement = cls.replacement, None
            await super()._call_s3("put_object", Bucket=kwargs["Bucket"], Key=kwargs["Key"], Body=body)
        return await super()._call_s3(method, *args, **kwargs)


def test_an_object_replaced_mid_read_is_never_mixed(s3: StoreTarget) -> None:
    fsspec.register_implementation("s3replacing", ReplacingS3, clobber=True)
    fs = fsspec.filesystem("s3replacing", skip_instance_cache=True, **s3.storage_options)
    path = s3.store().path("blob")
    old, new = b"\x01" * (3 * PART), b"\x02" * (3 * PART)
    fs.pipe_file(path, old)
    etag = fs.info(path, refresh=True)["ETag"]
    ReplacingS3.replacement = new
    with pytest.raises(transfers.ObjectChanged, match="replaced"):
        transfers.download(fs, path, len(old), etag, None, chunk_size=PART)
    # Read again from a fresh HEAD: the new version, whole.
    again = fs.info(path, refresh=True)
    sink = bytearray()

    class Sink:
        def write(self, b: bytes) -> int:
            sink.extend(b)
            return len(b)

    transfers.download(fs, path, again["size"], again["ETag"], Sink(), chunk_size=PART)  # type: ignore[arg-type]
    assert bytes(sink) == new


def test_part_size_below_the_s3_minimum_is_refused_naming_the_setting(s3: StoreTarget) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options, default_block_size=MiB)
    with pytest.raises(ValueError, match=r"default_block_size.*at least 5 MiB"):
        transfers.part_size(fs)
    default = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options)
    assert transfers.part_size(default) == transfers.PART_SIZE and transfers.concurrency(default) == 10


@pytest.mark.parametrize("fixed", [False, True], ids=["growing", "fixed_upload_size"])
def test_parts_grow_so_that_a_large_checkpoint_stays_under_the_part_limit(
    s3: StoreTarget, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, fixed: bool
) -> None:
    monkeypatch.setattr(transfers, "PARTS_PER_SIZE", 2)  # double every 2 parts instead of every 1,000
    options = {**s3.storage_options, "default_block_size": PART, "fixed_upload_size": fixed}
    mark = s3_server.mark()
    obj = state(40)
    record = CheckpointStore(s3.url, options).save("big.pth", obj)
    sizes, left, n = [], record.size, 0
    while left > 0:
        n += 1
        size = PART if fixed else PART << ((n - 1) // 2)  # 5, 5, 10, 10, 20 MiB...
        sizes.append(min(size, left))
        left -= size
    parts = [r for r in s3_server.requests_since(mark) if "partNumber" in r.query]
    assert len(parts) == len(sizes) == (9 if fixed else 5)
    assert torch.equal(s3.store().load("big.pth")["b"], obj["b"])


@pytest.mark.parametrize("calculation", ["when_supported", "when_required"])
def test_an_upload_declares_the_parts_crc32_unless_the_client_computes_only_required_checksums(
    s3: StoreTarget, s3_server: S3Server, calculation: str
) -> None:
    # As boto3's transfer manager: the server checks each part's CRC32 and keeps their composite, instead of
    # computing a full-object checksum of its own at completion. A client set to "when_required" (for stores
    # that reject checksums) gets no checksum named on its behalf.
    options = {
        **s3.storage_options,
        "default_block_size": PART,
        "config_kwargs": {"request_checksum_calculation": calculation},
    }
    obj = state(12)
    mark = s3_server.mark()
    CheckpointStore(s3.url, options).save("big.pth", obj)
    assert sum("partNumber" in r.query for r in s3_server.requests_since(mark)) == 3
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    bucket, key, _ = fs.split_path(s3.store().path("big.pth"))
    head = fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    if calculation == "when_supported":
        assert "ChecksumCRC32" in head and "ChecksumCRC64NVME" not in head, sorted(head)
    else:
        assert "ChecksumCRC32" not in head, head
    assert torch.equal(s3.store().load("big.pth")["a"], obj["a"])
