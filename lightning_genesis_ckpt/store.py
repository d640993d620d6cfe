"""CheckpointStore: a checkpoint directory on any fsspec filesystem, with atomic commits and a manifest.

All writes to a checkpoint directory go through this class (reads come from :class:`.StoreReader`, its
base). It knows nothing about Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from . import atomicity, directory, recovery, serialization
from ._faults import fault_point
from .atomicity import CommitStrategy, is_temp_name, strategy_for, temp_name
from .directory import PendingDirectory
from .errors import CheckpointSaveError, is_storage_client_error
from .lock import DEFAULT_LEASE_S, StoreLock
from .manifest import LOCK_NAME, MANIFEST_NAME, CheckpointRecord, Manifest, role_of_name
from .reader import StoreReader, human_size, transfer_summary
from .recovery import METADATA_KEY
from .serialization import Serializer

__all__ = ["METADATA_KEY", "CheckpointStore", "StoreReader", "human_size", "library_versions"]

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    """Versions of this library, torch and Lightning, as recorded with every checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"torch": str(torch.__version__)}
    with contextlib.suppress(PackageNotFoundError):
        out["lightning_genesis_ckpt"] = version("lightning-genesis-ckpt")
    for dist in ("pytorch-lightning", "lightning"):  # whichever flavour is installed
        with contextlib.suppress(PackageNotFoundError):
            out["lightning"] = version(dist)
            break
    return out


class CheckpointStore(StoreReader):
    """A checkpoint directory on any fsspec URL that this process writes: saves, copies, deletions, the lock.

    Args:
        url: the directory. Created on first write.
        storage_options: passed unchanged to fsspec (credentials, endpoint). Never written anywhere.
        verbose: log one info line per save and per load.

    See :mod:`lightning_genesis_ckpt.atomicity` for how each filesystem commits.
    """

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, verbose: bool = True
    ) -> None:
        super().__init__(url, storage_options, verbose=verbose)
        self.commit: CommitStrategy = strategy_for(self.fs)
        self._dir_ready = False
        self._writer_lock: StoreLock | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def ensure_writable(self) -> None:
        """Create the directory and prove a file can be committed there; raise naming the path if not."""
        try:
            self._ensure_dir()
            probe = self.path(temp_name("write-probe"))
            self.commit.write_bytes(probe, b"ok")
            self.fs.rm_file(probe)
        except OSError as e:
            raise type(e)(
                f"checkpoint directory {self.url!r} is not writable ({e.strerror or e}); "
                "choose a directory you can write to or fix its permissions"
            ) from e
        except Exception as e:
            if not is_storage_client_error(e):
                raise
            raise PermissionError(
                f"checkpoint directory {self.url!r} cannot be reached ({type(e).__name__}: {e}); "
                "check the URL and the credentials or endpoint in storage_options"
            ) from e

    def sweep_temp(self) -> list[str]:
        """Remove leftover temporary files of killed writers (only names matching our temp pattern).

        Also removes an orphan: a file a killed writer published but never committed (its intent marker
        is still there and the manifest does not list it). Nothing else the manifest does not list is
        touched.
        """
        swept: list[str] = []
        names = self._list_names()
        targets = {t for n in names if (t := atomicity.intent_target(n)) is not None and t in names}
        orphans = sorted(targets - set(self.manifest().records)) if targets else []
        if orphans:
            log.warning("removing %s: written but never committed by a run that stopped", ", ".join(orphans))
        for name in [*orphans, *(n for n in names if is_temp_name(n))]:
            if atomicity.intent_target(name) in orphans and atomicity.intent_target(name) not in swept:
                continue  # its orphan could not be removed: keep the proof for the next sweep
            if self.discard(name, "stale temporary file", tree=None):
                swept.append(name)
        if swept:
            log.info("swept %d stale temporary file(s) in %s", len(swept), self.url)
        return swept

    def _ensure_dir(self) -> None:
        # On object stores a directory is only a key prefix: "creating" it is a request (s3fs: HEAD bucket)
        # that proves nothing, so it is done once per store. A local directory can vanish: always, and what
        # is created is made durable (a new dirpath's entry in its parent would otherwise not survive a power
        # cut, taking the first commits inside it along).
        if self.local:
            atomicity.makedirs(self.root)
        elif not self._dir_ready:
            self.fs.makedirs(self.root, exist_ok=True)
            self._dir_ready = True

    @contextlib.contextmanager
    def _publishing(self, name: str) -> Iterator[None]:
        """Announce ``name`` with an intent marker while the block publishes it; :meth:`_retract` ends it.

        Data is published under its final name before the manifest commits it, and a crash in between
        leaves a file no record names: the marker lets the next sweep prove that file ours. If the block
        fails, the commit strategy published nothing and the marker goes at once.
        """
        self.fs.pipe_file(self.path(atomicity.intent_name(name)), b"")
        if self.local:
            # On disk before the data it announces is renamed into place: a power cut could otherwise keep the
            # rename and lose the marker, and the sweep could no longer prove the orphan ours.
            atomicity._fsync_dir(self.root)
        try:
            yield
        except BaseException:
            self._retract(name)
            raise

    def _retract(self, name: str) -> None:
        # A marker left behind is harmless: the sweep removes it, and the file it names is committed.
        self.discard(atomicity.intent_name(name), "intent marker")

    def discard(self, name: str, what: str, *, tree: bool | None = False) -> bool:
        """Remove ``name`` if it is there; True once it is gone. A failure is a warning naming ``what``.

        ``tree``: True for a directory, None when unknown (one request asks the filesystem which). For
        cleanup and retention only (temp files, backups, leftovers, un-committed checkpoints), never for a
        name the manifest lists.
        """
        try:
            if tree is None:
                tree = self.fs.isdir(self.path(name))
            if tree:
                self._remove_tree(name)
            else:
                self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s %s: %s", what, self.url_for(name), e)
            return False
        return True

    def _write_manifest(self, manifest: Manifest) -> None:
        self.commit.write_bytes(self.manifest_path, manifest.encode(), fault="mid-manifest")
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

        A committed ``name`` is replaced in place; the manifest first lists it under ``replacing``, so that a
        crash before the new record is written still ends in a consistent store (see :mod:`.recovery`).

        Raises:
            CheckpointSaveError: the write failed (disk full, I/O error, network); an ``OSError`` with the
                original errno. Nothing committed was touched and the temporary file is gone.
            StoreLockedError: this store holds the directory's lock and another run has taken it over.
        """
        if name in (MANIFEST_NAME, LOCK_NAME) or is_temp_name(name):
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
            self._check_lock()
            manifest = (
                self.manifest()
            )  # read before the new file exists, so it is never mistaken for an orphan
            replacing = name in manifest.records
            try:
                self._ensure_dir()
                if replacing:
                    manifest = manifest.replacing_file(name)
                    self._write_manifest(manifest)
                with self._publishing(name), self.commit.open_write(path) as f:
                    size, checksum = serialization.dump(obj, f, serializer)
                    fault_point("after-data-before-rename")
                fault_point("after-rename-before-manifest")
            except OSError as e:
                raise self._save_failed(name, e, replacing) from e
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
            self._commit_record(record, manifest, replacing)
            self._retract(name)
        elapsed = time.perf_counter() - start
        if self.verbose:
            log.info("saved %s (%s)", self.url_for(name), transfer_summary(size, elapsed))
        return record

    def begin_directory(self, name: str) -> PendingDirectory:
        """Start a directory checkpoint: fill its ``.path``, then ``.commit(...)`` (see :mod:`.directory`).

        For strategies whose ranks all write into one directory: rank 0 begins, every rank writes into the
        same ``.path``, rank 0 commits. On object stores ``.path`` is local staging: one machine's ranks only.
        """
        with self._lock:
            self._check_lock()
        return PendingDirectory(self, name)

    def save_directory(self, name: str, write: Callable[[str], None], **fields: Any) -> CheckpointRecord:
        """Commit a directory checkpoint: ``write(local_dir)`` fills an empty local directory, committed
        atomically under ``name`` with size and crc32 of every file in its record.

        ``fields``: ``role``, ``epoch``, ``global_step``, ``metrics``, ``monitor``, as for :meth:`save`.

        Raises:
            CheckpointSaveError, StoreLockedError: as :meth:`save`.
            FileExistsError: something the manifest does not list already has this name.
            ValueError: ``write`` wrote no file, or a symlink or special file.
        """
        pending = self.begin_directory(name)
        try:
            write(pending.path)
            return pending.commit(**fields)
        finally:
            pending.abort()

    def copy(self, src: str, dst: str, *, role: str | None = None) -> CheckpointRecord:
        """Commit ``dst`` as a byte-identical copy of the committed ``src`` (a hard link on local disks).

        Raises:
            FileNotFoundError: ``src`` is not committed.
            CheckpointSaveError, StoreLockedError: as :meth:`save`.
        """
        with self._lock:
            self._check_lock()
            manifest = self.manifest()
            record = manifest.get(src)
            if record is None:
                raise FileNotFoundError(f"{self.url_for(src)} is not a committed checkpoint of this store")
            if record.is_directory:
                return directory.copy(self, record, dst, role)
            replacing = dst in manifest.records
            try:
                if replacing:
                    manifest = manifest.replacing_file(dst)
                    self._write_manifest(manifest)
                with self._publishing(dst):
                    self.commit.copy(self.path(src), self.path(dst))
                fault_point("after-rename-before-manifest")
            except OSError as e:
                raise self._save_failed(dst, e, replacing) from e
            new = record.with_changes(name=dst, role=role or role_of_name(dst), seq=manifest.next_seq)
            self._commit_record(new, manifest, replacing)
            self._retract(dst)
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
        if name in (MANIFEST_NAME, LOCK_NAME) or is_temp_name(name):
            raise ValueError(f"{name!r} is reserved for the store's own files; choose another name")
        with self._lock:
            self._check_lock()
            manifest = self.manifest()
            try:
                if self.local:
                    # Another tool wrote it, perhaps without fsync: its bytes and its name must be on disk
                    # before a record vouches for them, or a power cut leaves a committed checkpoint that is
                    # missing or fails its checksum.
                    atomicity.fsync_file(self.path(name))
                    atomicity._fsync_dir(self.root)
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
            log.info("registered %s (%s, %s)", self.url_for(name), human_size(size), checksum)
        return record

    def delete(self, names: Iterable[str]) -> list[str]:
        """Un-commit and remove checkpoints: the manifest forgets them first, then the files go.

        Only names the manifest lists are touched. The manifest that forgets them lists them as ``deleting``
        until their files are gone, so a crash in between is finished by :meth:`finish_deletions`. A file that
        cannot be removed is logged and left for that next start.

        Raises:
            OSError: the manifest could not be written (nothing was deleted then).
        """
        with self._lock:
            self._check_lock()
            manifest = self.manifest()
            names = [n for n in dict.fromkeys(names) if n in manifest.records]
            if not names:
                return []
            trees = {n for n in names if manifest.records[n].is_directory}
            self._write_manifest(manifest.without(names))
        fault_point("mid-deletion")
        removed = self._remove_files(names, trees)
        with self._lock:
            # Bookkeeping only, written with the next commit: until then a crash merely repeats the removal.
            self._manifest = self.manifest().deleted(removed)
        if self.verbose and removed:
            log.info("removed %s", ", ".join(removed))
        return names

    def finish_deletions(self) -> list[str]:
        """Remove the files of checkpoints that a killed writer had un-committed but not yet removed."""
        with self._lock:
            self._check_lock()
            return recovery.finish_deletions(self)

    def _remove_files(self, names: list[str], trees: Collection[str] = ()) -> list[str]:
        """Remove files, and the directories named in ``trees`` (already missing counts as removed);
        returns the names that are gone."""
        gone = [n for n in names if n in trees and self.discard(n, "old checkpoint", tree=True)]
        names = [n for n in names if n not in trees]
        if not names:
            return gone
        return gone + self._remove_plain_files(names)

    def _remove_tree(self, name: str) -> None:
        """Remove the directory ``name`` and everything in it; a missing one counts as removed."""
        try:
            self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass
        finally:
            self.fs.invalidate_cache(self.path(name))

    def _remove_plain_files(self, names: list[str]) -> list[str]:
        try:
            self.fs.rm([self.path(n) for n in names])  # one request for all of them on object stores
            return names
        except FileNotFoundError:
            pass  # one was gone already: the others may not have been attempted
        except OSError as e:
            log.warning("could not remove old checkpoint(s) %s: %s", ", ".join(names), e)
            return []
        return [name for name in names if self.discard(name, "old checkpoint")]

    def _commit_record(self, record: CheckpointRecord, manifest: Manifest, replacing: bool) -> None:
        """The commit point: the manifest lists ``record``. On failure a new file is removed again."""
        try:
            self._write_manifest(manifest.with_record(record))
        except OSError as e:
            raise self._save_failed(record.name, e, replacing) from e

    def _save_failed(self, name: str, error: OSError, replacing: bool) -> CheckpointSaveError:
        committed = list((self._manifest or Manifest()).records.values())
        self._retract(name)
        if replacing:
            # Kept: the manifest lists it as ``replacing``, so it is either the old content or the complete
            # new one. Re-read (and settle) the manifest next time, in case the new bytes landed.
            self._manifest = None
        else:
            # Uncommitted, and it would only take space on a disk that may be full.
            self.discard(name, "the uncommitted", tree=None)
        # Newest as resume sees it: most training, then a rolling/snapshot file over its best_model.pth copy.
        newest = max(committed, key=lambda r: (r.global_step or -1, r.role != "best", r.seq), default=None)
        intact = (
            "none was committed in this directory yet"
            if newest is None
            else f"the newest is {newest.name} (epoch {newest.epoch}, step {newest.global_step})"
        )
        return CheckpointSaveError(self.url_for(name), error, intact)

    # ------------------------------------------------------------------------------------- locking
    def acquire_lock(self, lease_s: float = DEFAULT_LEASE_S) -> None:
        """Make this store the directory's only writer until :meth:`release_lock` (see :mod:`.lock`).

        While it holds the lock, every commit first checks the lock is still its own.

        Raises:
            StoreLockedError: another live run holds the directory.
        """
        with self._lock:
            if self._writer_lock is not None and self._writer_lock.held:
                return
            self._ensure_dir()
            self._writer_lock = StoreLock(self.fs, self.root, self.url, lease_s)
            self._writer_lock.acquire()

    def release_lock(self) -> None:
        """Give up the directory's lock if this store holds it. Never raises for I/O errors."""
        with self._lock:
            lock, self._writer_lock = self._writer_lock, None
        if lock is not None:
            lock.release()

    def _check_lock(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.verify()
