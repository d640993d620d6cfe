"""CheckpointStore: a directory on any fsspec filesystem, with a manifest, atomic commits and checksums.

All I/O on a checkpoint directory goes through this class. It knows nothing about Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

from . import serialization
from .atomicity import CommitStrategy, is_posix_local, is_temp_name, strategy_for, temp_name
from .errors import CheckpointCorruptError, ManifestError, UnsafeCheckpointError
from .manifest import MANIFEST_NAME, CheckpointRecord, Manifest, role_of_name
from .serialization import MapLocation, Serializer

log = logging.getLogger(__name__)

#: Key under which each checkpoint written by the store carries its own record fields, so that a lost
#: manifest can be rebuilt from the files alone.
METADATA_KEY = "genesis_ckpt"


def library_versions() -> dict[str, str]:
    """Versions of this library, torch and Lightning, as recorded with every checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"torch": str(torch.__version__)}
    for dist, key in (
        ("lightning-genesis-ckpt", "lightning_genesis_ckpt"),
        ("pytorch-lightning", "lightning"),
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[key] = version(dist)
    return out


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


class CheckpointStore:
    """A checkpoint directory on any fsspec URL (local path, ``file://``, ``memory://``, ``s3://`` ...).

    Args:
        url: the directory. Created on first write.
        storage_options: passed unchanged to fsspec (credentials, endpoint). Never written anywhere.
        verbose: log one info line per save and per load.

    The manifest (``genesis_manifest.json``) is the source of truth; a checkpoint is committed once its
    data is complete and the manifest lists it. See :mod:`lightning_genesis_ckpt.atomicity` for how each
    filesystem commits.
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
        self.commit: CommitStrategy = strategy_for(self.fs)
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

    # ------------------------------------------------------------------------------------- lifecycle
    def ensure_writable(self) -> None:
        """Create the directory and prove a file can be committed there; raise naming the path if not."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            probe = self.path(temp_name("write-probe"))
            with self.commit.open_write(probe) as f:
                f.write(b"ok")
            self.fs.rm_file(probe)
        except OSError as e:
            raise type(e)(
                f"checkpoint directory {self.url!r} is not writable ({e.strerror or e}); "
                "choose a directory you can write to or fix its permissions"
            ) from e

    def sweep_temp(self) -> list[str]:
        """Remove leftover temporary files of killed writers (only names matching our temp pattern)."""
        swept = []
        for name in self._list_names():
            if is_temp_name(name):
                try:
                    self.fs.rm_file(self.path(name))
                    swept.append(name)
                except OSError as e:
                    log.warning("could not remove stale temporary file %s: %s", self.url_for(name), e)
        if swept:
            log.info("swept %d stale temporary file(s) in %s", len(swept), self.url)
        return swept

    def _list_names(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
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
            return Manifest.decode(data, self.url_for(MANIFEST_NAME))
        except ManifestError as e:
            if e.newer_format:
                raise
            log.warning("%s; rebuilding it from the checkpoint files", e)
            return self.rebuild_manifest()

    @staticmethod
    def _maybe_checkpoint(name: str) -> bool:
        return name != MANIFEST_NAME and not is_temp_name(name)

    def rebuild_manifest(self) -> Manifest:
        """Recovery path: a manifest made from the metadata each checkpoint file carries.

        Files without our metadata (other tools' files, user files) are left out and never touched.
        """
        manifest = Manifest()
        found: list[CheckpointRecord] = []
        for name in self._list_names():
            if not self._maybe_checkpoint(name):
                continue
            try:
                size, checksum = self._checksum(name)
                obj = self._load_raw(name, map_location="cpu", trusted=False)
            except (OSError, CheckpointCorruptError, UnsafeCheckpointError) as e:
                log.warning("rebuilding manifest: skipping %s (%s)", self.url_for(name), e)
                continue
            meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
            if not isinstance(meta, dict):
                continue
            found.append(
                CheckpointRecord(
                    name=name,
                    role=role_of_name(name, default=str(meta.get("role", "manual"))),
                    size=size,
                    checksum=checksum,
                    created=float(meta.get("created", 0.0)),
                    seq=0,
                    epoch=meta.get("epoch"),
                    global_step=meta.get("global_step"),
                    metrics={str(k): float(v) for k, v in dict(meta.get("metrics") or {}).items()},
                    versions={str(k): str(v) for k, v in dict(meta.get("versions") or {}).items()},
                    monitor=meta.get("monitor"),
                )
            )
        # Commit order is not recoverable from files; creation time (stored inside each file, not the
        # filesystem's mtime) is the best substitute.
        for seq, rec in enumerate(sorted(found, key=lambda r: (r.created, r.name)), start=1):
            manifest = manifest.with_record(rec.with_changes(seq=seq))
        return manifest

    def _write_manifest(self, manifest: Manifest) -> None:
        with self.commit.open_write(self.manifest_path) as f:
            f.write(manifest.encode())
        self._manifest = manifest

    # ------------------------------------------------------------------------------------ writing
    def save(
        self,
        name: str,
        obj: Any,
        *,
        role: str | None = None,
        epoch: int | None = None,
        global_step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        monitor: str | None = None,
        serializer: Serializer = "torch",
        embed_metadata: bool = True,
    ) -> CheckpointRecord:
        """Serialize ``obj`` into ``name`` and commit it: data first, then the manifest.

        With ``embed_metadata`` and a dict ``obj``, the record's fields travel inside the file too (under
        ``"genesis_ckpt"``), so the manifest can be rebuilt from the files. The caller's dict is not changed.

        Raises:
            OSError: the write failed (disk full, permissions, network). Nothing committed was touched and
                the temporary file is gone.
        """
        if name == MANIFEST_NAME or is_temp_name(name):
            raise ValueError(f"{name!r} is reserved for the store's own files; choose another name")
        role = role or role_of_name(name)
        path = self.path(name)
        versions = library_versions()
        created = time.time()
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        if embed_metadata and isinstance(obj, dict):
            meta = {
                "role": role,
                "epoch": epoch,
                "global_step": global_step,
                "metrics": metrics,
                "monitor": monitor,
                "created": created,
                "versions": versions,
            }
            obj = {**obj, METADATA_KEY: meta}
        start = time.perf_counter()
        with self._lock:
            manifest = (
                self.manifest()
            )  # read before the new file exists, so it is never mistaken for an orphan
            self.fs.makedirs(self.root, exist_ok=True)
            with self.commit.open_write(path) as f:
                size, checksum = serialization.dump(obj, f, serializer)
            record = CheckpointRecord(
                name=name,
                role=role,
                size=size,
                checksum=checksum,
                created=created,
                seq=manifest.next_seq,
                epoch=epoch,
                global_step=global_step,
                metrics=metrics,
                versions=versions,
                monitor=monitor,
            )
            self._write_manifest(manifest.with_record(record))
        elapsed = time.perf_counter() - start
        if self.verbose:
            log.info(
                "saved %s (%s in %.2fs, %s)",
                self.url_for(name),
                _human_size(size),
                elapsed,
                f"{size / elapsed / 2**20:.0f} MiB/s" if elapsed > 0 else "-",
            )
        return record

    def copy(self, src: str, dst: str, *, role: str | None = None) -> CheckpointRecord:
        """Commit ``dst`` as a byte-identical copy of the committed ``src`` (a hard link on local disks)."""
        with self._lock:
            record = self.manifest().get(src)
            if record is None:
                raise FileNotFoundError(f"{self.url_for(src)} is not a committed checkpoint of this store")
            self.commit.copy(self.path(src), self.path(dst))
            manifest = self.manifest()
            new = record.with_changes(name=dst, role=role or role_of_name(dst), seq=manifest.next_seq)
            self._write_manifest(manifest.with_record(new))
        if self.verbose:
            log.info("committed %s as a copy of %s", self.url_for(dst), src)
        return new

    def register(
        self,
        name: str,
        *,
        role: str | None = None,
        epoch: int | None = None,
        global_step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        monitor: str | None = None,
    ) -> CheckpointRecord:
        """Commit a file that already sits in the directory (written by another tool) by adding its record.

        Size and crc32 are read from the file as it is now. ``versions`` stays empty: what wrote the file
        is unknown.

        Raises:
            FileNotFoundError: there is no such file in the directory.
        """
        if name == MANIFEST_NAME or is_temp_name(name):
            raise ValueError(f"{name!r} is reserved for the store's own files; choose another name")
        with self._lock:
            manifest = self.manifest()
            try:
                size, checksum = self._checksum(name)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{self.url_for(name)} does not exist: nothing to register") from e
            record = CheckpointRecord(
                name=name,
                role=role or role_of_name(name),
                size=size,
                checksum=checksum,
                created=time.time(),
                seq=manifest.next_seq,
                epoch=epoch,
                global_step=global_step,
                metrics={str(k): float(v) for k, v in (metrics or {}).items()},
                monitor=monitor,
            )
            self._write_manifest(manifest.with_record(record))
        if self.verbose:
            log.info("registered %s (%s, %s)", self.url_for(name), _human_size(size), checksum)
        return record

    def delete(self, names: Iterable[str]) -> list[str]:
        """Un-commit and remove checkpoints: the manifest forgets them first, then the files go.

        Only names the manifest lists are touched. A file that cannot be removed is logged and left as an
        orphan (it is no longer listed, so nothing resumes from it).
        """
        with self._lock:
            manifest = self.manifest()
            names = [n for n in dict.fromkeys(names) if n in manifest.records]
            if not names:
                return []
            self._write_manifest(manifest.without(names))
        paths = [self.path(n) for n in names]
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove old checkpoint(s) %s: %s", ", ".join(names), e)
        if self.verbose:
            log.info("removed %s", ", ".join(names))
        return names

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
        try:
            size, checksum = self._checksum(name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.url_for(name)} is listed in the manifest but missing") from e
        if size != record.size:
            raise CheckpointCorruptError(
                self.url_for(name), f"{size} bytes on disk, the manifest recorded {record.size} (truncated?)"
            )
        if checksum != record.checksum:
            raise CheckpointCorruptError(
                self.url_for(name), f"checksum {checksum} does not match the manifest's {record.checksum}"
            )
        return record

    def load(
        self,
        name: str,
        *,
        map_location: MapLocation = "cpu",
        trusted: bool = False,
        verify: bool = True,
        serializer: Serializer | None = None,
    ) -> Any:
        """Load checkpoint ``name``, checksum-verified first when the manifest lists it (``verify=True``).

        Raises:
            FileNotFoundError, CheckpointCorruptError, UnsafeCheckpointError.
        """
        start = time.perf_counter()
        if verify and name in self.manifest().records:
            self.verify(name)
        obj = self._load_raw(name, map_location=map_location, trusted=trusted, serializer=serializer)
        log.debug("loaded %s in %.2fs", self.url_for(name), time.perf_counter() - start)
        return obj

    def _load_raw(
        self, name: str, *, map_location: MapLocation, trusted: bool, serializer: Serializer | None = None
    ) -> Any:
        path = self.path(name)
        display = self.url_for(name)
        if self.local:
            # torch reads a local path through its own C++ reader, faster than a Python file object.
            if not self.fs.exists(path):
                raise FileNotFoundError(display)
            return serialization.load(
                path, display, map_location=map_location, trusted=trusted, serializer=serializer
            )
        f: IO[bytes]
        with self.fs.open(path, "rb") as f:
            return serialization.load(
                f, display, map_location=map_location, trusted=trusted, serializer=serializer
            )
