"""Reading the manifest, and rebuilding it from the files when it is missing or unreadable.

A rebuild adopts only what the loc wrote *under that name*: a file records the name it was written as
(with a write id), so a user's copy under another name (``cp checkpoint_epoch_2.pth keep_for_paper.pth``) is
never adopted, nor deleted later. Copies the loc makes itself go to ``best_model.pth`` and ``version_*.pth``
and are adopted under those names. A directory checkpoint is adopted from the record it carries
(``.genesis_record.json``). A file whose embedded record is malformed is skipped with a warning, the rest is
rebuilt; a name with an intent marker was never committed and is left to the holder of the lock.

A rebuild never writes: a reader keeps it in memory, the holder of the lock writes it back
(:mod:`.recovery`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

from ..core.errors import CheckpointCorruptError, ManifestError, UnsafeCheckpointError
from ..core.manifest import Manifest
from ..core.names import MANIFEST_NAME, epoch_of_name, intent_target, is_copy_name, is_reserved, role_of_name
from ..core.records import METADATA_KEY, CheckpointRecord, Stamp, record_from_embedded
from . import directory, loading
from .location import Location

log = logging.getLogger(__name__)


def read_manifest(loc: Location) -> tuple[Manifest, Any, bool]:
    """The manifest as the loc holds it now, its version tag (None: there is no manifest file), and
    whether it was rebuilt or settled here (so that a holder must write it back).

    Raises:
        ManifestError: the manifest was written by a newer format version (never rebuilt over).
        OSError: the directory cannot be read (permissions, network): never mistaken for "empty".
    """
    with loc.storage_errors("read"):
        found = loc.objects.read(loc.manifest_path)
    display = loc.url_for(MANIFEST_NAME)
    if found is None:
        if not loc.conduct.rebuilds or not any(not is_reserved(n) for n in loc.list_names()):
            return Manifest(), None, False
        log.warning("manifest %s is missing; rebuilding it from the checkpoint files", display)
        return rebuild(loc), None, True
    try:
        manifest = Manifest.decode(found.data, display)
    except ManifestError as e:
        if e.newer_format or not loc.conduct.rebuilds:
            raise
        log.warning("%s; rebuilding it from the checkpoint files", str(e))
        return rebuild(loc), found.tag, True
    if manifest.replacing:
        return settle_legacy_replacements(loc, manifest), found.tag, True
    return manifest, found.tag, False


# ---------------------------------------------------------------------------------------- embedded records
def _loaded_fields(loc: Location, name: str, why: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether the file ``name`` loads (weights-only), and the record fields it carries if any.

    A file that would need to run code to load is never trusted here. On local disks mmap avoids reading the
    tensors: only the small metadata dict is needed.
    """
    try:
        obj = loading.load_file(loc, name, None, mmap=True)
    except (CheckpointCorruptError, UnsafeCheckpointError) as e:
        log.warning("%s: skipping %s (%s)", why, loc.url_for(name), str(e))
        return False, None
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    return True, meta if isinstance(meta, dict) else None


def embedded_fields(loc: Location, name: str, why: str) -> dict[str, Any] | None:
    """The record fields the file ``name`` carries, or None (none, or it does not load: a warning then)."""
    return _loaded_fields(loc, name, why)[1]


def written_here(name: str, meta: Any) -> bool:
    """Whether a file under ``name`` carrying ``meta`` is the store's own file *under that name*.

    Files written since the embedded ``name`` exists say so; a file of an earlier version qualifies if its
    name is one of ours and agrees with its embedded role and epoch. Copies the loc makes itself
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


def adopt_file(loc: Location, name: str, stamp: Stamp, why: str) -> CheckpointRecord | None:
    """A record for the file ``name`` from what it embeds, if it is the store's own under that name; for a
    loc that adopts standard names (``CheckpointManager``), also a file of the original utility."""
    loads, meta = _loaded_fields(loc, name, why)
    if meta is None:
        role = role_of_name(name)
        if not (loads and loc.conduct.adopts_standard_names and role in _UTILITY_ROLES):
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
        log.warning("%s: skipping %s: its embedded record is malformed (%s)", why, loc.url_for(name), str(e))
        return None


def adopt_directory(loc: Location, name: str, why: str) -> CheckpointRecord | None:
    """A record for the directory ``name`` from the record it carries, if it is the store's own."""
    data = directory.read_record(loc, name)
    if data is None:
        return None
    try:
        record = CheckpointRecord.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: skipping %s: its embedded record is malformed (%s)", why, loc.url_for(name), str(e))
        return None
    if record.files is None or not (record.name == name or is_copy_name(name)):
        return None
    return record.with_changes(name=name, role=role_of_name(name, default=record.role), seq=0)


def rebuild(loc: Location) -> Manifest:
    """A manifest made from the records the checkpoints carry (see the module doc). Never writes."""
    found: list[CheckpointRecord] = []
    why = "rebuilding manifest"
    entries = loc.list_entries()
    # A name with an intent marker was being written and never committed (or is being written right now).
    announced = {t for n in entries if (t := intent_target(n)) is not None}
    for name, tree in entries.items():
        if is_reserved(name) or name in announced:
            continue
        record = adopt_directory(loc, name, why) if tree else adopt_file(loc, name, loc.checksum(name), why)
        if record is not None:
            found.append(record)
    foreign = [r.name for r in found if not r.versions and r.files is None]
    if foreign and loc.conduct.adopts_standard_names:
        log.warning(
            "%s had no manifest: adopted %d existing checkpoint file(s) as they are now (%s)",
            loc.url,
            len(foreign),
            ", ".join(foreign),
        )
    # Commit order is not recoverable from files; creation time (stored inside each file, not the
    # filesystem's mtime) is the best substitute.
    manifest = Manifest()
    for seq, rec in enumerate(sorted(found, key=lambda r: (r.created, r.name)), start=1):
        manifest = manifest.with_record(rec.with_changes(seq=seq))
    return manifest


def settle_legacy_replacements(loc: Location, manifest: Manifest) -> Manifest:
    """Resolve the ``replacing`` list an earlier version's writer left; returns a manifest without it."""
    for name in sorted(manifest.replacing):
        old = manifest.get(name)
        if old is None:
            continue
        if old.is_directory:
            manifest = _settle_legacy_directory(loc, manifest, old)
            continue
        try:
            stamp = loc.checksum(name)
        except FileNotFoundError:
            continue  # resume reports it as missing, like any other
        if stamp == old.stamp:
            continue
        new = adopt_file(loc, name, stamp, "settling a replacement")
        if new is None:
            log.warning("%s changed during an interrupted commit and cannot be recovered", loc.url_for(name))
            continue
        manifest = manifest.with_record(new.with_changes(role=old.role, seq=manifest.next_seq))
        log.warning(
            "%s was being replaced when its writer stopped; the new content is complete and is used",
            loc.url_for(name),
        )
    return replace(manifest, replacing=frozenset(), incoming={})


def _settle_legacy_directory(loc: Location, manifest: Manifest, old: CheckpointRecord) -> Manifest:
    # Version 2 exchanged the two trees atomically and carried the new tree's record in ``incoming``.
    if _tree_matches(loc, old):
        return manifest
    new = manifest.incoming.get(old.name)
    if new is not None and _tree_matches(loc, new):
        log.warning(
            "%s was being replaced when its writer stopped; the new directory is complete and is used",
            loc.url_for(old.name),
        )
        return manifest.with_record(new.with_changes(role=old.role, seq=manifest.next_seq))
    log.warning("%s changed during an interrupted commit and cannot be recovered", loc.url_for(old.name))
    return manifest


def _tree_matches(loc: Location, record: CheckpointRecord) -> bool:
    try:
        directory.verify(loc, record)
    except (CheckpointCorruptError, FileNotFoundError):
        return False
    return True
