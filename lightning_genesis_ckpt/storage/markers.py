"""Intent markers: ``.genesis-tmp-intent-<name>``, written by a transaction right before it publishes
``name``, holding the record the published bytes have (see :mod:`.transaction`).

A marker is how a crash at any point of a commit stays recoverable without a manifest write before the
bytes change: the next holder finds an orphan it may remove (the bytes match the marker) or a replaced name
whose new bytes the marker describes (see :mod:`.recovery`), and a reader checks a replaced file against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..core.names import intent_name
from ..core.records import CheckpointRecord
from .location import Location


@dataclass(frozen=True)
class Marker:
    """What a marker says: the record of the new bytes (None: unreadable, or written by an earlier version,
    whose markers were empty), and the record they replace."""

    record: CheckpointRecord | None
    replaces: CheckpointRecord | None = None


def encode(record: CheckpointRecord, replaces: CheckpointRecord | None) -> bytes:
    """The content of a marker."""
    doc = {"record": record.to_json(), "replaces": None if replaces is None else replaces.to_json()}
    return json.dumps(doc, sort_keys=True, allow_nan=False).encode()


def read(loc: Location, name: str) -> Marker | None:
    """The marker of ``name``, or None if there is none."""
    data = loc.read_small(intent_name(name))
    if data is None:
        return None
    try:
        doc = json.loads(data)
        replaces = doc.get("replaces")
        return Marker(
            CheckpointRecord.from_json(doc["record"]),
            None if replaces is None else CheckpointRecord.from_json(replaces),
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return Marker(None)
