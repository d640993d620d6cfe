"""The holder's recovery after a writer stopped mid-commit: recorded, never inferred from names.

What a stopped writer can leave, and what the next holder of the lock does about it (:func:`take_over`),
each step with a warning:

* **temporary files** (``.genesis-tmp-*``): removed;
* **intent markers** (:mod:`.markers`) of a transaction that never committed: a new name under which the
  bytes match the marker's record is an orphan, removed; a committed name that was being replaced holds
  either its old bytes (the marker goes) or the complete new bytes the marker describes, which are adopted
  with their record;
* **``deleting`` entries** of a deletion left half-done: a file is removed only if its size and checksum are
  still those of the checkpoint that was deleted (a directory: or it is what a removal stopped half-way left
  of it, :func:`.directory.remains_of`); a file the user has put back under the name is left alone;
* **a missing or unreadable manifest**: rebuilt from the files (:mod:`.manifests`) and written back;
* **a backup of ``genesis.save``** left by a killed save: settled by the next save (:func:`settle_backup`).

A reader never does any of this on disk (:mod:`.reader`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ..core.errors import StoreLockedError
from ..core.manifest import Manifest
from ..core.names import BACKUP_SUFFIX, intent_name, intent_target, is_reserved, is_temp_name
from ..core.records import CheckpointRecord, Stamp
from . import directory, manifests, markers
from .backends import Conflict
from .location import Location
from .lock import StoreLock

log = logging.getLogger(__name__)


def is_ours(loc: Location, name: str) -> bool:
    """Whether the unlisted ``name`` is provably the store's own under that name (an uncommitted leftover):
    then it may be written over; anything else at an unlisted name never is."""
    why = "checking a name to write"
    if loc.is_tree(name):
        return manifests.adopt_directory(loc, name, why) is not None
    return manifests.written_here(name, manifests.embedded_fields(loc, name, why))


def settle_backup(loc: Location, manifest: Manifest, name: str) -> bool:
    """Settle a ``genesis.save`` of ``name`` that was killed while ``<name>.genesis.bak`` existed (call under
    the lock); True if ``name`` was restored from it.

    The manifest is the commit point: if ``name`` no longer matches its record but the backup does, the new
    content never committed and the backup is put back. Otherwise the backup is stale and removed.
    """
    backup = name + BACKUP_SUFFIX
    if not loc.exists(backup):
        return False
    record = manifest.get(name)
    restored = False
    if record is not None:
        current = loc.checksum(name) if loc.exists(name) else None
        if current != record.stamp and loc.checksum(backup) == record.stamp:
            loc.commit_strategy.copy(loc.path(backup), loc.path(name))
            log.warning(
                "%s did not match its manifest record (a save was interrupted); restored the committed "
                "version from %s",
                loc.url_for(name),
                loc.url_for(backup),
            )
            restored = True
    loc.discard([backup], "the backup")
    return restored


def _stamp(loc: Location, name: str, tree: bool) -> Stamp | None:
    try:
        return directory.tree_stamp(loc, name) if tree else loc.checksum(name)
    except FileNotFoundError:
        return None


def _twin(loc: Location, manifest: Manifest, old: CheckpointRecord) -> str | None:
    """Another committed file that still holds exactly the bytes of ``old`` (a copy of it), if there is one."""
    for record in manifest.sorted():
        if record.name != old.name and record.files is None and record.stamp == old.stamp:
            try:
                if loc.checksum(record.name) == old.stamp:
                    return record.name
            except FileNotFoundError:
                continue
    return None


def settle_markers(
    loc: Location, manifest: Manifest, names: set[str], present: dict[str, bool]
) -> tuple[Manifest, list[str]]:
    """Resolve the intent markers of ``names``; returns the new manifest and the names removed.

    ``present``: what the directory holds (name: is a directory).
    """
    removed: list[str] = []
    for name in sorted(names):
        found = markers.read(loc, name)
        new, parsed = (None, False) if found is None else (found.record, True)
        old = manifest.get(name)
        if name not in present:
            loc.discard([intent_name(name)], "intent marker")
            continue
        tree = present[name]
        current = _stamp(loc, name, tree) if (new is not None or old is not None) else None
        if old is not None:
            if current == old.stamp or not parsed:
                pass  # the new bytes never became visible (or the commit completed): the record is right
            elif new is not None and current == new.stamp:
                twin = None if tree else _twin(loc, manifest, old)
                if twin is not None:
                    # The transaction never committed: where its old bytes are still committed under another
                    # name (best_model.pth is a copy of a rolling checkpoint), the name gets them back.
                    loc.commit_strategy.copy(loc.path(twin), loc.path(name), size=old.size)
                    log.warning(
                        "%s was being replaced by a transaction that never committed; its committed content is "
                        "back (from %s)",
                        loc.url_for(name),
                        twin,
                    )
                else:
                    manifest = manifest.with_record(new.with_changes(role=old.role, seq=manifest.next_seq))
                    log.warning(
                        "%s was being replaced when its writer stopped; the new content is complete and is used",
                        loc.url_for(name),
                    )
            else:
                log.warning(
                    "%s changed during an interrupted commit and cannot be recovered; resume will skip it",
                    loc.url_for(name),
                )
        elif new is None or current == new.stamp:
            log.warning("removing %s: written but never committed by a run that stopped", loc.url_for(name))
            gone = loc.discard_tree(name) if tree else bool(loc.discard([name], "uncommitted file"))
            if not gone:
                continue  # keep the proof for the next holder
            removed.append(name)
        else:
            log.warning("%s is not what its writer announced: left alone", loc.url_for(name))
        loc.discard([intent_name(name)], "intent marker")
    return manifest, removed


def finish_deletions(
    loc: Location, manifest: Manifest, entries: dict[str, bool]
) -> tuple[Manifest, list[str]]:
    """Remove the files of a deletion a writer left half-done, only while they are what was deleted.

    ``entries``: what the directory holds (name: is a directory). Returns the manifest without the entries
    that are settled (the file is gone, or was left alone) and the names removed.
    """
    removed: list[str] = []
    failed: set[str] = set()
    for name, stamp in sorted(manifest.deleting.items()):
        if name in manifest.records or name not in entries:
            continue
        tree = entries[name]
        if stamp is None:  # an entry of an earlier version: no stamp, so the file must prove itself ours
            ours = tree or manifests.written_here(
                name, manifests.embedded_fields(loc, name, "finishing a deletion")
            )
        else:
            ours = _stamp(loc, name, tree) == stamp or (tree and directory.remains_of(loc, name, stamp))
        if not ours:
            log.warning(
                "left %s in place: it is no longer the checkpoint that was deleted (put back by hand?)",
                loc.url_for(name),
            )
        elif loc.discard_tree(name) if tree else loc.discard([name], "old checkpoint"):
            removed.append(name)
        else:
            failed.add(name)  # tried again by the next holder
    if removed:
        log.warning("removed %s, left behind by an interrupted deletion", ", ".join(removed))
    return manifest.deleted(set(manifest.deleting) - failed), removed


@dataclass(frozen=True)
class TakeOver:
    """What the holder found and did when it took the lock (see :func:`take_over`)."""

    manifest: Manifest
    tag: Any
    #: Names in the directory that the manifest does not list and that were left alone (None: not listed).
    unlisted: set[str] | None
    removed: list[str]


def take_over(loc: Location, lock: StoreLock) -> TakeOver:
    """The holder's start-up, right after it took ``lock``: settle what a stopped writer left, and write the
    manifest if that changed it, or if a stale lock was taken over (that write fences the former holder
    out: its own manifest write is conditional on the version it read)."""
    manifest, tag, dirty = manifests.read_manifest(loc)
    removed: list[str] = []
    unlisted: set[str] | None = None
    if loc.conduct.sweeps:
        entries = loc.list_entries()
        present = {n: tree for n, tree in entries.items() if not is_temp_name(n)}
        announced = {t for n in entries if (t := intent_target(n)) is not None}
        if announced:
            manifest, gone = settle_markers(loc, manifest, announced, present)
            removed += gone
            dirty = True
        if manifest.deleting:
            left = {n: t for n, t in present.items() if n not in removed}
            settled, gone = finish_deletions(loc, manifest, left)
            dirty |= settled != manifest
            manifest = settled
            removed += gone
        for name, tree in entries.items():
            if not is_temp_name(name) or intent_target(name) is not None:
                continue
            if loc.discard_tree(name) if tree else loc.discard([name], "temporary file"):
                removed.append(name)
        unlisted = {
            n for n in present if n not in removed and n not in manifest.records and not is_reserved(n)
        }
        if removed:
            log.info("swept %d stale file(s) in %s", len(removed), loc.url)
    if dirty or lock.took_over:
        token = lock.info.token if lock.info else None
        manifest = replace(manifest, generation=manifest.generation + 1, writer=token)
        data = manifest.encode()
        try:
            if tag is None:
                tag = loc.objects.create(loc.manifest_path, data)
            else:
                tag = loc.objects.replace(loc.manifest_path, data, tag)
        except Conflict as e:
            raise StoreLockedError(f"the manifest of {loc.url!r} changed while this run took its lock") from e
    return TakeOver(manifest, tag, unlisted, removed)
