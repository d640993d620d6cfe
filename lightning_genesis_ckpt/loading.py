"""Loads in one verified pass: what is loaded is exactly what was checksummed, and only damage is "corrupt".

* **Local disks**: the file is opened once; the checksum is computed through that descriptor, and torch loads
  from the same inode through ``/proc/self/fd/<n>`` (memory-mapped when asked and the file is a zip
  archive), so a file renamed over the name in between changes nothing. The checksum pass leaves the pages
  in the page cache, where the load (or the mapping) finds them.
* **Remote files** are read once, into a spool (memory up to ``SPOOL_IN_MEMORY``, a local temporary file
  above), checked while they stream, and loaded from the spool.
* **Legacy (non-zip) torch files** are loaded without mmap, which torch supports only for zip archives.

A failed load is :class:`~.errors.CheckpointCorruptError` only on positive evidence of damage: a size or
checksum that differs from the record, or a file whose structure is broken (not a zip archive or a pickle,
a zip without a pickle in it, a pickle that does not parse). Anything else (``MemoryError``, ``EIO``, CUDA out
of memory under ``map_location``, an error of the caller's ``map_location``) is raised as itself, so that
resume never skips a healthy checkpoint because of it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickletools
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import torch

from . import serialization
from .errors import CheckpointCorruptError, UnsafeCheckpointError
from .records import CheckpointRecord
from .serialization import READ_CHUNK, ZIP_MAGIC, MapLocation, Serializer

#: Bytes per ranged GET when reading from a remote filesystem: a checkpoint of up to this size is one
#: request, and a chunk in flight is no memory concern.
REMOTE_READ_BLOCK = 64 * 2**20

_PROC_FD = "/proc/self/fd"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def structure_damage(f: IO[bytes]) -> str | None:
    """Why ``f`` cannot be a torch checkpoint (the file's structure is broken), or None if it could be.

    Reads the file but never unpickles anything: zip archives are checked member by member (CRC included) and
    pickles are parsed opcode by opcode.
    """
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
    return isinstance(error, (MemoryError, OSError, torch.OutOfMemoryError)) and not isinstance(
        error, CheckpointCorruptError
    )


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


def load_local(
    path: str,
    display: str,
    record: CheckpointRecord | None,
    *,
    map_location: MapLocation,
    trusted: bool,
    serializer: Serializer | None,
    mmap: bool,
    expected: Any = None,
) -> Any:
    """Load a local file in one pass, checked against ``record`` first if given (see the module doc).

    ``expected`` is called with the size and checksum found when they differ from the record; it returns the
    record they do match (an interrupted replacement's new bytes) or raises.

    Raises:
        FileNotFoundError, CheckpointCorruptError, UnsafeCheckpointError.
    """
    with open(path, "rb", buffering=0) as f:
        if record is not None:
            size, checksum = serialization.checksum_stream(f, chunk_size=READ_CHUNK)
            if (size, checksum) != (record.size, record.checksum):
                if expected is None:
                    serialization.check(display, size, checksum, record.size, record.checksum)
                expected(size, checksum)
        f.seek(0)
        head = f.read(4)
        f.seek(0)
        same_inode = f"{_PROC_FD}/{f.fileno()}"
        if os.path.exists(same_inode):
            return load(
                same_inode,
                display,
                map_location=map_location,
                trusted=trusted,
                serializer=serializer,
                mmap=mmap and head == ZIP_MAGIC,
            )
        # No /proc (macOS): load through the descriptor itself, without mmap (torch maps paths only).
        return load(f, display, map_location=map_location, trusted=trusted, serializer=serializer, mmap=False)


def read_verified(
    f: IO[bytes], display: str, record: CheckpointRecord, sink: IO[bytes] | None
) -> tuple[int, str]:
    """Read ``f`` to its end once, copying it into ``sink``; returns its size and checksum.

    A file object that knows its size up front (fsspec's remote files, from the HEAD sent when opening) that
    differs from the record is reported before any data is read (the caller decides what a mismatch means).
    """
    known = getattr(f, "size", None)
    if isinstance(known, int) and known != record.size:
        return known, ""
    size, checksum = serialization.checksum_stream(f, sink, REMOTE_READ_BLOCK)
    if sink is not None:
        sink.seek(0)
    return size, checksum
