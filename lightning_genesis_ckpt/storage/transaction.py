"""The only way to write a checkpoint directory: a transaction that commits with one manifest write.

::

    with loc.transaction() as tx:
        record = tx.write("checkpoint_epoch_3.pth", state, role="epoch", epoch=3, global_step=120)
        tx.copy(record.name, "best_model.pth")
        tx.delete(["checkpoint_epoch_1.pth", "interrupt_checkpoint.pth"])

The protocol, once for every writer (the lock is taken or shared as :mod:`.writers` describes):

1. **Begin**: re-read the manifest under the lock, never a cached copy, and remember its version tag.
2. **Publish** each new file: its bytes go to a temporary name (local disks) or a deferred upload (object
   stores); then its *intent marker* ``.genesis-tmp-intent-<name>`` is written, holding the record the file
   will have; then the bytes are published under the final name (rename, or the upload completes). For a
   name that is replaced in place (``best_model.pth``, the snapshot) the marker is made durable first (on a
   local disk: fsync of the marker and its directory; on an object store its PUT is durable once
   acknowledged), so a crash at any later point leaves the name with its old bytes (its record is right) or
   its complete new bytes (the marker's record is right). That is the only extra write a replacement needs.
3. **Commit**: one fsync of the directory (the renames are durable), the lock re-checked, then one
   conditional write of the new manifest (see :mod:`.backends`): the records added, the records removed
   moved to ``deleting`` with their sizes and checksums. This write is the commit point.
4. **After the commit**: the deleted files and the markers go (one ``DeleteObjects`` on S3); a file that
   cannot be removed is a warning, and stays listed under ``deleting`` for the next holder.

If anything fails before the commit point the transaction is rolled back: new files are removed, a name
replaced with ``backup=True`` gets its previous bytes back, and the error is a
:class:`~.errors.CheckpointSaveError` naming what is still committed (errors of your own code in the block
propagate unchanged). A run that lost its lock touches nothing and raises :class:`~.errors.StoreLockedError`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import IO, Any

from ..core.display import transfer_summary
from ..core.names import is_reserved, role_of_name
from ..core.records import METADATA_KEY, CheckpointRecord, clean_metrics, embedded
from . import directory, progress, serialization
from .checksums import read_back_file
from .directory import PendingDirectory
from .protocol import CommitProtocol
from .provenance import library_versions
from .serialization import Serializer

log = logging.getLogger(__name__)


class Transaction(CommitProtocol):
    """Writes into one directory that commit together (see the module doc). Made by ``store.transaction()``."""

    def _next_seq(self) -> int:
        return max([self.base.next_seq, *(r.seq + 1 for r in self._added.values())])

    # ---------------------------------------------------------------------------------------- writes
    def write(
        self,
        name: str,
        obj: Any,
        *,
        role: str | None = None,
        epoch: int | None = None,
        global_step: int | None = None,
        metrics: Any = None,
        monitor: str | None = None,
        serializer: Serializer = "torch",
        embed_metadata: bool = True,
        backup: bool = False,
        overwrite_unlisted: bool = False,
    ) -> CheckpointRecord:
        """Serialize ``obj`` into ``name``; returns the record it will be committed with.

        With ``embed_metadata`` and a dict ``obj``, the record's fields travel inside the file too (under
        ``"genesis_ckpt"``, with the name and a write id), so the manifest can be rebuilt from the files. The
        caller's dict is not changed. ``backup``: keep the previous bytes of a replaced name until the commit,
        and put them back if the transaction fails. ``overwrite_unlisted``: the caller names a file of theirs
        to replace (``genesis.save``); otherwise an unlisted file under ``name`` is never overwritten.

        Raises:
            CheckpointSaveError: the write failed (disk full, I/O error, network); nothing committed changed.
            FileExistsError: ``name`` holds a file this store did not write (move it away or import it).
        """
        start = time.perf_counter()
        record = self._new_record(name, role, epoch, global_step, metrics, monitor)
        if embed_metadata and isinstance(obj, dict):
            obj = {**obj, METADATA_KEY: embedded(record, uuid.uuid4().hex)}
        path = self.loc.path(name)
        with (
            progress.transfer(
                "saving",
                self.loc.url_for(name),
                total=lambda: progress.tensor_bytes(obj),
                enabled=self.loc.verbose,
            ),
            self.publishing(name, backup=backup, overwrite_unlisted=overwrite_unlisted) as publication,
            self.loc.commit_strategy.open_write(path, sync=False) as f,
        ):
            # A local temp file can be read back, which lets the checksum reuse torch's record crcs.
            local_name = getattr(f, "name", None) if self.loc.local else None
            read_back = read_back_file(local_name) if isinstance(local_name, str) else None
            size, checksum = serialization.dump(obj, f, serializer, read_back=read_back)
            record = record.with_changes(size=size, checksum=checksum)
            publication.announce(record)
        elapsed = time.perf_counter() - start
        self._log.append(f"saved {self.loc.url_for(name)} ({transfer_summary(size, elapsed)})")
        return self._add(record)

    def write_stream(
        self,
        name: str,
        produce: Callable[[IO[bytes]], object],
        *,
        role: str | None = None,
        backup: bool = False,
        overwrite_unlisted: bool = False,
        **fields: Any,
    ) -> CheckpointRecord:
        """Commit the bytes ``produce(f)`` writes into ``f`` (an artifact, an imported file) under ``name``.

        ``fields``: ``epoch``, ``global_step``, ``metrics``, ``monitor``, ``versions`` of the record.
        """
        versions = fields.pop("versions", None)
        record = self._new_record(name, role, **fields)
        if versions is not None:
            record = record.with_changes(versions=dict(versions))
        path = self.loc.path(name)
        with (
            progress.transfer("writing", self.loc.url_for(name), enabled=self.loc.verbose),
            self.publishing(name, backup=backup, overwrite_unlisted=overwrite_unlisted) as publication,
            self.loc.commit_strategy.open_write(path, sync=False) as f,
        ):
            sink = serialization.ChecksumWriter(f)
            try:
                produce(sink)  # type: ignore[arg-type]
                sink.flush()
                sink.finish()
            finally:
                sink.close()
            record = record.with_changes(size=sink.size, checksum=sink.checksum)
            publication.announce(record)
        return self._add(record)

    def copy(self, src: str, dst: str, *, role: str | None = None) -> CheckpointRecord:
        """Commit ``dst`` as a byte-identical copy of ``src`` (committed, or written in this transaction): a
        hard link on local disks, a server-side copy on object stores.

        Raises:
            FileNotFoundError: ``src`` is not a checkpoint of this loc.
        """
        source = self.manifest.get(src)
        if source is None:
            raise FileNotFoundError(f"{self.loc.url_for(src)} is not a committed checkpoint of this store")
        record = source.with_changes(name=dst, role=role or role_of_name(dst), seq=0)
        if source.is_directory:
            with self.publishing(dst, tree=True) as publication:
                publication.announce(record)
                publication.aside = directory.copy_into_place(self.loc, source, record, publication.replaced)
            return self._add(record)
        with self.publishing(dst) as publication:
            publication.announce(record)
            self.loc.commit_strategy.copy(
                self.loc.path(src), self.loc.path(dst), sync=False, size=source.size
            )
        self._log.append(f"committed {self.loc.url_for(dst)} as a copy of {src}")
        return self._add(record)

    def register(self, name: str, *, role: str | None = None, **fields: Any) -> CheckpointRecord:
        """Commit a file that already sits in the directory (written by another tool), checksummed as it is now.

        On a local disk the file is made durable first (fsync of it, and of the directory with the commit):
        another tool may not have, and a committed file must survive a power cut.

        Raises:
            FileNotFoundError: there is no such file.
        """
        self._check_name(name)
        try:
            stamp = self.loc.checksum(name)
            self.loc.make_durable(name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.loc.url_for(name)} does not exist: nothing to register") from e
        self._needs_sync = True
        versions = fields.pop("versions", {})
        record = self._new_record(name, role, **fields)
        return self._add(
            record.with_changes(size=stamp.size, checksum=stamp.checksum, versions=dict(versions))
        )

    def write_directory(self, name: str, write: Callable[[str], None], **fields: Any) -> CheckpointRecord:
        """Commit a directory checkpoint: ``write(local_dir)`` fills an empty local directory.

        ``fields``: ``role``, ``epoch``, ``global_step``, ``metrics``, ``monitor``, as for :meth:`write`.
        """
        pending = PendingDirectory(self.loc, name)
        try:
            write(pending.path)
            return self.commit_directory(pending, **fields)
        finally:
            pending.abort()

    def commit_directory(self, pending: PendingDirectory, **fields: Any) -> CheckpointRecord:
        """Commit a directory that :meth:`.CheckpointStore.begin_directory` started (see :mod:`.directory`)."""
        role = fields.pop("role", None)
        record = directory.seal(self.loc, pending.path, self._new_record(pending.name, role, **fields))
        with self.publishing(pending.name, tree=True) as publication:
            publication.announce(record)
            publication.aside = directory.put_in_place(
                self.loc, pending.path, pending.name, publication.replaced
            )
            pending.hand_over()
        return self._add(record)

    def delete(self, names: Iterable[str]) -> list[str]:
        """Un-commit checkpoints; their files are removed after the commit. Only committed names count."""
        doomed = [n for n in dict.fromkeys(names) if n in self.base.records and n not in self._added]
        for name in doomed:
            self._removed[name] = self.base.records[name]
        return doomed

    # -------------------------------------------------------------------------------------- plumbing
    def _check_name(self, name: str) -> None:
        self.loc.path(name)  # refuses names that could leave the directory
        if is_reserved(name):
            raise ValueError(f"{name!r} is reserved for the store's own files; choose another name")
        if name in self._added:
            raise ValueError(f"{name!r} is already written in this transaction")

    def _new_record(
        self,
        name: str,
        role: str | None,
        epoch: int | None = None,
        global_step: int | None = None,
        metrics: Any = None,
        monitor: str | None = None,
    ) -> CheckpointRecord:
        self._check_name(name)
        return CheckpointRecord(
            name=name,
            role=role or role_of_name(name),
            size=0,
            checksum="",
            created=time.time(),
            seq=0,
            epoch=epoch,
            global_step=global_step,
            metrics=clean_metrics(metrics),
            versions=dict(library_versions()),
            monitor=monitor,
        )

    def _add(self, record: CheckpointRecord) -> CheckpointRecord:
        record = record.with_changes(seq=self._next_seq())
        self._added[record.name] = record
        return record
