"""CheckpointStore: a checkpoint directory on any fsspec filesystem that this process writes.

Every write is a :class:`~.transaction.Transaction` (``store.transaction()``); ``save``, ``copy``, ``delete``,
``register`` and ``save_directory`` are transactions of one operation. Every transaction goes through the
directory's lock (:mod:`.writers`). Reads come from :class:`.StoreReader`, its base. It knows nothing about
Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import backends, directory, recovery, writers
from .atomicity import CommitStrategy, strategy_for, temp_name
from .directory import PendingDirectory
from .errors import CheckpointSaveError, is_storage_client_error
from .lock import DEFAULT_LEASE_S
from .manifest import Manifest
from .reader import StoreReader, human_size
from .records import CheckpointRecord
from .serialization import Serializer
from .transaction import Transaction

__all__ = ["CheckpointStore", "StoreReader", "human_size"]

log = logging.getLogger(__name__)


class CheckpointStore(StoreReader):
    """A checkpoint directory on any fsspec URL that this process writes: transactions, and the lock.

    Args:
        url: the directory. Created on first write.
        storage_options: passed unchanged to fsspec (credentials, endpoint). Never written anywhere.
        verbose: log one info line per save and per load.

    See :mod:`lightning_genesis_ckpt.transaction` for how a write commits on each filesystem, and
    :mod:`lightning_genesis_ckpt.lock` for the lock.
    """

    #: Whether the holder of the lock sweeps what stopped writers left in the directory (a checkpoint
    #: directory); a single file's directory, which may be any of the user's, is never listed.
    sweeps = True

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, verbose: bool = True
    ) -> None:
        super().__init__(url, storage_options, verbose=verbose)
        self.commit_strategy: CommitStrategy = strategy_for(self.fs)
        self._dir_ready = False
        self._holding: writers.DirectoryWriter | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def ensure_directory(self) -> None:
        """Create the directory if it is missing; a new local directory is made durable in its parent."""
        if self.local:
            created = []
            path = os.path.abspath(self.root)
            while not os.path.isdir(path):
                created.append(path)
                path = os.path.dirname(path)
            if created:
                os.makedirs(self.root, exist_ok=True)
                for new in reversed(created):  # each new directory's entry, durable in its parent
                    from .atomicity import fsync_directory

                    fsync_directory(os.path.dirname(new))
            return
        # On object stores a directory is only a key prefix: "creating" it is a request (s3fs: HEAD bucket)
        # that proves nothing, so it is done once per store.
        if not self._dir_ready:
            with self.storage_errors("create"):
                self.fs.makedirs(self.root, exist_ok=True)
            self._dir_ready = True

    def ensure_writable(self) -> None:
        """Create the directory and prove a file can be written there; raise naming the path if not."""
        try:
            with self.storage_errors("write"):
                self.ensure_directory()
                probe = self.path(temp_name("write-probe"))
                self.commit_strategy.write_small(probe, b"ok", durable=False)
                self.fs.rm_file(probe)
        except OSError as e:
            client = e.__cause__ if e.__cause__ is not None and is_storage_client_error(e.__cause__) else None
            if client is not None:
                raise PermissionError(
                    f"checkpoint directory {self.url!r} cannot be reached ({type(client).__name__}: {client}); "
                    "check the URL and the credentials or endpoint in storage_options"
                ) from client
            raise type(e)(
                f"checkpoint directory {self.url!r} is not writable ({e.strerror or e}); "
                "choose a directory you can write to or fix its permissions"
            ) from e

    # ----------------------------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[writers.DirectoryWriter, list[str]]]:
        """The directory's writer, with its lock held (for the block only if nobody in this process holds
        it) and what taking the lock swept."""
        writer = writers.writer_for(self)
        with writer.mutex:
            writer.enter()
            one_off = writer.lock is None
            try:
                with self.storage_errors("lock"):
                    swept = writer.acquire(self) if one_off else []
                writers.refuse_if_lost(writer)
                yield writer, swept
            finally:
                writer.leave()
                if one_off and writer.holds == 0:
                    writer.drop_lock()
                    writers.forget(writer)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction on this directory (see :mod:`.transaction`): commits when the block ends cleanly.

        Raises:
            StoreLockedError: another process holds the directory's lock (or took it from this one).
            CheckpointSaveError: a write or the commit failed; nothing committed changed.
        """
        with self._locked() as (writer, _):
            with self.storage_errors("read"):
                tx = Transaction(self, writer)
            try:
                yield tx
            except BaseException as e:
                tx.abort(e)
                raise
            tx.commit()

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
        """Serialize ``obj`` into ``name`` and commit it (see :meth:`.Transaction.write`).

        Raises:
            CheckpointSaveError: the write failed (disk full, I/O error, network); an ``OSError`` with the
                original errno. Nothing committed was touched and the temporary file is gone.
            StoreLockedError: another run holds the directory.
            FileExistsError: ``name`` holds a file this store did not write.
        """
        try:
            with self.transaction() as tx:
                return tx.write(
                    name,
                    obj,
                    role=role,
                    epoch=epoch,
                    global_step=global_step,
                    metrics=metrics,
                    monitor=monitor,
                    serializer=serializer,
                    embed_metadata=embed_metadata,
                )
        except (CheckpointSaveError, FileExistsError):
            raise
        except OSError as e:  # the lock or the manifest could not be reached: nothing was written
            raise CheckpointSaveError(self.url_for(name), e, "unknown: the store could not be read") from e

    def copy(self, src: str, dst: str, *, role: str | None = None) -> CheckpointRecord:
        """Commit ``dst`` as a byte-identical copy of the committed ``src`` (a hard link on local disks).

        Raises:
            FileNotFoundError: ``src`` is not committed.
            CheckpointSaveError, StoreLockedError: as :meth:`save`.
        """
        with self.transaction() as tx:
            return tx.copy(src, dst, role=role)

    def register(self, name: str, **fields: Any) -> CheckpointRecord:
        """Commit a file that already sits in the directory (written by another tool) by adding its record.

        Size and crc32 are read from the file as it is now; ``fields`` are the record's ``role``, ``epoch``,
        ``global_step``, ``metrics``, ``monitor``.

        Raises:
            FileNotFoundError: there is no such file in the directory.
        """
        with self.transaction() as tx:
            return tx.register(name, **fields)

    def delete(self, names: Iterable[str]) -> list[str]:
        """Un-commit and remove checkpoints: the manifest forgets them first, then the files go.

        Only names the manifest lists are touched; a file that cannot be removed is logged and left for the
        next holder of the lock. Returns the names un-committed.
        """
        with self.transaction() as tx:
            return tx.delete(names)

    def save_directory(self, name: str, write: Callable[[str], None], **fields: Any) -> CheckpointRecord:
        """Commit a directory checkpoint: ``write(local_dir)`` fills an empty local directory, committed
        atomically under ``name`` with size and crc32 of every file in its record.

        ``fields``: ``role``, ``epoch``, ``global_step``, ``metrics``, ``monitor``, as for :meth:`save`.

        Raises:
            CheckpointSaveError, StoreLockedError: as :meth:`save`.
            FileExistsError: something the manifest does not list already has this name.
            ValueError: ``write`` wrote no file, or a symlink or special file.
        """
        with self.transaction() as tx:
            return tx.write_directory(name, write, **fields)

    def begin_directory(self, name: str) -> PendingDirectory:
        """Start a directory checkpoint for several writers (the ranks of a sharded strategy): fill its
        ``.path`` on every rank, then commit it with ``tx.commit_directory(pending, ...)`` on rank 0.

        Needs this process to hold the lock (:meth:`acquire_lock`), so that nobody sweeps the pending
        directory meanwhile. On object stores ``.path`` is local staging: one machine's ranks only.
        """
        holder = writers.holder_of(self)
        if holder is None:
            raise RuntimeError(f"begin_directory() needs the lock of {self.url!r}: call acquire_lock() first")
        writers.refuse_if_lost(holder)
        return PendingDirectory(self, name)

    def sweep_temp(self) -> list[str]:
        """As the holder of the lock, settle and remove what stopped writers left behind (see
        :mod:`.recovery`); returns the names removed. Files the store cannot prove its own are untouched."""
        with self._locked() as (writer, swept):
            return swept or recovery.take_over(self, writer)

    def finish_deletions(self) -> list[str]:
        """Remove the files of checkpoints that a stopped writer un-committed but did not remove yet."""
        return self.sweep_temp()

    # ---------------------------------------------------------------------------------------- locking
    def acquire_lock(self, lease_s: float = DEFAULT_LEASE_S) -> None:
        """Hold the directory's lock until :meth:`release_lock`: this store is then its writer, and every
        other writer of this process goes through it (see :mod:`.writers`).

        Raises:
            StoreLockedError: another live run holds the directory.
        """
        if self._holding is None:
            self._holding = writers.hold(self, lease_s)

    def release_lock(self) -> None:
        """Give up the directory's lock if this store holds it. Never raises for I/O or storage errors."""
        writer, self._holding = self._holding, None
        if writer is None:
            return
        try:
            writers.let_go(writer)
        except Exception as e:
            if not (isinstance(e, OSError) or is_storage_client_error(e)):
                raise
            log.warning("could not release the lock of %s: %s; the next run will find it stale", self.url, e)

    @property
    def holds_lock(self) -> bool:
        """Whether this store holds the directory's lock."""
        return self._holding is not None

    # ------------------------------------------------------------ primitives of the storage layer
    def read_for_commit(self, writer: writers.DirectoryWriter) -> tuple[Manifest, Any, bool]:
        """The manifest re-read under the lock (with its tag), settled; and whether it must be written back.

        If it changed since this process last wrote it, another run may have taken the lock over (and written
        the manifest to fence this one out): the lock is checked before anything is written.
        """
        assert writer.lock is not None
        if writer.fresh and writer.manifest is not None:
            writer.fresh = False
            manifest, tag, dirty = writer.manifest, writer.tag, False
        else:
            manifest, tag, dirty = self.read_manifest()
            if writer.lock.cheap_check or tag != writer.tag:
                writer.lock.check()
        if writer.unsettled:
            present = {n: directory.is_tree(self, n) for n in writer.unsettled if self.exists(n)}
            manifest, _ = recovery.settle_markers(self, manifest, set(writer.unsettled), present)
            writer.unsettled.clear()
            dirty = True
        return manifest, tag, dirty

    def refuse_unlisted(self, writer: writers.DirectoryWriter, name: str, allowed: bool) -> None:
        """Raise ``FileExistsError`` if an unlisted file the store cannot prove its own sits at ``name``."""
        present = name in writer.unlisted if writer.unlisted is not None else self.exists(name)
        if not present or allowed:
            return
        if directory.is_tree(self, name):
            ours = recovery.adopt_directory(self, name, "checking a name to write") is not None
        else:
            ours = recovery.written_here(
                name, recovery.embedded_fields(self, name, "checking a name to write")
            )
        if ours:
            log.warning("replacing %s, which a stopped writer left uncommitted", self.url_for(name))
            return
        raise FileExistsError(
            f"{self.url_for(name)} exists but this store did not write it under that name: move it away, choose "
            "another name, or adopt it with genesis.import_checkpoint() (the store never overwrites what it "
            "cannot prove its own)"
        )

    def discard(self, names: Iterable[str], what: str) -> list[str]:
        """Remove files after a commit or a failure (missing ones count as removed); returns those gone.

        Never raises: a file that cannot be removed is a warning naming ``what``, left for the next holder.
        """
        names = list(names)
        try:
            backends.remove_files(self.fs, [self.path(n) for n in names])
            return names
        except Exception as e:
            if not (isinstance(e, OSError) or is_storage_client_error(e)):
                raise
            log.warning("could not remove %s %s: %s", what, ", ".join(self.url_for(n) for n in names), e)
            return []

    def discard_tree(self, name: str) -> bool:
        """Remove the directory ``name`` and everything in it (a missing one counts); False on failure."""
        try:
            self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            if not (isinstance(e, OSError) or is_storage_client_error(e)):
                raise
            log.warning("could not remove %s: %s", self.url_for(name), e)
            return False
        finally:
            self.fs.invalidate_cache(self.path(name))
        return True

    @staticmethod
    def discard_local_tree(path: str) -> None:
        """Remove a local temporary tree; a failure is a warning (its temp name gets it swept later)."""
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)
