"""The commit protocol, once for every write: publishing, the one manifest write, rollback.

:class:`CommitProtocol` is what a :class:`~.transaction.Transaction` runs underneath its operations (see
:mod:`.transaction` for the protocol step by step): each name is published through :meth:`publishing`
(intent marker, then the bytes made visible), :meth:`commit` makes them committed with one conditional
manifest write and then removes what was deleted, :meth:`abort` undoes what was published before a failure.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..core.errors import CheckpointSaveError, StoreLockedError, is_storage_client_error
from ..core.manifest import Manifest
from ..core.names import BACKUP_SUFFIX, intent_name
from ..core.records import CheckpointRecord
from . import directory, manifests, markers, recovery
from ._faults import fault_point
from .backends import Conflict
from .location import Location

if TYPE_CHECKING:
    from .writers import DirectoryWriter

log = logging.getLogger(__name__)


@dataclass
class Publication:
    """A name a transaction puts new bytes under, and what it takes to undo that.

    The code publishing the bytes calls :meth:`announce` with the record they will have right before they
    become visible under the name.
    """

    loc: Location
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
        marker = self.loc.path(intent_name(self.name))
        data = markers.encode(record, self.replaces)
        # Durable before the bytes it announces become visible: otherwise a power cut could keep a rename and
        # lose the marker, and nothing would prove the orphan ours. Its content (the record) matters only for a
        # name replaced in place, whose new bytes are then adopted or put back by it.
        self.loc.commit_strategy.write_small(marker, data, durable=True, content=self.replaced)
        self.announced = True


class CommitProtocol:
    """The state and the steps of one transaction's commit (see the module doc)."""

    def __init__(self, loc: Location, writer: DirectoryWriter) -> None:
        self.loc = loc
        self.writer = writer
        self.base, self.tag, self._rewrite = self._read_for_commit()
        self._added: dict[str, CheckpointRecord] = {}
        self._removed: dict[str, CheckpointRecord] = {}
        self._published: list[Publication] = []
        self._log: list[str] = []  # info lines, said once the commit has made them true
        self._needs_sync = False  # a directory entry not published by this transaction must be made durable
        self.committed = False

    @property
    def manifest(self) -> Manifest:
        """The manifest as this transaction will commit it (so far)."""
        m = self.base
        for record in self._added.values():
            m = m.with_record(record)
        return m.without(self._removed)

    @contextmanager
    def publishing(
        self, name: str, *, backup: bool = False, overwrite_unlisted: bool = False, tree: bool = False
    ) -> Iterator[Publication]:
        """Publish ``name``: the block writes the bytes, calling ``announce(record)`` on the yielded
        :class:`Publication` right before they become visible. Storage-layer plumbing (see :mod:`.directory`)."""
        loc = self.loc
        replaces = self.manifest.get(name)
        if replaces is None:
            self._refuse_unlisted(name, overwrite_unlisted)
        elif replaces.is_directory != tree:
            kind = "directory" if replaces.is_directory else "single-file"
            raise FileExistsError(
                f"{loc.url_for(name)} is a committed {kind} checkpoint: choose another name"
            )
        publication = Publication(loc, name, replaces, tree=tree)
        try:
            if backup and (replaces is not None or loc.exists(name)):
                publication.backup = name + BACKUP_SUFFIX
                loc.commit_strategy.copy(loc.path(name), loc.path(publication.backup), sync=False)
            yield publication
        except BaseException as e:
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt, SystemExit: stop as a crash would; the next holder settles it
            # Nothing was published: the strategy discarded what it had staged.
            if publication.announced:
                loc.discard([intent_name(name)], "intent marker")
            if publication.backup is not None:
                loc.discard([publication.backup], "backup")
            if self._is_storage_error(e):
                raise self._failed(name, e) from e
            raise
        self._published.append(publication)
        fault_point("after-rename-before-manifest")

    def _read_for_commit(self) -> tuple[Manifest, Any, bool]:
        """The manifest re-read under the lock (with its tag), settled; and whether it must be written back.

        If it changed since this process last wrote it, another run may have taken the lock over (and written
        the manifest to fence this one out): the lock is checked before anything is written.
        """
        writer = self.writer
        assert writer.lock is not None
        if writer.fresh and writer.manifest is not None:
            writer.fresh = False  # read under this lock by the acquisition just now
            manifest, tag, dirty = writer.manifest, writer.tag, False
        else:
            manifest, tag, dirty = manifests.read_manifest(self.loc)
            if writer.lock.cheap_check or tag != writer.tag:
                writer.lock.check()
        if writer.unsettled:
            present = {n: self.loc.is_tree(n) for n in writer.unsettled if self.loc.exists(n)}
            manifest, _ = recovery.settle_markers(self.loc, manifest, set(writer.unsettled), present)
            writer.unsettled.clear()
            dirty = True
        return manifest, tag, dirty

    def _refuse_unlisted(self, name: str, allowed: bool) -> None:
        """Raise ``FileExistsError`` if an unlisted file the store cannot prove its own sits at ``name``."""
        unlisted = self.writer.unlisted
        present = name in unlisted if unlisted is not None else self.loc.exists(name)
        if not present or allowed:
            return
        if recovery.is_ours(self.loc, name):
            log.warning("replacing %s, which a stopped writer left uncommitted", self.loc.url_for(name))
            return
        raise FileExistsError(
            f"{self.loc.url_for(name)} exists but this store did not write it under that name: move it away, "
            "choose another name, or adopt it with genesis.import_checkpoint() (the store never overwrites what "
            "it cannot prove its own)"
        )

    # ---------------------------------------------------------------------------------- commit, abort
    def commit(self) -> None:
        """Write the manifest (the commit point), then remove what was deleted. Called by the context."""
        loc, writer = self.loc, self.writer
        if not (self._added or self._removed or self._rewrite or self._clearable()):
            return
        try:
            if self._published or self._needs_sync:
                loc.commit_strategy.sync(loc.root)  # every rename of this transaction, durable at once
            new = self._final_manifest()
            assert writer.lock is not None
            writer.lock.check()  # fencing: the lease is re-checked immediately before the manifest write
            data = new.encode()
            if self.tag is None:
                tag = loc.objects.create(loc.manifest_path, data)
            else:
                tag = loc.objects.replace(loc.manifest_path, data, self.tag, fault="mid-manifest")
        except Conflict as e:
            raise StoreLockedError(
                f"the manifest of {loc.url!r} changed since this run read it under its lock: another run "
                "took the lock over. Nothing of this transaction was committed."
            ) from e
        except StoreLockedError:
            raise
        except Exception as e:
            self.abort(e)
            if self._is_storage_error(e):
                name = next(iter(self._added), loc.manifest_path.rsplit("/", 1)[-1])
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
        loc = self.loc
        if self._removed:
            fault_point("mid-deletion")  # the manifest forgot them, their files are still there
        markers = [intent_name(p.name) for p in self._published]
        extra = [p.backup for p in self._published if p.backup is not None]
        trees = {n for n, r in self._removed.items() if r.is_directory}
        plain = [n for n in self._removed if n not in trees]
        gone = loc.discard([*plain, *markers, *extra], "old checkpoint")
        gone += [n for n in trees if loc.discard_tree(n)]
        for p in self._published:
            if p.aside is not None:
                loc.discard_local_tree(p.aside)
        for name in gone:
            if name in self._removed:
                self.writer.cleared[name] = self._removed[name].stamp
        removed = [n for n in self._removed if n in gone]
        if loc.verbose:
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
        loc = self.loc
        for p in reversed(self._published):
            try:
                if not p.replaced:
                    if p.tree:
                        loc.discard_tree(p.name)
                    else:
                        loc.discard([p.name], "the uncommitted")
                    loc.discard([intent_name(p.name)], "intent marker")
                elif p.aside is not None:
                    directory.swap_back(loc, p.name, p.aside)
                    loc.discard([intent_name(p.name)], "intent marker")
                elif p.backup is not None:
                    loc.commit_strategy.copy(loc.path(p.backup), loc.path(p.name))
                    log.warning(
                        "the save failed after it had replaced %s; restored it from its backup",
                        loc.url_for(p.name),
                    )
                    loc.discard([p.backup, intent_name(p.name)], "backup")
                else:
                    # Kept: the complete new bytes, which its marker describes; settled by the next transaction.
                    self.writer.unsettled.add(p.name)
            except Exception as e:  # cleanup must never hide the error that made it necessary
                if not (isinstance(e, OSError) or is_storage_client_error(e)):
                    raise
                log.warning("could not undo the write of %s: %s", loc.url_for(p.name), str(e))
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
        return CheckpointSaveError(self.loc.url_for(name), cause, intact)
