"""StoreReader: the read side of a checkpoint directory: names, the manifest, verification and loading.

It never writes, so it needs no lock and is what inspection (the CLI, inference loading) can use on a
directory another run is writing. :class:`~lightning_genesis_ckpt.store.CheckpointStore` adds the writes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

from . import directory, recovery, serialization
from .atomicity import is_posix_local, is_temp_name
from .errors import ManifestError
from .manifest import LOCK_NAME, MANIFEST_NAME, CheckpointRecord, Manifest
from .serialization import MapLocation, Serializer

log = logging.getLogger(__name__)

#: Bytes per ranged GET when reading from a remote filesystem: a checkpoint of up to this size is one
#: request, and a chunk in flight is no memory concern.
REMOTE_READ_BLOCK = 64 * 2**20

#: A load that takes at least this long gets an info line with its size and speed.
SLOW_LOAD_S = 2.0


def human_size(n: float) -> str:
    """A byte count for log lines: ``46.8 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def transfer_summary(size: int | None, elapsed: float) -> str:
    """``"46.8 MiB in 0.31s, 151 MiB/s"`` for log lines; without a size, just the time."""
    if size is None:
        return f"in {elapsed:.2f}s"
    speed = f"{size / elapsed / 2**20:.0f} MiB/s" if elapsed > 0 else "-"
    return f"{human_size(size)} in {elapsed:.2f}s, {speed}"


class StoreReader:
    """Read access to a checkpoint directory on any fsspec URL (local path, ``file://``, ``memory://``, ``s3://``).

    Args:
        url: the directory.
        storage_options: passed unchanged to fsspec (credentials, endpoint). Never written anywhere.
        verbose: log one info line per save and per load.

    The manifest (``genesis_manifest.json``) is the source of truth: a checkpoint is committed once its
    data is complete and the manifest lists it.
    """

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, verbose: bool = True
    ) -> None:
        url = str(url)
        if not url.strip():
            raise ValueError("checkpoint directory must be a non-empty path or URL")
        self.fs: AbstractFileSystem
        # A filesystem instance of our own: fsspec transactions (how remote writes commit) are per instance.
        self.fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **dict(storage_options or {}))
        self.root: str = root.rstrip("/") or "/"
        self.url = url.rstrip("/") or url
        self.verbose = verbose
        self.local = is_posix_local(self.fs)
        self._lock = threading.RLock()
        self._manifest: Manifest | None = None

    # ----------------------------------------------------------------------------------------- names
    def path(self, name: str) -> str:
        """The filesystem path of ``name``; refuses any name that could leave the directory."""
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
            raise ValueError(
                f"invalid checkpoint file name {name!r}: it must be a plain file name inside {self.url!r}"
            )
        return f"{self.root}/{name}" if self.root != "/" else f"/{name}"

    def url_for(self, name: str) -> str:
        """The path or URL of ``name`` as a user would pass it back (protocol kept, local paths plain)."""
        path = self.path(name)
        return path if self.local else self.fs.unstrip_protocol(path)

    def _list_names(self) -> list[str]:
        # A fresh listing, and none kept: s3fs would otherwise answer later existence and size questions
        # from this snapshot (its dircache) instead of from the store as it is then.
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(self.root)
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    # -------------------------------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> str:
        return self.path(MANIFEST_NAME)

    def manifest(self, refresh: bool = False) -> Manifest:
        """The current manifest (cached). Rebuilt from the files, with a warning, if missing or unreadable.

        Raises:
            ManifestError: the manifest was written by a newer format version.
            OSError: the directory cannot be read (permissions, network): never mistaken for "empty".
        """
        with self._lock:
            if self._manifest is None or refresh:
                self._manifest = self._read_manifest()
            return self._manifest

    def _read_manifest(self) -> Manifest:
        try:
            with self.fs.open(self.manifest_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if not any(self._maybe_checkpoint(n) for n in self._list_names()):
                return Manifest()
            log.warning(
                "manifest %s is missing; rebuilding it from the checkpoint files", self.url_for(MANIFEST_NAME)
            )
            return self.rebuild_manifest()
        try:
            manifest = Manifest.decode(data, self.url_for(MANIFEST_NAME))
        except ManifestError as e:
            if e.newer_format:
                raise
            log.warning("%s; rebuilding it from the checkpoint files", e)
            return self.rebuild_manifest()
        return recovery.settle_replacements(self, manifest) if manifest.replacing else manifest

    @staticmethod
    def _maybe_checkpoint(name: str) -> bool:
        return name not in (MANIFEST_NAME, LOCK_NAME) and not is_temp_name(name)

    def rebuild_manifest(self) -> Manifest:
        """Recovery path: a manifest made from the metadata each checkpoint file carries.

        Files without our metadata (other tools' files, user files) are left out and never touched.
        """
        return recovery.rebuild(self)

    # ------------------------------------------------------------------------------------ reading
    def records(self) -> list[CheckpointRecord]:
        """All committed checkpoints, oldest commit first."""
        return self.manifest().sorted()

    def _checksum(self, name: str) -> tuple[int, str]:
        with self.fs.open(self.path(name), "rb") as f:
            return serialization.checksum_stream(f)

    def verify(self, name: str) -> CheckpointRecord:
        """Check that ``name`` is committed and its bytes match the manifest's size and checksum.

        Raises:
            FileNotFoundError: not committed, or listed but the file is gone.
            CheckpointCorruptError: size or checksum differ from the manifest.
        """
        record = self.manifest().get(name)
        if record is None:
            raise FileNotFoundError(f"{self.url_for(name)} is not a committed checkpoint of this store")
        if record.is_directory:
            directory.verify(self, record)  # every file, and no file it does not list
            return record
        if not self.local:
            self._fetch_verified(record, None)
            return record
        try:
            size, checksum = self._checksum(name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.url_for(name)} is listed in the manifest but missing") from e
        serialization.check(self.url_for(name), size, checksum, record.size, record.checksum)
        return record

    def _fetch_verified(self, record: CheckpointRecord, sink: IO[bytes] | None) -> None:
        """Remote read in one pass, checked against ``record``; the bytes are copied into ``sink`` if given.

        Each byte crosses the network once (a verify pass and then a load pass would read it twice), and
        what is loaded from ``sink`` is exactly what was verified.
        """
        display = self.url_for(record.name)
        try:
            f = self.fs.open(self.path(record.name), "rb", block_size=REMOTE_READ_BLOCK, cache_type="none")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{display} is listed in the manifest but missing") from e
        with f:
            serialization.read_verified(f, display, record.size, record.checksum, sink, REMOTE_READ_BLOCK)

    def load(
        self,
        name: str,
        *,
        map_location: MapLocation = "cpu",
        trusted: bool = False,
        verify: bool = True,
        serializer: Serializer | None = None,
        mmap: bool = False,
    ) -> Any:
        """Load checkpoint ``name``, checksum-verified first when the manifest lists it (``verify=True``).

        With ``mmap=True`` a local file's tensors are memory-mapped instead of read into process memory
        (``torch.load(mmap=True)``): faster, and the pages are page cache the kernel can reclaim. Safe with
        this store because a committed file is never modified in place (a new save is a new file renamed
        over it). Ignored on remote filesystems.

        Raises:
            FileNotFoundError, CheckpointCorruptError, UnsafeCheckpointError.
        """
        start = time.perf_counter()
        record = self.manifest().get(name) if verify else None
        if record is not None and record.is_directory:
            raise IsADirectoryError(
                f"{self.url_for(name)} is a directory checkpoint (written by a sharded strategy): get a verified "
                "local path with local_copy() and load it with the strategy that wrote it"
            )
        if record is not None and not self.local:
            with serialization.spool(record.size) as buffer:
                self._fetch_verified(record, buffer)
                obj = serialization.load(
                    buffer,
                    self.url_for(name),
                    map_location=map_location,
                    trusted=trusted,
                    serializer=serializer,
                )
        else:
            if record is not None:
                self.verify(name)
            obj = self._load_raw(
                name,
                map_location=map_location,
                trusted=trusted,
                serializer=serializer,
                mmap=mmap and self.local,
            )
        elapsed = time.perf_counter() - start
        # Quick loads stay quiet (resume already says what it loaded); a slow one says what is taking time.
        level = logging.INFO if self.verbose and elapsed >= SLOW_LOAD_S else logging.DEBUG
        if log.isEnabledFor(level):
            size = record.size if record is not None else None
            log.log(level, "loaded %s (%s)", self.url_for(name), transfer_summary(size, elapsed))
        return obj

    def local_copy(self, name: str) -> contextlib.AbstractContextManager[str]:
        """Context manager giving a verified local path of the directory checkpoint ``name``.

        On a local disk that is the committed directory itself; on an object store a temporary download,
        removed when the block ends (one full download, and that much local disk). See
        :func:`.directory.local_copy`.
        """
        return directory.local_copy(self, name)

    def _load_raw(
        self,
        name: str,
        *,
        map_location: MapLocation,
        trusted: bool,
        serializer: Serializer | None = None,
        mmap: bool = False,
    ) -> Any:
        path = self.path(name)
        display = self.url_for(name)
        if self.local:
            # torch reads a local path through its own C++ reader, faster than a Python file object.
            if not self.fs.exists(path):
                raise FileNotFoundError(display)
            return serialization.load(
                path, display, map_location=map_location, trusted=trusted, serializer=serializer, mmap=mmap
            )
        f: IO[bytes]
        with self.fs.open(path, "rb") as f:
            return serialization.load(
                f, display, map_location=map_location, trusted=trusted, serializer=serializer
            )
