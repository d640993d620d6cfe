"""Object-store transfers with several parts in flight: concurrent multipart uploads, ranged parallel reads.

A checkpoint is one large object. Through s3fs's buffered files its multipart upload sends one part at a time
and a read fetches one range at a time, so one request's latency bounds the throughput; boto3's transfer
manager keeps ten requests in flight. This module does the same on s3fs's own event loop and client (its
``_call_s3``: the same credentials, endpoint, retries and error translation as every other request):

* :class:`ConcurrentUpload` -- a write-only stream that becomes a multipart upload. Each full part is sent
  as soon as it is complete while the writer goes on producing the next one. Nothing is visible until
  :meth:`~ConcurrentUpload.complete` (CompleteMultipartUpload), and :meth:`~ConcurrentUpload.abort` waits for
  the parts in flight before AbortMultipartUpload, so no part can land after the abort and no upload is left
  in progress. Like boto3's, the upload names CRC32 as its checksum (:func:`checksum_args`), so the server
  checks every part as it arrives.
* :func:`download` -- a file read by ranged GETs, several in flight, consumed in order: the crc32 and the copy
  into the caller's sink see every byte once, in order, in the calling thread (one verified pass). Every
  range is conditional on the ETag of the HEAD that gave the size (``If-Match``), so bytes of two versions of
  an object replaced mid-read are never mixed: that read fails with :class:`ObjectChanged` and is retried.

Two settings, both s3fs's own ``storage_options`` with the meaning s3fs gives them:

* ``max_concurrency`` (s3fs's default: 10) -- requests in flight per file, for uploads and downloads.
* ``default_block_size`` -- the part (and range) size; when it is not given, :data:`PART_SIZE` (8 MiB, as
  boto3), rather than s3fs's 50 MiB. At least 5 MiB: S3's smallest part.

Memory: an upload holds at most ``(max_concurrency + 1) x part size`` (the parts in flight and the one being
filled), a download at most ``max_concurrency x part size`` beyond the destination it fills: 88 MiB and
80 MiB with the defaults. The HTTP client's copies of the parts it is sending come on top (aiohttp joins
headers and body into one buffer per request): docs/performance.md has the measured peaks.

An upload past 1,000 parts (8 GiB with the defaults) doubles its part size every 1,000 parts, so S3's
10,000-part limit is reached only past 8 TiB, and the memory bound doubles with it. Not with
``fixed_upload_size=True`` (the s3fs option Cloudflare R2 needs): there the limit is 10,000 parts.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import IO, Any, cast

import fsspec.asyn

from ..core.errors import store_answered
from . import serialization

MiB = 2**20
#: The part size when ``storage_options`` gives no ``default_block_size``: boto3's, small enough that ten
#: parts in flight cost 80 MiB, large enough that a part's request overhead is amortised.
PART_SIZE = 8 * MiB
#: S3's smallest part (every part but the last) and its largest number of parts.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: An upload's part size doubles after every this many parts (unless the store needs fixed-size parts).
PARTS_PER_SIZE = 1_000
#: The checksum a multipart upload declares (boto3's default): see :func:`checksum_args`.
CHECKSUM_ALGORITHM = "CRC32"


class ObjectChanged(OSError):
    """The object was replaced while it was being read (a ranged GET's ``If-Match`` failed)."""


def part_size(fs: Any) -> int:
    """The part size for ``fs``: its ``default_block_size`` if ``storage_options`` set one, else PART_SIZE."""
    given = (getattr(fs, "storage_options", None) or {}).get("default_block_size")
    size = int(given) if given else PART_SIZE
    if size < MIN_PART_SIZE:
        raise ValueError(
            f"storage_options['default_block_size']={given!r} is below S3's smallest part "
            f"({MIN_PART_SIZE} bytes): set it to at least 5 MiB"
        )
    return size


def concurrency(fs: Any) -> int:
    """Requests in flight per file: s3fs's ``max_concurrency`` (validated by s3fs, at least 1)."""
    return max(1, int(getattr(fs, "max_concurrency", 10)))


def checksum_args(fs: Any) -> dict[str, str]:
    """The checksum every request of a multipart upload names, as boto3's transfer manager does: CRC32,
    unless the client computes checksums only where an operation requires them
    (``config_kwargs={"request_checksum_calculation": "when_required"}``, the setting for stores that reject
    them).

    Named at creation, the server checks each part's CRC32 on arrival and the object's checksum is the
    composite of the parts' (CompleteMultipartUpload gives them back). Without it S3 computes a full-object
    CRC64NVME of its own at completion; on the loopback moto server that was about 40% of its CPU per upload
    (docs/performance.md).
    """
    config = getattr(getattr(fs.connect(), "meta", None), "config", None)
    if getattr(config, "request_checksum_calculation", "when_supported") == "when_required":
        return {}
    return {"ChecksumAlgorithm": CHECKSUM_ALGORITHM}


class ConcurrentUpload:
    """A multipart upload to ``path`` fed by :meth:`write`, with up to ``concurrency(fs)`` parts in flight.

    Args:
        fs: an s3fs filesystem (or a subclass).
        path: the object's path (``bucket/key``).

    ``write`` blocks while all slots are busy (that is the memory bound), and raises the error of any part
    that failed. Call :meth:`complete` to publish the object or :meth:`abort` to discard it; one of the two
    must be called (the owner, :class:`~.atomicity.DeferredCommit`, always does).
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self.base_size = part_size(fs)
        self.slots = concurrency(fs)
        self.fixed = bool(getattr(fs, "fixed_upload_size", False))
        self._part = bytearray()
        self._number = 0  # parts handed out so far
        self._tasks: list[asyncio.Task[dict[str, Any]]] = []
        self._done = False
        self._checksum = checksum_args(fs)
        response = fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key, **self._checksum)
        self.upload_id: str = response["UploadId"]

    def _size_of(self, number: int) -> int:
        """The size of part ``number`` (1-based): doubling every PARTS_PER_SIZE parts unless fixed."""
        return self.base_size if self.fixed else self.base_size << ((number - 1) // PARTS_PER_SIZE)

    def write(self, data: Any) -> int:
        """Append ``data``; every part it completes is sent. Returns the number of bytes taken."""
        view = memoryview(data).cast("B")
        taken = 0
        while taken < len(view):
            want = self._size_of(self._number + 1) - len(self._part)
            piece = view[taken : taken + want]
            self._part += piece
            taken += len(piece)
            if len(self._part) == self._size_of(self._number + 1):
                self._send(last=False)
        return taken

    def complete(self) -> None:
        """Send the last part, wait for every part, and publish the object (CompleteMultipartUpload)."""
        if self._part or self._number == 0:
            self._send(last=True)
        results = self._run(self._gather())
        # Each part's checksum as its UploadPart answer gave it, only where the upload declared one: S3 checks
        # the list against the algorithm named at creation.
        member = "Checksum" + CHECKSUM_ALGORITHM
        parts = [
            {
                "PartNumber": n,
                "ETag": r["ETag"],
                **({member: r[member]} if self._checksum and member in r else {}),
            }
            for n, r in enumerate(results, 1)
        ]
        try:
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
        finally:
            self.fs.invalidate_cache(self.path)
        self._done = True

    def abort(self) -> None:
        """Discard the upload: wait for the parts in flight (so none lands afterwards), then abort it.

        Idempotent; does nothing once the upload completed.
        """
        if self._done:
            return
        self._done = True
        self._part = bytearray()
        try:
            self._run(self._settle())
        finally:
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )

    # --------------------------------------------------------------------------------------- internals
    def _send(self, *, last: bool) -> None:
        if self._number >= MAX_PARTS:
            raise ValueError(
                f"{self.path}: more than {MAX_PARTS} parts; raise storage_options['default_block_size']"
            )
        part, self._part = self._part, bytearray()
        self._number += 1
        self._run(self._start(self._number, part))

    def _run(self, coro: Any) -> Any:
        return fsspec.asyn.sync(self.fs.loop, lambda: coro)

    async def _start(self, number: int, body: bytearray) -> None:
        # Wait for a free slot first: the bound on memory. A failed part fails the write that waits here.
        while sum(not t.done() for t in self._tasks) >= self.slots:
            await asyncio.wait([t for t in self._tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)
        self._raise_failed()
        if self._done:
            return  # aborted while this part waited for a slot (the writer was interrupted): never send it
        self._tasks.append(asyncio.ensure_future(self._upload(number, body)))

    async def _upload(self, number: int, body: bytearray) -> dict[str, Any]:
        result: dict[str, Any] = await self.fs._call_s3(
            "upload_part",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=body,
            **self._checksum,
        )
        body.clear()  # the part's memory goes back now, not when the list of tasks goes
        return result

    def _raise_failed(self) -> None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    async def _gather(self) -> list[dict[str, Any]]:
        await asyncio.wait(self._tasks) if self._tasks else None
        self._raise_failed()
        return [t.result() for t in self._tasks]

    async def _settle(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks)
        for t in self._tasks:  # retrieve the errors: the upload is discarded, they are not news
            if not t.cancelled():
                t.exception()


def download(
    fs: Any, path: str, size: int, etag: str, sink: IO[bytes] | None, chunk_size: int | None = None
) -> tuple[int, str]:
    """Read the object at ``path`` (``size`` bytes, version ``etag``) by ranged GETs, several in flight.

    The ranges are consumed in order in the calling thread: each one's bytes are checksummed and copied into
    ``sink`` (if given) once, and count into the current progress. Returns ``(size, checksum)`` of the bytes
    read.

    Raises:
        ObjectChanged: the object is no longer version ``etag`` (replaced mid-read): read it again.
        OSError: a request failed (s3fs's translation of the client's error).
    """
    step = chunk_size or part_size(fs)
    slots = concurrency(fs)
    bucket, key, _ = fs.split_path(path)
    pending: list[asyncio.Future[bytes]] = []
    offsets = iter(range(0, size, step))

    async def get(start: int) -> bytes:
        end = min(start + step, size) - 1
        try:
            response = await fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", IfMatch=etag
            )
        except OSError as e:
            if store_answered(e, ("PreconditionFailed",), (412,)):
                raise ObjectChanged(f"{path} was replaced while it was being read") from e
            raise
        body = response["Body"]
        try:
            data: bytes = await body.read()
        finally:
            body.close()
        return data

    async def refill() -> None:
        while len(pending) < slots:
            start = next(offsets, None)
            if start is None:
                return
            pending.append(asyncio.ensure_future(get(start)))

    async def next_range() -> bytes:
        await refill()
        return await pending.pop(0)

    async def cancel() -> None:
        for f in pending:
            f.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    run: Callable[[Any], Any] = lambda make: fsspec.asyn.sync(fs.loop, make)  # noqa: E731

    class Ranges(io.RawIOBase):
        """The ranges in order, as a stream for :func:`.serialization.checksum_stream` (ends early if short)."""

        got = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.got >= size:
                return b""
            data: bytes = run(next_range)
            self.got += len(data)
            return data  # empty when shorter than its HEAD said: the size check names it

    try:
        return serialization.checksum_stream(cast(IO[bytes], Ranges()), sink)
    finally:
        if pending:
            run(cancel)
