"""StoreReader: the read side of a checkpoint directory: names, the manifest, verification and loading.

It never writes, removes or rewrites anything, so it needs no lock: it is what inspection (the CLI, an
evaluation loop, inference) uses on a directory another run is writing. A manifest that is missing or
unreadable is rebuilt *in memory*, with a warning; only the lock holder writes it back (see :mod:`.writers`).
:class:`~lightning_genesis_ckpt.store.CheckpointStore` adds the writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

from . import directory, loading, recovery, serialization, writers
from .atomicity import is_posix_local
from .backends import ObjectIO, object_io_for
from .errors import ManifestError, is_storage_client_error
from .manifest import Manifest
from .names import MANIFEST_NAME, intent_name, is_reserved
from .records import CheckpointRecord, Stamp
from .serialization import MapLocation, Serializer

log = logging.getLogger(__name__)

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

    #: Whether a missing manifest next to checkpoint-like files means "rebuild it from them" (a checkpoint
    #: directory) rather than "no records yet" (any directory of the user's, see ``genesis.save``).
    rebuilds = True
    #: Whether a rebuild also adopts files of the original Genesis utility under our standard names (files
    #: with no record of their own), as ``CheckpointManager`` does for a directory that utility wrote.
    adopts_standard_names = False

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
        self.objects: ObjectIO = object_io_for(self.fs)
        self._lock = threading.RLock()
        self._manifest: Manifest | None = None

    @property
    def identity(self) -> tuple[Any, ...]:
        """What names this directory for the writers of this process (see :mod:`.writers`)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if self.local:
            import os

            return ("file", os.path.realpath(self.root))
        endpoint = self.fs.storage_options.get("endpoint_url") or (
            self.fs.storage_options.get("client_kwargs") or {}
        ).get("endpoint_url")
        return (protocol, self.root, endpoint)

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

    def name_of(self, path: str) -> str | None:
        """The name in this directory that ``path`` (a local path or a URL, as Lightning passes it) names, if
        it names one."""
        name = path.rstrip("/").rsplit("/", 1)[-1]
        try:
            mine = self.path(name)
        except ValueError:
            return None
        if self.local and "://" not in path:
            import os

            return name if os.path.realpath(path) == os.path.realpath(mine) else None
        return name if self.fs._strip_protocol(path).rstrip("/") == mine else None

    @property
    def manifest_path(self) -> str:
        return self.path(MANIFEST_NAME)

    # -------------------------------------------------------------------------------- what is there
    def list_names(self) -> list[str]:
        """Every name in the directory, sorted, from a fresh listing (none is cached)."""
        # s3fs would otherwise answer later existence and size questions from this snapshot (its dircache)
        # instead of from the store as it is then.
        with self.storage_errors("list"):
            try:
                entries = self.fs.ls(self.root, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            finally:
                self.fs.invalidate_cache(self.root)
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def list_entries(self) -> dict[str, bool]:
        """Every name in the directory and whether it is a directory, from one fresh listing."""
        with self.storage_errors("list"):
            try:
                entries = self.fs.ls(self.root, detail=True, refresh=True)
            except FileNotFoundError:
                return {}
            finally:
                self.fs.invalidate_cache(self.root)
        out = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e.get("type") == "directory" for e in entries}
        return dict(sorted(out.items()))

    def exists(self, name: str) -> bool:
        """Whether anything (file or directory) is there under ``name``."""
        with self.storage_errors("look up", name):
            return bool(self.fs.exists(self.path(name)))

    def is_directory(self) -> bool:
        """Whether the store's directory itself exists (an object store: whether any key is under it)."""
        with self.storage_errors("look up"):
            return bool(self.fs.isdir(self.root))

    def size(self, name: str) -> int:
        """The size in bytes of the file ``name``."""
        with self.storage_errors("look up", name):
            return int(self.fs.size(self.path(name)))

    def checksum(self, name: str) -> Stamp:
        """Size and crc32 of the file ``name`` as it is now (reads it)."""
        with self.storage_errors("read", name), self.fs.open(self.path(name), "rb") as f:
            return Stamp(*serialization.checksum_stream(f))

    def read_small(self, name: str) -> bytes | None:
        """The bytes of a small file (a marker, a directory's record), or None if it is not there."""
        with self.storage_errors("read", name):
            try:
                return bytes(self.fs.cat_file(self.path(name)))
            except FileNotFoundError:
                return None

    @contextlib.contextmanager
    def storage_errors(self, what: str, name: str | None = None) -> Any:
        """Turn an object-store client's own exception (botocore...) into an ``OSError`` naming the URL."""
        try:
            yield
        except Exception as e:
            if isinstance(e, OSError) or not is_storage_client_error(e):
                raise
            where = self.url if name is None else self.url_for(name)
            raise OSError(f"could not {what} {where}: {type(e).__name__}: {e}") from e

    # -------------------------------------------------------------------------------------- manifest
    def manifest(self, refresh: bool = False) -> Manifest:
        """The current manifest. Rebuilt from the files in memory, with a warning, if missing or unreadable.

        In a process whose store holds the directory's lock, it is the manifest as that holder last
        committed it: always current, since every writer of the process goes through the holder.

        Raises:
            ManifestError: the manifest was written by a newer format version.
            OSError: the directory cannot be read (permissions, network): never mistaken for "empty".
        """
        holder = writers.holder_of(self)
        if holder is not None and holder.manifest is not None:
            return holder.manifest
        with self._lock:
            if self._manifest is None or refresh:
                self._manifest = self.read_manifest()[0]
            return self._manifest

    def read_manifest(self) -> tuple[Manifest, Any, bool]:
        """The manifest as the store holds it now, its version tag (None: no manifest file), and whether it
        was rebuilt or settled here (so a holder must write it back)."""
        with self.storage_errors("read"):
            found = self.objects.read(self.manifest_path)
        display = self.url_for(MANIFEST_NAME)
        if found is None:
            if not self.rebuilds or not any(not is_reserved(n) for n in self.list_names()):
                return Manifest(), None, False
            log.warning("manifest %s is missing; rebuilding it from the checkpoint files", display)
            return recovery.rebuild(self), None, True
        try:
            manifest = Manifest.decode(found.data, display)
        except ManifestError as e:
            if e.newer_format or not self.rebuilds:
                raise
            log.warning("%s; rebuilding it from the checkpoint files", e)
            return recovery.rebuild(self), found.tag, True
        if manifest.replacing:
            return recovery.settle_legacy_replacements(self, manifest), found.tag, True
        return manifest, found.tag, False

    def records(self) -> list[CheckpointRecord]:
        """All committed checkpoints, oldest commit first."""
        return self.manifest().sorted()

    # ------------------------------------------------------------------------------------- reading
    def _listed(self, name: str) -> CheckpointRecord:
        record = self.manifest().get(name)
        if record is None:
            raise FileNotFoundError(f"{self.url_for(name)} is not a committed checkpoint of this store")
        return record

    def marker_record(self, name: str) -> CheckpointRecord | None:
        """The record announced by ``name``'s intent marker: the new bytes of a replacement in progress."""
        data = self.read_small(intent_name(name))
        if not data:
            return None
        try:
            return CheckpointRecord.from_json(json.loads(data)["record"])
        except (ValueError, KeyError, TypeError):
            return None

    def _accept_replacement(self, record: CheckpointRecord) -> Any:
        """``expected`` for a load: new bytes that match the name's intent marker are a replacement in
        progress (or one whose writer stopped before committing it), complete and verified."""

        def check(size: int, checksum: str) -> None:
            new = self.marker_record(record.name)
            if new is None or (new.size, new.checksum) != (size, checksum):
                serialization.check(self.url_for(record.name), size, checksum, record.size, record.checksum)

        return check

    def verify(self, name: str) -> CheckpointRecord:
        """Check that ``name`` is committed and its bytes match the manifest's size and checksum.

        Raises:
            FileNotFoundError: not committed, or listed but the file is gone.
            CheckpointCorruptError: size or checksum differ from the manifest.
        """
        record = self._listed(name)
        if record.is_directory:
            directory.verify(self, record)  # every file, and no file it does not list
            return record
        self._fetch(record, None)
        return record

    def _fetch(self, record: CheckpointRecord, sink: IO[bytes] | None) -> None:
        """Read ``record``'s file once, checked; the bytes are copied into ``sink`` (rewound) if given."""
        display = self.url_for(record.name)
        with self.storage_errors("read", record.name):
            try:
                f = self.fs.open(
                    self.path(record.name), "rb", block_size=loading.REMOTE_READ_BLOCK, cache_type="none"
                )
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{display} is listed in the manifest but missing") from e
            with f:
                size, checksum = loading.read_verified(f, display, record, sink)
            if (size, checksum) == (record.size, record.checksum):
                return
            new = self.marker_record(record.name)
            if new is None or new.size != size:
                serialization.check(display, size, checksum or None, record.size, record.checksum)
                raise AssertionError("unreachable")
            if sink is not None:
                sink.seek(0)
                sink.truncate()
            with self.fs.open(self.path(record.name), "rb", block_size=loading.REMOTE_READ_BLOCK) as f:
                serialization.read_verified(
                    f, display, new.size, new.checksum, sink, loading.REMOTE_READ_BLOCK
                )

    def load(
        self,
        name: str,
        *,
        map_location: MapLocation = "cpu",
        trusted: bool = False,
        verify: bool = True,
        serializer: Serializer | None = None,
        mmap: bool = False,
        expect: CheckpointRecord | None = None,
    ) -> Any:
        """Load checkpoint ``name`` in one verified pass (``verify=True`` and the manifest lists it).

        ``expect``: check the file against this record instead of ``name``'s own (a backup of it).

        With ``mmap=True`` a local file's tensors are memory-mapped instead of read into process memory
        (``torch.load(mmap=True)``): faster, and the pages are page cache the kernel can reclaim. Safe with
        this store because a committed file is never modified in place (a new save is a new file renamed
        over it). Ignored on remote filesystems and for legacy-format files.

        Raises:
            FileNotFoundError, CheckpointCorruptError, UnsafeCheckpointError; ``OSError`` for a failure to
            read that is not damage (EIO, the network).
        """
        start = time.perf_counter()
        record = expect if expect is not None else self.manifest().get(name) if verify else None
        if record is not None and record.is_directory:
            raise IsADirectoryError(
                f"{self.url_for(name)} is a directory checkpoint (written by a sharded strategy): get a verified "
                "local path with local_copy() and load it with the strategy that wrote it"
            )
        display = self.url_for(name)
        kwargs = {"map_location": map_location, "trusted": trusted, "serializer": serializer}
        if self.local:
            try:
                obj = loading.load_local(
                    self.path(name),
                    display,
                    record,
                    mmap=mmap,
                    expected=None
                    if record is None or expect is not None
                    else self._accept_replacement(record),
                    **kwargs,
                )
            except FileNotFoundError as e:
                listed = "is listed in the manifest but missing" if record is not None else "does not exist"
                raise FileNotFoundError(f"{display} {listed}") from e
        elif record is not None:
            with serialization.spool(record.size) as buffer:
                self._fetch(record if expect is None else record.with_changes(name=name), buffer)
                obj = loading.load(buffer, display, mmap=False, **kwargs)
        else:
            with self.storage_errors("read", name):
                try:
                    f = self.fs.open(self.path(name), "rb")
                except FileNotFoundError as e:
                    raise FileNotFoundError(f"{display} does not exist") from e
                with f:
                    obj = loading.load(f, display, mmap=False, **kwargs)
        elapsed = time.perf_counter() - start
        # Quick loads stay quiet (resume already says what it loaded); a slow one says what is taking time.
        level = logging.INFO if self.verbose and elapsed >= SLOW_LOAD_S else logging.DEBUG
        if log.isEnabledFor(level):
            size = record.size if record is not None else None
            log.log(level, "loaded %s (%s)", display, transfer_summary(size, elapsed))
        return obj

    def local_copy(self, name: str) -> contextlib.AbstractContextManager[str]:
        """Context manager giving a verified local path of the directory checkpoint ``name``.

        On a local disk that is the committed directory itself; on an object store a temporary download,
        removed when the block ends (one full download, and that much local disk). See
        :func:`.directory.local_copy`.
        """
        return directory.local_copy(self, name)
