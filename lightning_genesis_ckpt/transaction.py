"""The only way to write a checkpoint directory: a transaction that commits with one manifest write.

::

    with store.transaction() as tx:
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

import errno
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any

from . import directory, serialization
from ._faults import fault_point
from .backends import Conflict
from .errors import CheckpointSaveError, StoreLockedError, is_storage_client_error
from .manifest import Manifest
from .names import BACKUP_SUFFIX, intent_name, is_reserved, role_of_name
from .provenance import library_versions
from .reader import transfer_summary
from .records import METADATA_KEY, CheckpointRecord, clean_metrics, embedded
from .serialization import Serializer

if TYPE_CHECKING:
    from .directory import PendingDirectory
    from .store import CheckpointStore
    from .writers import DirectoryWriter

log = logging.getLogger(__name__)


@dataclass
class Publication:
    """A name a transaction puts new bytes under, and what it takes to undo that.

    The code publishing the bytes calls :meth:`announce` with the record they will have right before they
    become visible under the name.
    """

    store: CheckpointStore
    name: str
    replaces: CheckpointRecord | None
    tree: bool = False
    backup: str | None = None
    #: A local directory's previous tree, kept under a temporary name until the commit.
    aside: str | None = None
    announced: bool = False

    @property
    def replaced(self) -> bool:
        return self.replaces is not None

    def announce(self, record: CheckpointRecord) -> None:
        """Write the intent marker holding ``record`` (durable first when a committed name is replaced)."""
        marker = self.store.path(intent_name(self.name))
        data = encode_marker(record, self.replaces)
        self.store.commit_strategy.write_small(marker, data, durable=self.replaced)
        self.announced = True


def encode_marker(record: CheckpointRecord, replaces: CheckpointRecord | None) -> bytes:
    """The content of an intent marker: the record the published file has, and the one it replaces."""
    doc = {"record": record.to_json(), "replaces": None if replaces is None else replaces.to_json()}
    return json.dumps(doc, sort_keys=True, allow_nan=False).encode()


class Transaction:
    """Writes into one directory that commit together (see the module doc). Made by ``store.transaction()``."""

    def __init__(self, store: CheckpointStore, writer: DirectoryWriter) -> None:
        self.store = store
        self.writer = writer
        self.base, self.tag, self._rewrite = store.read_for_commit(writer)
        self._added: dict[str, CheckpointRecord] = {}
        self._removed: dict[str, CheckpointRecord] = {}
        self._published: list[Publication] = []
        self._log: list[str] = []  # info lines, said once the commit has made them true
        self.committed = False

    # ------------------------------------------------------------------------------------------ view
    @property
    def manifest(self) -> Manifest:
        """The manifest as this transaction will commit it (so far)."""
        m = self.base
        for record in self._added.values():
            m = m.with_record(record)
        return m.without(self._removed)

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
        path = self.store.path(name)
        with (
            self.publishing(name, backup=backup, overwrite_unlisted=overwrite_unlisted) as publication,
            self.store.commit_strategy.open_write(path, sync=False) as f,
        ):
            size, checksum = serialization.dump(obj, f, serializer)
            record = record.with_changes(size=size, checksum=checksum)
            publication.announce(record)
        elapsed = time.perf_counter() - start
        self._log.append(f"saved {self.store.url_for(name)} ({transfer_summary(size, elapsed)})")
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
        path = self.store.path(name)
        with (
            self.publishing(name, backup=backup, overwrite_unlisted=overwrite_unlisted) as publication,
            self.store.commit_strategy.open_write(path, sync=False) as f,
        ):
            sink = serialization.ChecksumWriter(f)
            try:
                produce(sink)  # type: ignore[arg-type]
                sink.flush()
            finally:
                sink.close()
            record = record.with_changes(size=sink.size, checksum=sink.checksum)
            publication.announce(record)
        return self._add(record)

    def copy(self, src: str, dst: str, *, role: str | None = None) -> CheckpointRecord:
        """Commit ``dst`` as a byte-identical copy of ``src`` (committed, or written in this transaction): a
        hard link on local disks, a server-side copy on object stores.

        Raises:
            FileNotFoundError: ``src`` is not a checkpoint of this store.
        """
        source = self.manifest.get(src)
        if source is None:
            raise FileNotFoundError(f"{self.store.url_for(src)} is not a committed checkpoint of this store")
        record = source.with_changes(name=dst, role=role or role_of_name(dst), seq=0)
        if source.is_directory:
            with self.publishing(dst, tree=True) as publication:
                publication.announce(record)
                publication.aside = directory.copy_into_place(
                    self.store, source, record, publication.replaced
                )
            return self._add(record)
        with self.publishing(dst) as publication:
            publication.announce(record)
            self.store.commit_strategy.copy(
                self.store.path(src), self.store.path(dst), sync=False, size=source.size
            )
        self._log.append(f"committed {self.store.url_for(dst)} as a copy of {src}")
        return self._add(record)

    def register(self, name: str, *, role: str | None = None, **fields: Any) -> CheckpointRecord:
        """Commit a file that already sits in the directory (written by another tool), checksummed as it is now.

        Raises:
            FileNotFoundError: there is no such file.
        """
        self._check_name(name)
        try:
            stamp = self.store.checksum(name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.store.url_for(name)} does not exist: nothing to register") from e
        versions = fields.pop("versions", {})
        record = self._new_record(name, role, **fields)
        return self._add(
            record.with_changes(size=stamp.size, checksum=stamp.checksum, versions=dict(versions))
        )

    def write_directory(self, name: str, write: Callable[[str], None], **fields: Any) -> CheckpointRecord:
        """Commit a directory checkpoint: ``write(local_dir)`` fills an empty local directory.

        ``fields``: ``role``, ``epoch``, ``global_step``, ``metrics``, ``monitor``, as for :meth:`write`.
        """
        pending = self.store.begin_directory(name)
        try:
            write(pending.path)
            return self.commit_directory(pending, **fields)
        finally:
            pending.abort()

    def commit_directory(self, pending: PendingDirectory, **fields: Any) -> CheckpointRecord:
        """Commit a directory that :meth:`.CheckpointStore.begin_directory` started (see :mod:`.directory`)."""
        role = fields.pop("role", None)
        record = directory.seal(self.store, pending.path, self._new_record(pending.name, role, **fields))
        with self.publishing(pending.name, tree=True) as publication:
            publication.announce(record)
            publication.aside = directory.put_in_place(
                self.store, pending.path, pending.name, publication.replaced
            )
        return self._add(record)

    def delete(self, names: Iterable[str]) -> list[str]:
        """Un-commit checkpoints; their files are removed after the commit. Only committed names count."""
        doomed = [n for n in dict.fromkeys(names) if n in self.base.records and n not in self._added]
        for name in doomed:
            self._removed[name] = self.base.records[name]
        return doomed

    # -------------------------------------------------------------------------------------- plumbing
    def _check_name(self, name: str) -> None:
        self.store.path(name)  # refuses names that could leave the directory
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

    @contextmanager
    def publishing(
        self, name: str, *, backup: bool = False, overwrite_unlisted: bool = False, tree: bool = False
    ) -> Iterator[Publication]:
        """Publish ``name``: the block writes the bytes, calling ``announce(record)`` on the yielded
        :class:`Publication` right before they become visible. Storage-layer plumbing (see :mod:`.directory`)."""
        store = self.store
        replaces = self.manifest.get(name)
        if replaces is None:
            store.refuse_unlisted(self.writer, name, overwrite_unlisted)
        elif replaces.is_directory != tree:
            kind = "directory" if replaces.is_directory else "single-file"
            raise FileExistsError(
                f"{store.url_for(name)} is a committed {kind} checkpoint: choose another name"
            )
        publication = Publication(store, name, replaces, tree=tree)
        try:
            if backup and (replaces is not None or store.exists(name)):
                publication.backup = name + BACKUP_SUFFIX
                store.commit_strategy.copy(store.path(name), store.path(publication.backup), sync=False)
            yield publication
        except BaseException as e:
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt, SystemExit: stop as a crash would; the next holder settles it
            # Nothing was published: the strategy discarded what it had staged.
            if publication.announced:
                store.discard([intent_name(name)], "intent marker")
            if publication.backup is not None:
                store.discard([publication.backup], "backup")
            if self._is_storage_error(e):
                raise self._failed(name, e) from e
            raise
        self._published.append(publication)
        fault_point("after-rename-before-manifest")

    # ---------------------------------------------------------------------------------- commit, abort
    def commit(self) -> None:
        """Write the manifest (the commit point), then remove what was deleted. Called by the context."""
        store, writer = self.store, self.writer
        if not (self._added or self._removed or self._rewrite or self._clearable()):
            return
        try:
            if self._published:
                store.commit_strategy.sync(store.root)  # every rename of this transaction, durable at once
            new = self._final_manifest()
            assert writer.lock is not None
            writer.lock.check()  # fencing: the lease is re-checked immediately before the manifest write
            data = new.encode()
            if self.tag is None:
                tag = store.objects.create(store.manifest_path, data)
            else:
                tag = store.objects.replace(store.manifest_path, data, self.tag, fault="mid-manifest")
        except Conflict as e:
            raise StoreLockedError(
                f"the manifest of {store.url!r} changed since this run read it under its lock: another run "
                "took the lock over. Nothing of this transaction was committed."
            ) from e
        except StoreLockedError:
            raise
        except Exception as e:
            self.abort(e)
            if self._is_storage_error(e):
                name = next(iter(self._added), store.manifest_path.rsplit("/", 1)[-1])
                raise self._failed(name, e) from e
            raise
        writer.manifest, writer.tag = new, tag
        for name in set(writer.cleared) - set(new.deleting):
            del writer.cleared[name]
        if writer.unlisted is not None:
            writer.unlisted -= set(self._added)
        self.committed = True
        self._after_commit()

    def _clearable(self) -> bool:
        return any(n in self.base.deleting for n in self.writer.cleared)

    def _final_manifest(self) -> Manifest:
        m = self.base
        done = [n for n, s in self.writer.cleared.items() if n in m.deleting and m.deleting[n] == s]
        m = m.deleted(done)
        for record in self._added.values():
            m = m.with_record(record)
        m = m.without(self._removed)
        token = self.writer.lock.info.token if self.writer.lock and self.writer.lock.info else None
        return replace(m, generation=self.base.generation + 1, writer=token, replacing=frozenset())

    def _after_commit(self) -> None:
        """Cleanup after the commit point: never raises, a failure is a warning and waits for the next holder."""
        store = self.store
        fault_point("mid-deletion")
        markers = [intent_name(p.name) for p in self._published]
        extra = [p.backup for p in self._published if p.backup is not None]
        trees = {n for n, r in self._removed.items() if r.is_directory}
        plain = [n for n in self._removed if n not in trees]
        gone = store.discard([*plain, *markers, *extra], "old checkpoint")
        gone += [n for n in trees if store.discard_tree(n)]
        for p in self._published:
            if p.aside is not None:
                store.discard_local_tree(p.aside)
        for name in gone:
            if name in self._removed:
                self.writer.cleared[name] = self._removed[name].stamp
        removed = [n for n in self._removed if n in gone]
        if store.verbose:
            for line in self._log:
                log.info("%s", line)
            if removed:
                log.info("removed %s", ", ".join(removed))

    def abort(self, error: BaseException | None = None) -> None:
        """Undo what was published (called when the block or the commit fails before the commit point).

        Not after a ``KeyboardInterrupt`` or another ``BaseException`` that is not an error: the process stops
        as a crash would, and the next holder of the lock settles what it left (see :mod:`.recovery`).
        """
        if (
            isinstance(error, StoreLockedError)
            or not isinstance(error, (Exception, type(None)))
            or self.committed
        ):
            return  # a run that lost its lock touches nothing
        store = self.store
        for p in reversed(self._published):
            try:
                if not p.replaced:
                    if p.tree:
                        store.discard_tree(p.name)
                    else:
                        store.discard([p.name], "the uncommitted")
                    store.discard([intent_name(p.name)], "intent marker")
                elif p.aside is not None:
                    directory.swap_back(store, p.name, p.aside)
                    store.discard([intent_name(p.name)], "intent marker")
                elif p.backup is not None:
                    store.commit_strategy.copy(store.path(p.backup), store.path(p.name))
                    log.warning(
                        "the save failed after it had replaced %s; restored it from its backup",
                        store.url_for(p.name),
                    )
                    store.discard([p.backup, intent_name(p.name)], "backup")
                else:
                    # Kept: the complete new bytes, which its marker describes; settled by the next transaction.
                    self.writer.unsettled.add(p.name)
            except Exception as e:  # cleanup must never hide the error that made it necessary
                if not (isinstance(e, OSError) or is_storage_client_error(e)):
                    raise
                log.warning("could not undo the write of %s: %s", store.url_for(p.name), e)
        self._published.clear()

    @staticmethod
    def _is_storage_error(error: BaseException) -> bool:
        return (
            isinstance(error, OSError) and not isinstance(error, (CheckpointSaveError, FileExistsError))
        ) or (is_storage_client_error(error))

    def _failed(self, name: str, error: BaseException) -> CheckpointSaveError:
        if isinstance(error, CheckpointSaveError):
            return error
        cause = (
            error if isinstance(error, OSError) else OSError(errno.EIO, f"{type(error).__name__}: {error}")
        )
        committed = list(self.base.records.values())
        # Newest as resume sees it: most training, then a rolling/snapshot file over its best_model.pth copy.
        newest = max(committed, key=lambda r: (r.global_step or -1, r.role != "best", r.seq), default=None)
        intact = (
            "none was committed in this directory yet"
            if newest is None
            else f"the newest is {newest.name} (epoch {newest.epoch}, step {newest.global_step})"
        )
        return CheckpointSaveError(self.store.url_for(name), cause, intact)
