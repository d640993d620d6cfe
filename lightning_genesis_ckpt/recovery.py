"""Recovery paths after a writer died mid-commit. Each one says so in a warning; none runs in a healthy store.

* :func:`rebuild` -- the manifest is missing or unreadable: make one from the record each checkpoint carries.
* :func:`settle_replacements` -- the writer died while replacing a committed file in place
  (``best_model.pth``, the interrupt snapshot): the manifest lists the name under ``replacing``; the file holds
  either the old content (its record is still right) or the complete new content (commits are atomic), which
  gets a record made from the metadata inside it. A directory holds the old tree or the new one (the two
  are exchanged atomically); the new tree's record is the manifest's ``incoming`` entry.
* :func:`finish_deletions` -- the writer died after the manifest forgot rolled-out checkpoints but before their
  files were removed: the manifest lists them under ``deleting``, and they are removed now.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from . import directory
from .errors import CheckpointCorruptError, UnsafeCheckpointError
from .manifest import CheckpointRecord, Manifest, role_of_name

if TYPE_CHECKING:
    from .reader import StoreReader
    from .store import CheckpointStore

log = logging.getLogger(__name__)

#: Key under which each checkpoint written by the store carries its own record fields.
METADATA_KEY = "genesis_ckpt"


def record_from_file(
    store: StoreReader, name: str, size: int, checksum: str, role: str | None = None, *, why: str
) -> CheckpointRecord | None:
    """A record for ``name`` from the metadata inside it (``seq`` 0), or None if it has none or won't load.

    The file is loaded weights-only: a file that would need to run code is never trusted here. ``why`` starts
    the warning logged for a file that cannot be loaded.
    """
    try:
        # Only the small metadata dict is needed: on local disks mmap avoids reading the tensors.
        obj = store._load_raw(name, map_location="cpu", trusted=False, mmap=store.local)
    except (CheckpointCorruptError, UnsafeCheckpointError) as e:
        log.warning("%s: skipping %s (%s)", why, store.url_for(name), e)
        return None
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    return CheckpointRecord(
        name=name,
        role=role or role_of_name(name, default=str(meta.get("role", "manual"))),
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


def rebuild(store: StoreReader) -> Manifest:
    """A manifest made from the metadata each checkpoint file carries.

    Files without our metadata (other tools' files, user files) are left out and never touched.
    """
    found: list[CheckpointRecord] = []
    for name in store._list_names():
        if not store._maybe_checkpoint(name):
            continue
        try:
            size, checksum = store._checksum(name)
        except OSError as e:
            log.warning("rebuilding manifest: skipping %s (%s)", store.url_for(name), e)
            continue
        record = record_from_file(store, name, size, checksum, why="rebuilding manifest")
        if record is not None:
            found.append(record)
    # Commit order is not recoverable from files; creation time (stored inside each file, not the
    # filesystem's mtime) is the best substitute.
    manifest = Manifest()
    for seq, rec in enumerate(sorted(found, key=lambda r: (r.created, r.name)), start=1):
        manifest = manifest.with_record(rec.with_changes(seq=seq))
    return manifest


def settle_replacements(store: StoreReader, manifest: Manifest) -> Manifest:
    """Resolve the names a dead writer was replacing in place; returns a manifest with ``replacing`` empty."""
    for name in sorted(manifest.replacing):
        old = manifest.get(name)
        if old is None:
            continue
        if old.is_directory:
            if directory.matches(store, old):
                continue  # the new tree never took the name: the old record is right
            new = manifest.incoming.get(name)
            if new is not None and directory.matches(store, new):
                # The exchange put the complete new tree in place before the writer stopped.
                manifest = manifest.with_record(new.with_changes(seq=manifest.next_seq))
                log.warning(
                    "%s was being replaced when its writer stopped; the new directory is complete and is used",
                    store.url_for(name),
                )
                continue
            log.warning(
                "%s changed during an interrupted commit and matches neither its old nor its new record; "
                "resume will skip it",
                store.url_for(name),
            )
            continue
        try:
            size, checksum = store._checksum(name)
        except FileNotFoundError:
            continue  # resume reports it as missing, like any other
        if (size, checksum) == (old.size, old.checksum):
            continue  # the new content never became visible: the old record is right
        new = record_from_file(store, name, size, checksum, role=old.role, why="settling a replacement")
        if new is None:
            log.warning(
                "%s changed during an interrupted commit and cannot be recovered", store.url_for(name)
            )
            continue
        manifest = manifest.with_record(new.with_changes(seq=manifest.next_seq))
        log.warning(
            "%s was being replaced when its writer stopped; the new content is complete and is used",
            store.url_for(name),
        )
    return replace(manifest, replacing=frozenset(), incoming={})


def finish_deletions(store: CheckpointStore) -> list[str]:
    """Remove files the manifest un-committed but a dead writer left; returns their names.

    The list usually names files that are gone already: a writer records their removal only with its next
    manifest write, so the last deletion of every run stays listed until the next start clears it here.
    """
    manifest = store.manifest()
    if not manifest.deleting:
        return []
    leftover = sorted(n for n in manifest.deleting - set(manifest.records) if store.fs.exists(store.path(n)))
    trees = [n for n in leftover if store.fs.isdir(store.path(n))]  # directory checkpoints
    removed = store._remove_files(leftover, trees)
    if removed:
        log.warning("removed %s, left behind by an interrupted deletion", ", ".join(removed))
    failed = set(leftover) - set(removed)
    try:
        store._write_manifest(manifest.deleted(manifest.deleting - failed))
    except OSError as e:
        log.warning("could not update the manifest of %s: %s", store.url, e)
    return removed
