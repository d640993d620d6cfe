"""Recovery after a writer stopped mid-commit: recorded, never inferred from names; each step says so in a warning.

What a stopped writer can leave, and what the next holder of the lock does about it (:func:`take_over`):

* **temporary files** (``.genesis-tmp-*``): removed;
* **intent markers** of a transaction that never committed: a new name under which the bytes match the
  marker's record is an orphan, removed; a committed name that was being replaced holds either its old bytes
  (the marker goes) or the complete new bytes the marker describes, which are adopted with their record;
* **``deleting`` entries** of a deletion left half-done: a file is removed only if its size and checksum are
  still those of the checkpoint that was deleted; a file the user has put back under the name is left alone;
* **a missing or unreadable manifest** (:func:`rebuild`): rebuilt from the record each checkpoint carries
  (``"genesis_ckpt"`` inside a file, ``.genesis_record.json`` inside a directory). Only what the store wrote
  *under that name* is adopted: a file records the name it was written as, so a user's copy under another
  name (``cp checkpoint_epoch_2.pth keep_for_paper.pth``) is never adopted, nor deleted later. Copies the
  store makes itself go to ``best_model.pth`` and ``version_*.pth`` and are adopted under those names. A
  file whose embedded record is malformed is skipped with a warning, the rest is rebuilt.

A reader never does any of this on disk: it rebuilds a lost manifest in memory and checks a replaced file
against its marker when it loads it (:mod:`.reader`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import directory
from .backends import Conflict
from .errors import CheckpointCorruptError, StoreLockedError, UnsafeCheckpointError
from .manifest import Manifest
from .names import (
    BACKUP_SUFFIX,
    epoch_of_name,
    intent_name,
    intent_target,
    is_copy_name,
    is_reserved,
    is_temp_name,
    role_of_name,
)
from .records import METADATA_KEY, CheckpointRecord, Stamp, record_from_embedded

if TYPE_CHECKING:
    from .reader import StoreReader
    from .store import CheckpointStore
    from .writers import DirectoryWriter

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- embedded records
def _loaded_fields(store: StoreReader, name: str, why: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether the file ``name`` loads (weights-only), and the record fields it carries if any.

    A file that would need to run code to load is never trusted here. On local disks mmap avoids reading the
    tensors: only the small metadata dict is needed.
    """
    try:
        obj = store.load(name, verify=False, mmap=True)
    except (CheckpointCorruptError, UnsafeCheckpointError) as e:
        log.warning("%s: skipping %s (%s)", why, store.url_for(name), e)
        return False, None
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    return True, meta if isinstance(meta, dict) else None


def embedded_fields(store: StoreReader, name: str, why: str) -> dict[str, Any] | None:
    """The record fields the file ``name`` carries, or None (none, or it does not load: a warning then)."""
    return _loaded_fields(store, name, why)[1]


def written_here(name: str, meta: Any) -> bool:
    """Whether a file under ``name`` carrying ``meta`` is the store's own file *under that name*.

    Files written since the embedded ``name`` exists say so; a file of an earlier version qualifies if its
    name is one of ours and agrees with its embedded role and epoch. Copies the store makes itself
    (``best_model.pth``, versions) carry their source's fields and qualify by their name.
    """
    if not isinstance(meta, dict):
        return False
    if is_copy_name(name) or meta.get("name") == name:
        return True
    if "name" in meta:
        return False  # written under another name: a copy someone made
    implied = role_of_name(name, default="")
    return implied == meta.get("role") and epoch_of_name(name) in (None, meta.get("epoch"))


#: The standard names the original Genesis utility wrote, adopted (by a manager) from a directory without a
#: manifest even though they carry no record of their own.
_UTILITY_ROLES = ("best", "epoch", "interrupt")


def adopt_file(store: StoreReader, name: str, stamp: Stamp, why: str) -> CheckpointRecord | None:
    """A record for the file ``name`` from what it embeds, if it is the store's own under that name; for a
    store that adopts standard names (``CheckpointManager``), also a file of the original utility."""
    loads, meta = _loaded_fields(store, name, why)
    if meta is None:
        role = role_of_name(name)
        if not (loads and store.adopts_standard_names and role in _UTILITY_ROLES):
            return None
        return CheckpointRecord(
            name, role, stamp.size, stamp.checksum, created=time.time(), seq=0, epoch=epoch_of_name(name)
        )
    if not written_here(name, meta):
        return None
    role = role_of_name(name, default=str(meta.get("role", "manual")))
    try:
        return record_from_embedded(meta, name, stamp.size, stamp.checksum, role)
    except (TypeError, ValueError, KeyError) as e:
        log.warning("%s: skipping %s: its embedded record is malformed (%s)", why, store.url_for(name), e)
        return None


def adopt_directory(store: StoreReader, name: str, why: str) -> CheckpointRecord | None:
    """A record for the directory ``name`` from the record it carries, if it is the store's own."""
    data = directory.read_record(store, name)
    if data is None:
        return None
    try:
        record = CheckpointRecord.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: skipping %s: its embedded record is malformed (%s)", why, store.url_for(name), e)
        return None
    if record.files is None or not (record.name == name or is_copy_name(name)):
        return None
    return record.with_changes(name=name, role=role_of_name(name, default=record.role), seq=0)


def rebuild(store: StoreReader) -> Manifest:
    """A manifest made from the records the checkpoints carry (see the module doc). Never writes."""
    found: list[CheckpointRecord] = []
    why = "rebuilding manifest"
    entries = store.list_entries()
    # A name with an intent marker was being written and never committed (or is being written right now).
    announced = {t for n in entries if (t := intent_target(n)) is not None}
    for name, tree in entries.items():
        if is_reserved(name) or name in announced:
            continue
        if tree:
            record = adopt_directory(store, name, why)
        else:
            record = adopt_file(store, name, store.checksum(name), why)
        if record is not None:
            found.append(record)
    foreign = [r.name for r in found if not r.versions and r.files is None]
    if foreign and store.adopts_standard_names:
        log.warning(
            "%s had no manifest: adopted %d existing checkpoint file(s) as they are now (%s)",
            store.url,
            len(foreign),
            ", ".join(foreign),
        )
    # Commit order is not recoverable from files; creation time (stored inside each file, not the
    # filesystem's mtime) is the best substitute.
    manifest = Manifest()
    for seq, rec in enumerate(sorted(found, key=lambda r: (r.created, r.name)), start=1):
        manifest = manifest.with_record(rec.with_changes(seq=seq))
    return manifest


def settle_legacy_replacements(store: StoreReader, manifest: Manifest) -> Manifest:
    """Resolve the ``replacing`` list an earlier version's writer left; returns a manifest without it."""
    for name in sorted(manifest.replacing):
        old = manifest.get(name)
        if old is None or old.is_directory:
            continue
        try:
            stamp = store.checksum(name)
        except FileNotFoundError:
            continue  # resume reports it as missing, like any other
        if stamp == old.stamp:
            continue
        new = adopt_file(store, name, stamp, "settling a replacement")
        if new is None:
            log.warning(
                "%s changed during an interrupted commit and cannot be recovered", store.url_for(name)
            )
            continue
        manifest = manifest.with_record(new.with_changes(role=old.role, seq=manifest.next_seq))
        log.warning(
            "%s was being replaced when its writer stopped; the new content is complete and is used",
            store.url_for(name),
        )
    return replace(manifest, replacing=frozenset())


def settle_backup(store: CheckpointStore, manifest: Manifest, name: str) -> bool:
    """Settle a ``genesis.save`` of ``name`` that was killed while ``<name>.genesis.bak`` existed (call under
    the lock); True if ``name`` was restored from it.

    The manifest is the commit point: if ``name`` no longer matches its record but the backup does, the new
    content never committed and the backup is put back. Otherwise the backup is stale and removed.
    """
    backup = name + BACKUP_SUFFIX
    if not store.exists(backup):
        return False
    record = manifest.get(name)
    restored = False
    if record is not None:
        current = store.checksum(name) if store.exists(name) else None
        if current != record.stamp and store.checksum(backup) == record.stamp:
            store.commit_strategy.copy(store.path(backup), store.path(name))
            log.warning(
                "%s did not match its manifest record (a save was interrupted); restored the committed "
                "version from %s",
                store.url_for(name),
                store.url_for(backup),
            )
            restored = True
    store.discard([backup], "the backup")
    return restored


def _stamp(store: StoreReader, name: str, tree: bool) -> Stamp | None:
    try:
        return directory.tree_stamp(store, name) if tree else store.checksum(name)
    except FileNotFoundError:
        return None


def _marker(store: StoreReader, name: str) -> tuple[CheckpointRecord | None, bool]:
    """The record an intent marker announces and whether it is one at all (earlier versions wrote empty ones)."""
    data = store.read_small(intent_name(name))
    if not data:
        return None, False
    try:
        return CheckpointRecord.from_json(json.loads(data)["record"]), True
    except (ValueError, KeyError, TypeError):
        return None, True


def settle_markers(
    store: CheckpointStore, manifest: Manifest, names: set[str], present: dict[str, bool]
) -> tuple[Manifest, list[str]]:
    """Resolve the intent markers of ``names``; returns the new manifest and the names removed.

    ``present``: what the directory holds (name: is a directory).
    """
    removed: list[str] = []
    for name in sorted(names):
        new, parsed = _marker(store, name)
        old = manifest.get(name)
        if name not in present:
            store.discard([intent_name(name)], "intent marker")
            continue
        tree = present[name]
        current = _stamp(store, name, tree) if (new is not None or old is not None) else None
        if old is not None:
            if current == old.stamp or not parsed:
                pass  # the new bytes never became visible (or the commit completed): the record is right
            elif new is not None and current == new.stamp:
                manifest = manifest.with_record(new.with_changes(role=old.role, seq=manifest.next_seq))
                log.warning(
                    "%s was being replaced when its writer stopped; the new content is complete and is used",
                    store.url_for(name),
                )
            else:
                log.warning(
                    "%s changed during an interrupted commit and cannot be recovered; resume will skip it",
                    store.url_for(name),
                )
        elif new is None or current == new.stamp:
            log.warning("removing %s: written but never committed by a run that stopped", store.url_for(name))
            gone = store.discard_tree(name) if tree else bool(store.discard([name], "uncommitted file"))
            if not gone:
                continue  # keep the proof for the next holder
            removed.append(name)
        else:
            log.warning("%s is not what its writer announced: left alone", store.url_for(name))
        store.discard([intent_name(name)], "intent marker")
    return manifest, removed


def finish_deletions(
    store: CheckpointStore, manifest: Manifest, entries: dict[str, bool]
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
            ours = tree or written_here(name, embedded_fields(store, name, "finishing a deletion"))
        else:
            ours = _stamp(store, name, tree) == stamp
        if not ours:
            log.warning(
                "left %s in place: it is no longer the checkpoint that was deleted (put back by hand?)",
                store.url_for(name),
            )
        elif store.discard_tree(name) if tree else store.discard([name], "old checkpoint"):
            removed.append(name)
        else:
            failed.add(name)  # tried again by the next holder
    if removed:
        log.warning("removed %s, left behind by an interrupted deletion", ", ".join(removed))
    return manifest.deleted(set(manifest.deleting) - failed), removed


def take_over(store: CheckpointStore, writer: DirectoryWriter) -> list[str]:
    """The holder's start-up, right after it took the lock: settle what a stopped writer left, write the
    manifest if that changed it (or if a stale lock was taken over: that write fences the former holder out).
    Returns the names removed."""
    manifest, tag, dirty = store.read_manifest()
    removed: list[str] = []
    if store.sweeps:
        entries = store.list_entries()
        present = {n: tree for n, tree in entries.items() if not is_temp_name(n)}
        markers = {t for n in entries if (t := intent_target(n)) is not None}
        if markers:
            manifest, gone = settle_markers(store, manifest, markers, present)
            removed += gone
            dirty = True
        if manifest.deleting:
            settled, gone = finish_deletions(
                store, manifest, {n: t for n, t in present.items() if n not in removed}
            )
            dirty |= settled != manifest
            manifest = settled
            removed += gone
        for name, tree in entries.items():
            if not is_temp_name(name) or intent_target(name) is not None:
                continue
            if store.discard_tree(name) if tree else store.discard([name], "temporary file"):
                removed.append(name)
        writer.unlisted = {
            n for n in present if n not in removed and n not in manifest.records and not is_reserved(n)
        }
        if removed:
            log.info("swept %d stale file(s) in %s", len(removed), store.url)
    assert writer.lock is not None
    if dirty or writer.lock.took_over:
        token = writer.lock.info.token if writer.lock.info else None
        manifest = replace(manifest, generation=manifest.generation + 1, writer=token)
        data = manifest.encode()
        try:
            tag = (
                store.objects.create(store.manifest_path, data)
                if tag is None
                else store.objects.replace(store.manifest_path, data, tag)
            )
        except Conflict as e:
            raise StoreLockedError(
                f"the manifest of {store.url!r} changed while this run took its lock"
            ) from e
    writer.manifest, writer.tag = manifest, tag
    writer.fresh = True  # read under this lock just now: the first transaction need not read it again
    return removed
