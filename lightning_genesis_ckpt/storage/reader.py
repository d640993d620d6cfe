"""StoreReader: the read side of a checkpoint directory: the manifest, verification and loading.

It never writes, removes or rewrites anything, so it needs no lock: it is what inspection (the CLI, an
evaluation loop, inference) uses on a directory another run is writing. A manifest that is missing or
unreadable is rebuilt *in memory*, with a warning; only the lock holder writes it back (see :mod:`.writers`).
:class:`~lightning_genesis_ckpt.storage.store.CheckpointStore` adds the writes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem

from ..core.display import transfer_summary
from ..core.manifest import Manifest
from ..core.records import CheckpointRecord, Stamp
from . import directory, loading, manifests, progress, writers
from .location import Conduct, Location
from .serialization import MapLocation, Serializer

log = logging.getLogger(__name__)

#: A load that takes at least this long gets an info line with its size and speed.
SLOW_LOAD_S = 2.0


class StoreReader:
    """Read access to a checkpoint directory on any fsspec URL (local path, ``file://``, ``memory://``, ``s3://``).

    Args:
        url: the directory.
        storage_options: passed unchanged to fsspec (credentials, endpoint). Never written anywhere.
        verbose: log one info line per save and per load.

    The manifest (``genesis_manifest.json``) is the source of truth: a checkpoint is committed once its
    data is complete and the manifest lists it.
    """

    #: How this kind of directory is treated (see :class:`.Conduct`): a checkpoint directory by default.
    conduct = Conduct()

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, verbose: bool = True
    ) -> None:
        self.loc = Location(url, storage_options, type(self).conduct, verbose=verbose)
        self._lock = threading.RLock()
        self._manifest: Manifest | None = None

    # ------------------------------------------------------------------------------ the directory
    @property
    def url(self) -> str:
        """The directory's path or URL, as given."""
        return self.loc.url

    @property
    def root(self) -> str:
        """The directory's path on its filesystem."""
        return self.loc.root

    @property
    def local(self) -> bool:
        """Whether the directory is on a local POSIX disk."""
        return self.loc.local

    @property
    def fs(self) -> AbstractFileSystem:
        """The directory's fsspec filesystem (for tests and tools that look behind the store's back)."""
        return self.loc.fs

    @property
    def verbose(self) -> bool:
        return self.loc.verbose

    @verbose.setter
    def verbose(self, value: bool) -> None:
        self.loc.verbose = value

    def path(self, name: str) -> str:
        """The filesystem path of ``name``; refuses any name that could leave the directory."""
        return self.loc.path(name)

    def url_for(self, name: str) -> str:
        """The path or URL of ``name`` as a user would pass it back (protocol kept, local paths plain)."""
        return self.loc.url_for(name)

    def name_of(self, path: str) -> str | None:
        """The name in this directory that ``path`` (a local path or a URL, as Lightning passes it) names."""
        return self.loc.name_of(path)

    @property
    def manifest_path(self) -> str:
        return self.loc.manifest_path

    def list_names(self) -> list[str]:
        """Every name in the directory, sorted, from a fresh listing."""
        return self.loc.list_names()

    def exists(self, name: str) -> bool:
        """Whether anything (file or directory) is there under ``name``."""
        return self.loc.exists(name)

    def is_directory(self) -> bool:
        """Whether the store's directory itself exists (an object store: whether any key is under it)."""
        return self.loc.is_directory()

    def size(self, name: str) -> int:
        """The size in bytes of the file ``name``."""
        return self.loc.size(name)

    def checksum(self, name: str) -> Stamp:
        """Size and crc32 of the file ``name`` as it is now (reads it)."""
        return self.loc.checksum(name)

    # -------------------------------------------------------------------------------------- manifest
    def manifest(self, refresh: bool = False) -> Manifest:
        """The current manifest. Rebuilt from the files in memory, with a warning, if missing or unreadable.

        In a process whose store holds the directory's lock, it is the manifest as that holder last
        committed it: always current, since every writer of the process goes through the holder.

        Raises:
            ManifestError: the manifest was written by a newer format version.
            OSError: the directory cannot be read (permissions, network): never mistaken for "empty".
        """
        holder = writers.holder_of(self.loc)
        if holder is not None and holder.manifest is not None:
            return holder.manifest
        with self._lock:
            if self._manifest is None or refresh:
                self._manifest = manifests.read_manifest(self.loc)[0]
            return self._manifest

    def records(self) -> list[CheckpointRecord]:
        """All committed checkpoints, oldest commit first."""
        return self.manifest().sorted()

    # ------------------------------------------------------------------------------------- reading
    def _listed(self, name: str) -> CheckpointRecord:
        record = self.manifest().get(name)
        if record is None:
            raise FileNotFoundError(f"{self.url_for(name)} is not a committed checkpoint of this store")
        return record

    def verify(self, name: str) -> CheckpointRecord:
        """Check that ``name`` is committed and its bytes match the manifest's size and checksum.

        Raises:
            FileNotFoundError: not committed, or listed but the file is gone.
            CheckpointCorruptError: size or checksum differ from the manifest.
        """
        record = self._listed(name)
        if record.is_directory:
            # Every file, and no file it does not list (or the new tree its intent marker announces).
            return directory.verify_current(self.loc, record)
        display = self.url_for(name)
        loading.fetch(self.loc, record, None, loading.replacement_check(self.loc, record, display))
        return record

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

        With ``mmap=True`` a local file's tensors are memory-mapped instead of read into process memory
        (``torch.load(mmap=True)``): faster, and the pages are page cache the kernel can reclaim. Safe with
        this store because a committed file is never modified in place (a new save is a new file renamed
        over it). Ignored on remote filesystems and for legacy-format files.

        ``expect``: check the file against this record instead of ``name``'s own (a backup of it).

        Raises:
            FileNotFoundError: ``name`` does not exist.
            CheckpointCorruptError: the file is damaged or disagrees with its record.
            UnsafeCheckpointError: the file needs full pickle and the store is not ``trusted``.
            OSError: a failure to read that is not damage (EIO, the network).
        """
        start = time.perf_counter()
        record = expect if expect is not None else self.manifest().get(name) if verify else None
        if record is not None and record.is_directory:
            raise IsADirectoryError(
                f"{self.url_for(name)} is a directory checkpoint (written by a sharded strategy): get a verified "
                "local path with local_copy() and load it with the strategy that wrote it"
            )
        size = record.size if record is not None else None
        with progress.transfer("loading", self.url_for(name), total=size, enabled=self.verbose):
            obj = loading.load_file(
                self.loc,
                name,
                record,
                map_location=map_location,
                trusted=trusted,
                serializer=serializer,
                mmap=mmap,
                replacements=expect is None,
            )
        elapsed = time.perf_counter() - start
        # Quick loads stay quiet (resume already says what it loaded); a slow one says what is taking time.
        level = logging.INFO if self.verbose and elapsed >= SLOW_LOAD_S else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "loaded %s (%s)", self.url_for(name), transfer_summary(size, elapsed))
        return obj

    def local_copy(self, name: str) -> contextlib.AbstractContextManager[str]:
        """Context manager giving a verified local path of the directory checkpoint ``name``.

        On a local disk that is the committed directory itself; on an object store a temporary download,
        removed when the block ends (one full download, and that much local disk). See
        :func:`.directory.local_copy`.

        Raises:
            FileNotFoundError: ``name`` is not committed, or a file is missing.
            IsADirectoryError: ``name`` is a single-file checkpoint (load it with ``load``).
            CheckpointCorruptError: a file is damaged.
        """
        record = self._listed(name)
        if record.files is None:
            raise IsADirectoryError(
                f"{self.url_for(name)} is a single-file checkpoint, not a directory: load it with load()"
            )
        return directory.local_copy(self.loc, record)
