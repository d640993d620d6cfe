"""CheckpointStore: a checkpoint directory on any fsspec filesystem that this process writes.

Every write is a :class:`~.transaction.Transaction` (``store.transaction()``); ``save``, ``copy``, ``delete``,
``register`` and ``save_directory`` are transactions of one operation. Every transaction goes through the
directory's lock (:mod:`.writers`). Reads come from :class:`.StoreReader`, its base. It knows nothing about
Lightning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ..core.errors import CheckpointSaveError, is_storage_client_error
from ..core.records import CheckpointRecord
from . import recovery, writers
from .atomicity import CommitStrategy
from .backends import ObjectIO
from .directory import PendingDirectory
from .lock import DEFAULT_LEASE_S
from .reader import StoreReader
from .serialization import Serializer
from .transaction import Transaction

__all__ = ["CheckpointStore", "StoreReader"]

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

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, verbose: bool = True
    ) -> None:
        super().__init__(url, storage_options, verbose=verbose)
        self._holding: writers.DirectoryWriter | None = None

    @property
    def commit_strategy(self) -> CommitStrategy:
        """How files are published here (:mod:`.atomicity`); tests replace it to fail on cue."""
        return self.loc.commit_strategy

    @commit_strategy.setter
    def commit_strategy(self, strategy: CommitStrategy) -> None:
        self.loc.commit_strategy = strategy

    @property
    def objects(self) -> ObjectIO:
        """The conditional access to the manifest and the lock (:mod:`.backends`); tests replace it."""
        return self.loc.objects

    @objects.setter
    def objects(self, objects: ObjectIO) -> None:
        self.loc.objects = objects

    # ------------------------------------------------------------------------------------- lifecycle
    def ensure_directory(self) -> None:
        """Create the directory if it is missing; a new local directory is made durable in its parent."""
        self.loc.ensure_directory()

    def ensure_writable(self) -> None:
        """Create the directory and prove a file can be written there; raise naming the path if not."""
        self.loc.ensure_writable()

    # ----------------------------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[writers.DirectoryWriter, list[str]]]:
        """The directory's writer, with its lock held (for the block only if nobody in this process holds
        it) and what taking the lock swept."""
        writer = writers.writer_for(self.loc)
        with writer.mutex:
            writer.enter()
            one_off = writer.lock is None
            try:
                with self.loc.storage_errors("lock"):
                    swept = writer.acquire(self.loc) if one_off else []
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
            with self.loc.storage_errors("read"):
                tx = Transaction(self.loc, writer)
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
        holder = writers.holder_of(self.loc)
        if holder is None:
            raise RuntimeError(f"begin_directory() needs the lock of {self.url!r}: call acquire_lock() first")
        writers.refuse_if_lost(holder)
        return PendingDirectory(self.loc, name)

    def sweep_temp(self) -> list[str]:
        """As the holder of the lock, settle and remove what stopped writers left behind (see
        :mod:`.recovery`); returns the names removed. Files the store cannot prove its own are untouched."""
        with self._locked() as (writer, swept):
            if swept or writer.lock is None:
                return swept
            found = recovery.take_over(self.loc, writer.lock)
            writer.manifest, writer.tag, writer.unlisted = found.manifest, found.tag, found.unlisted
            return found.removed

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
            self._holding = writers.hold(self.loc, lease_s)

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
            log.warning(
                "could not release the lock of %s: %s; the next run will find it stale", self.url, str(e)
            )

    @property
    def holds_lock(self) -> bool:
        """Whether this store holds the directory's lock."""
        return self._holding is not None

    # --------------------------------------------------------------------------------- genesis.save
    def save_file(self, name: str, obj: Any, serializer: Serializer = "torch") -> CheckpointRecord:
        """``genesis.save`` of ``name``: exactly ``obj`` (no embedded record), replacing the user's file of
        that name if there is one, its previous content kept as ``<name>.genesis.bak`` until the commit and
        put back if the save fails; a backup a killed save left is settled first."""
        with self.transaction() as tx:
            recovery.settle_backup(self.loc, tx.manifest, name)
            return tx.write(
                name, obj, serializer=serializer, embed_metadata=False, backup=True, overwrite_unlisted=True
            )
