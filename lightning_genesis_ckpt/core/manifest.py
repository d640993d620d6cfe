"""The manifest: the store's source of truth, a flat list of typed checkpoint records in one JSON file.

A checkpoint is *committed* once its data is complete and the manifest lists it. The manifest is written once
per transaction, last, atomically (see :mod:`lightning_genesis_ckpt.transaction`), so a reader sees either
the old list or the new one.

Format versions. A manifest is written with the lowest version that can express it, so that older readers
keep reading what they can: 1 for plain files; 2 once it lists a directory (``files``: a version-1 reader
would take a directory record for a file); 3 once ``deleting`` entries carry the size and checksum of what
they delete (a version-2 reader would take them for plain names and delete whatever sits there). A reader
refuses a version newer than its own and never rebuilds over it; anything else it cannot read is rebuilt
from the files, with a warning.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ManifestError
from .names import is_plain_name, is_reserved
from .records import CheckpointRecord, Stamp

FORMAT = "lightning-genesis-ckpt/manifest"
FORMAT_VERSION = 3
_DIRECTORY_VERSION = 2
_PLAIN_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """An immutable snapshot of the manifest.

    Attributes:
        records: committed checkpoints by name.
        next_seq: the commit number the next record gets.
        deleting: names this manifest (or an earlier one) un-committed and whose files may still be there, with
            the size and checksum of what was deleted: the file is removed only while it is still that file.
            An entry written by version 2 or earlier has no stamp (None).
        replacing: written by version 2 and earlier only: names a writer was replacing in place when it wrote
            this manifest. Settled when read; a transaction marks replacements with its intent markers instead.
        incoming: written by version 2 only: for a directory in ``replacing``, the record of its new tree.
        generation: how many times the manifest was written; every write has a different one, so a
            conditional write (S3 ``If-Match``) can tell two writes with identical records apart.
        writer: the lock token of the run that wrote it.
    """

    records: Mapping[str, CheckpointRecord] = field(default_factory=dict)
    next_seq: int = 1
    deleting: Mapping[str, Stamp | None] = field(default_factory=dict)
    replacing: frozenset[str] = frozenset()
    incoming: Mapping[str, CheckpointRecord] = field(default_factory=dict)
    generation: int = 0
    writer: str | None = None

    def get(self, name: str) -> CheckpointRecord | None:
        """The record of ``name``, or None."""
        return self.records.get(name)

    def sorted(self) -> list[CheckpointRecord]:
        """All records, oldest commit first."""
        return sorted(self.records.values(), key=lambda r: r.seq)

    def with_record(self, record: CheckpointRecord) -> Manifest:
        """A new manifest with ``record`` added (or replacing the record of the same name)."""
        records = {**self.records, record.name: record}
        deleting = {n: s for n, s in self.deleting.items() if n != record.name}
        return replace(
            self,
            records=records,
            next_seq=max(self.next_seq, record.seq + 1),
            deleting=deleting,
            replacing=self.replacing - {record.name},
            incoming={n: r for n, r in self.incoming.items() if n != record.name},
        )

    def without(self, names: Iterable[str]) -> Manifest:
        """A new manifest without the records of ``names``, which it lists as ``deleting`` with their stamps."""
        drop = set(names)
        gone = {n: r.stamp for n, r in self.records.items() if n in drop}
        records = {n: r for n, r in self.records.items() if n not in drop}
        return replace(
            self,
            records=records,
            deleting={**self.deleting, **gone},
            replacing=self.replacing - drop,
            incoming={n: r for n, r in self.incoming.items() if n not in drop},
        )

    def deleted(self, names: Iterable[str]) -> Manifest:
        """A new manifest that no longer lists ``names`` as ``deleting`` (their files are gone)."""
        done = set(names)
        return replace(self, deleting={n: s for n, s in self.deleting.items() if n not in done})

    def encode(self) -> bytes:
        """The manifest as UTF-8 strict JSON (no NaN or infinity)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": self._version(),
            "next_seq": self.next_seq,
            "generation": self.generation,
            "checkpoints": [r.to_json() for r in self.sorted()],
        }
        if self.writer is not None:
            doc["writer"] = self.writer
        if self.deleting:
            doc["deleting"] = {
                n: None if s is None else {"size": s.size, "checksum": s.checksum}
                for n, s in sorted(self.deleting.items())
            }
        if self.replacing:
            doc["replacing"] = sorted(self.replacing)
        if self.incoming:
            doc["incoming"] = [r.to_json() for _, r in sorted(self.incoming.items())]
        return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    def _version(self) -> int:
        if self.deleting:
            return FORMAT_VERSION
        if any(r.is_directory for r in self.records.values()):
            return _DIRECTORY_VERSION
        return _PLAIN_VERSION

    @classmethod
    def decode(cls, data: bytes, path: str) -> Manifest:
        """Parse a manifest file's bytes.

        Raises:
            ManifestError: anything that is not a manifest this version can read: not JSON (including numbers
                too long to convert and nesting too deep to parse), not our format, malformed records, names
                that would leave the directory; or a newer format version (``.newer_format`` is set then: such
                a manifest must not be rebuilt over).
        """
        try:
            doc = json.loads(data.decode("utf-8"))
        except (
            UnicodeDecodeError,
            ValueError,
            RecursionError,
        ) as e:  # ValueError: JSONDecodeError, huge ints
            raise ManifestError(path, f"not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(path, "not a lightning-genesis-ckpt manifest")
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ManifestError(path, f"invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise ManifestError(
                path,
                f"written by a newer format version {version} (this library reads up to "
                f"{FORMAT_VERSION}); upgrade lightning-genesis-ckpt to use this directory",
                newer_format=True,
            )
        try:
            return cls._parse(doc, version, path)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError, OverflowError) as e:
            raise ManifestError(path, f"malformed record ({type(e).__name__}: {str(e)[:200]})") from e

    @classmethod
    def _parse(cls, doc: dict[str, Any], version: int, path: str) -> Manifest:
        if not isinstance(doc["checkpoints"], list):
            raise TypeError("checkpoints must be a list")
        records = [CheckpointRecord.from_json(r) for r in doc["checkpoints"]]
        next_seq = int(doc.get("next_seq", 1))
        generation = int(doc.get("generation", 0))
        writer = doc.get("writer")
        if writer is not None and not isinstance(writer, str):
            raise TypeError(f"writer must be a string, got {writer!r}")
        deleting = _deleting(doc.get("deleting"), version)
        replacing = _names(doc.get("replacing"))
        incoming = [CheckpointRecord.from_json(r) for r in doc.get("incoming") or []]
        if any(r.name not in replacing or not r.is_directory for r in incoming):
            raise ManifestError(path, "an incoming record is not a directory being replaced")
        if version < _DIRECTORY_VERSION and any(r.is_directory for r in records):
            raise ManifestError(path, f"directory records need format version 2, the manifest says {version}")
        names = [r.name for r in records]
        # A hostile or damaged manifest must not make the store read, replace or delete anything outside
        # its directory or its own bookkeeping files.
        for name in [*names, *replacing, *deleting]:
            if not is_plain_name(name) or is_reserved(name):
                raise ManifestError(path, f"invalid file name {name!r}: not a plain checkpoint file name")
        if len(set(names)) != len(names):
            raise ManifestError(path, "a file name is listed twice")
        top = max((r.seq for r in records), default=0)
        return cls(
            {r.name: r for r in records},
            max(next_seq, top + 1),
            deleting,
            replacing,
            {r.name: r for r in incoming},
            generation,
            writer,
        )


def _names(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise TypeError(f"expected a list of file names, got {value!r}")
    return frozenset(value)


def _deleting(value: Any, version: int) -> dict[str, Stamp | None]:
    if value is None:
        return {}
    if isinstance(value, list) and version < FORMAT_VERSION:
        return dict.fromkeys(_names(value))  # written before stamps existed
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping of deleted names to their size and checksum, got {value!r}")
    out: dict[str, Stamp | None] = {}
    for name, stamp in value.items():
        if stamp is None:
            out[name] = None
            continue
        if not isinstance(stamp, dict) or set(stamp) != {"size", "checksum"}:
            raise TypeError(f"deleting {name!r}: expected {{'size': int, 'checksum': str}}, got {stamp!r}")
        size, checksum = stamp["size"], stamp["checksum"]
        if isinstance(size, bool) or not isinstance(size, int) or not isinstance(checksum, str):
            raise TypeError(f"deleting {name!r}: expected {{'size': int, 'checksum': str}}, got {stamp!r}")
        out[name] = Stamp(size, checksum)
    return out
