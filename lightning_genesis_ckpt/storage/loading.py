"""Loads in one verified pass: what is loaded is exactly what was checksummed, and only damage is "corrupt".

* **Local disks**: the file is opened once; the checksum is computed through that descriptor on a helper
  thread *while* torch loads from the same inode through ``/proc/self/fd/<n>`` (memory-mapped when asked and
  the file is a zip archive), so a file renamed over the name in between changes nothing, and the load costs
  the longer of the two passes, not their sum. The object is returned only after the checksum matched.
* **Remote files** are read once, into a spool (memory up to ``SPOOL_IN_MEMORY``, a local temporary file
  above), checked while they stream, and loaded from the spool. On S3 the read is several ranged GETs in
  flight, consumed in order (see :mod:`.transfers`).
* **Legacy (non-zip) torch files** are loaded without mmap, which torch supports only for zip archives.

A failed load is :class:`~.errors.CheckpointCorruptError` only on positive evidence of damage: a size or
checksum that differs from the record, or a file whose structure is broken (not a zip archive or a pickle,
a zip without a pickle in it, a pickle that does not parse). Anything else (``MemoryError``, ``EIO``, CUDA out
of memory under ``map_location``, an error of the caller's ``map_location``) is raised as itself, so that
resume never skips a healthy checkpoint because of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import pickletools
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import torch

from ..core.errors import CheckpointCorruptError, UnsafeCheckpointError
from ..core.records import CheckpointRecord
from . import markers, serialization, transfers
from .atomicity import is_s3
from .location import Location
from .serialization import READ_CHUNK, ZIP_MAGIC, MapLocation, Serializer

#: How many times a load reads an S3 object that is replaced while it is being read (a reused name).
OBJECT_CHANGED_RETRIES = 3

#: Bytes per ranged GET when reading from a remote filesystem other than S3: a checkpoint of up to this size is one
#: request, and a chunk in flight is no memory concern.
REMOTE_READ_BLOCK = 64 * 2**20

_PROC_FD = "/proc/self/fd"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def structure_damage(f: IO[bytes]) -> str | None:
    """Why ``f`` cannot be a torch checkpoint (the file's structure is broken), or None if it could be.

    Reads the file but never unpickles anything: zip archives are checked member by member (CRC included) and
    pickles are parsed opcode by opcode. A read that fails (EIO) is raised as itself, never taken for damage
    (``zipfile`` would report it as "not a zip file").
    """
    watched = _Watched(f)
    damage = _structure_damage(watched)  # type: ignore[arg-type]
    if watched.error is not None:
        raise watched.error
    return damage


class _Watched:
    """A file object that remembers the first I/O error of a read or a seek."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.f, name)
        if name not in ("read", "seek", "tell", "readinto", "readline"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                if self.error is None:
                    self.error = e
                raise

        return call


def _structure_damage(f: IO[bytes]) -> str | None:
    f.seek(0)
    head = f.read(4)
    f.seek(0)
    if not head:
        return "the file is empty"
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(f) as archive:
                bad = archive.testzip()
                if bad is not None:
                    return f"zip member {bad} is damaged (CRC mismatch)"
                pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not pickles:
                    return "a zip archive without data.pkl: not a torch checkpoint"
                _parse_pickle(io.BytesIO(archive.read(pickles[0])))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
            return f"not a valid torch zip archive ({type(e).__name__}: {e})"
        return None
    try:
        # torch's legacy format: five pickles (magic number, protocol, system info, the object, storage keys)
        # followed by the raw storages.
        magic = _parse_pickle(f)
        if magic != _LEGACY_MAGIC:
            return "neither a zip archive nor a torch legacy-format file"
        for _ in range(4):
            _parse_pickle(f)
    except (ValueError, EOFError, IndexError) as e:
        return f"its pickle is damaged ({type(e).__name__}: {e})"
    return None


def _parse_pickle(f: IO[bytes]) -> Any:
    """Parse one pickle from ``f`` without executing it; returns its value if it is a plain int."""
    value = None
    for opcode, arg, _ in pickletools.genops(f):
        if opcode.name in ("LONG1", "LONG4", "BININT", "BININT1", "BININT2", "INT", "LONG"):
            value = arg
    return value


def _not_damage(error: BaseException) -> bool:
    # Failures of the machine, not of the file: the load would work on a healthier day or another device.
    # (An OSError may be either: torch's zip reader says EINVAL for a truncated archive. The file decides.)
    return isinstance(error, (MemoryError, torch.OutOfMemoryError))


def load(
    source: str | IO[bytes],
    display: str,
    *,
    map_location: MapLocation,
    trusted: bool,
    serializer: Serializer | None,
    mmap: bool,
) -> Any:
    """``serialization.load`` with the rule above: "corrupt" only on evidence of damage."""
    try:
        return serialization.load(
            source, display, map_location=map_location, trusted=trusted, serializer=serializer, mmap=mmap
        )
    except CheckpointCorruptError as e:
        cause = e.__cause__
        if cause is None or isinstance(cause, (CheckpointCorruptError, UnsafeCheckpointError)):
            raise
        if _not_damage(cause):
            raise cause from None
        with _reopened(source) as f:
            damage = structure_damage(f)
        if damage is None:
            raise cause from None  # a sound file: whatever failed was not the file
        raise CheckpointCorruptError(display, f"{damage}; torch said: {e.reason}") from cause


@contextlib.contextmanager
def _reopened(source: str | IO[bytes]) -> Iterator[IO[bytes]]:
    if isinstance(source, str):
        with open(source, "rb") as f:
            yield f
    else:
        yield source


def _load_local(
    path: str,
    display: str,
    record: CheckpointRecord | None,
    accept: Callable[[int, str | None], None],
    **kwargs: Any,
) -> Any:
    """A local file in one pass: checked through one descriptor while torch loads from the same inode.

    The checksum runs on a helper thread (crc32 and file reads release the GIL) at the same time as
    ``torch.load``: the load costs the longer of the two instead of their sum, and both read the same pages
    of the page cache. The loaded object is returned only once the checksum matched; a mismatch discards it.
    """
    with open(path, "rb", buffering=0) as f:
        head = os.pread(f.fileno(), 4, 0)
        mmap = bool(kwargs.pop("mmap")) and head == ZIP_MAGIC  # torch maps zip archives only
        same_inode = f"{_PROC_FD}/{f.fileno()}"
        if not os.path.exists(same_inode):
            # No /proc (macOS): check first, then load through the descriptor itself (torch maps paths only).
            if record is not None:
                _check_local(f, record, accept)
            f.seek(0)
            return load(f, display, mmap=False, **kwargs)
        if record is None:
            return load(same_inode, display, mmap=mmap, **kwargs)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="genesis-verify") as pool:
            # torch reads through its own open file description (the /proc path): this offset is ours.
            # In this thread's context: the bytes count into the load's progress (a context variable).
            checked = pool.submit(
                contextvars.copy_context().run, serialization.checksum_stream, f, None, READ_CHUNK
            )
            try:
                obj = load(same_inode, display, mmap=mmap, **kwargs)
            except BaseException:
                _judge(checked.result(), record, accept)  # damage that failed the load is named as such
                raise
            _judge(checked.result(), record, accept)
        return obj


def _check_local(f: IO[bytes], record: CheckpointRecord, accept: Callable[[int, str | None], None]) -> None:
    _judge(serialization.checksum_stream(f, chunk_size=READ_CHUNK), record, accept)


def _judge(
    found: tuple[int, str], record: CheckpointRecord, accept: Callable[[int, str | None], None]
) -> None:
    """``accept`` (which raises unless an intent marker announces them) the bytes that differ from ``record``."""
    if found != (record.size, record.checksum):
        accept(*found)


def fetch(
    loc: Location, record: CheckpointRecord, sink: IO[bytes] | None, accept: Callable[[int, str | None], None]
) -> None:
    """Read ``record``'s remote file once, checked; the bytes are copied into ``sink`` (rewound) if given.

    A file object that knows its size up front (fsspec's remote files, from the HEAD sent when opening) and
    differs from the record is judged before any data is read.
    """
    display = loc.url_for(record.name)
    with loc.storage_errors("read", record.name):
        try:
            size, checksum = _read_remote(loc, record, sink)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{display} is listed in the manifest but missing") from e
        if (size, checksum) != (record.size, record.checksum):
            accept(size, checksum or None)  # raises unless the name's intent marker announces these bytes
            if not checksum:  # judged by the size alone: read the bytes the marker announces, and check them
                found = markers.read(loc, record.name)
                assert found is not None and found.record is not None
                with loc.fs.open(loc.path(record.name), "rb", block_size=REMOTE_READ_BLOCK) as again:
                    want = found.record
                    serialization.read_verified(
                        again, display, want.size, want.checksum, sink, REMOTE_READ_BLOCK
                    )
                return
        if sink is not None:
            sink.seek(0)


def _read_remote(loc: Location, record: CheckpointRecord, sink: IO[bytes] | None) -> tuple[int, str]:
    """Size and checksum of ``record``'s remote file, read once into ``sink``; ``""`` as the checksum when
    the size alone (from the HEAD) already differs from the record and nothing was read.

    S3: ranged GETs, several in flight, of the version the HEAD saw (see :mod:`.transfers`); an object
    replaced mid-read is read again, from its HEAD. Elsewhere: one sequential stream.
    """
    path = loc.path(record.name)
    if is_s3(loc.fs):
        for attempt in range(1, OBJECT_CHANGED_RETRIES + 1):
            info = loc.fs.info(path, refresh=True)
            if int(info["size"]) != record.size:
                return int(info["size"]), ""
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            try:
                return transfers.download(loc.fs, path, record.size, info["ETag"], sink)
            except transfers.ObjectChanged:
                if attempt == OBJECT_CHANGED_RETRIES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover
    with loc.fs.open(path, "rb", block_size=REMOTE_READ_BLOCK, cache_type="none") as f:
        known = getattr(f, "size", None)
        if isinstance(known, int) and known != record.size:
            return known, ""
        return serialization.checksum_stream(f, sink, REMOTE_READ_BLOCK)


def replacement_check(
    loc: Location, record: CheckpointRecord, display: str
) -> Callable[[int, str | None], None]:
    """What a load does when a listed file's bytes differ from its record: accept them if they are the new
    bytes its intent marker announces (a replacement in progress, or one a stopped writer did not commit),
    otherwise raise :class:`CheckpointCorruptError`. ``None`` as the checksum: only the size is known yet."""

    def accept(size: int, checksum: str | None) -> None:
        found = markers.read(loc, record.name)
        new = None if found is None else found.record
        if new is None or new.size != size or (checksum is not None and new.checksum != checksum):
            serialization.check(display, size, checksum, record.size, record.checksum)
            raise CheckpointCorruptError(display, "its bytes match neither its record nor its intent marker")

    return accept


def load_file(
    loc: Location,
    name: str,
    record: CheckpointRecord | None,
    *,
    map_location: MapLocation = "cpu",
    trusted: bool = False,
    serializer: Serializer | None = None,
    mmap: bool = False,
    replacements: bool = True,
) -> Any:
    """Load ``name`` in one pass, checked against ``record`` if given (see the module doc).

    ``replacements``: accept the new bytes an intent marker announces for ``record``'s name.

    Raises:
        FileNotFoundError, CheckpointCorruptError, UnsafeCheckpointError; ``OSError`` for a failure to read
        that is not damage (EIO, the network).
    """
    display = loc.url_for(name)
    kwargs: dict[str, Any] = {"map_location": map_location, "trusted": trusted, "serializer": serializer}

    def refuse(size: int, checksum: str | None) -> None:
        assert record is not None
        serialization.check(display, size, checksum, record.size, record.checksum)

    accept = replacement_check(loc, record, display) if record is not None and replacements else refuse
    if loc.local:
        try:
            return _load_local(loc.path(name), display, record, accept, mmap=mmap, **kwargs)
        except FileNotFoundError as e:
            listed = "is listed in the manifest but missing" if record is not None else "does not exist"
            raise FileNotFoundError(f"{display} {listed}") from e
    if record is not None:
        with serialization.spool(record.size) as buffer:
            fetch(loc, record.with_changes(name=name), buffer, accept)
            return load(buffer, display, mmap=False, **kwargs)
    with loc.storage_errors("read", name):
        try:
            f = loc.fs.open(loc.path(name), "rb")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{display} does not exist") from e
        with f:
            return load(f, display, mmap=False, **kwargs)
