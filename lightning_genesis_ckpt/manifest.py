"""The manifest: the store's source of truth, a flat list of typed checkpoint records in one JSON file.

A checkpoint is *committed* once its data file is complete and the manifest lists it. The manifest is
written last, atomically, so a reader sees either the old list or the new one.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .atomicity import is_temp_name
from .errors import ManifestError

MANIFEST_NAME = "genesis_manifest.json"
#: The writer's lock file (see :mod:`lightning_genesis_ckpt.lock`); never a checkpoint.
LOCK_NAME = "genesis.lock"
FORMAT = "lightning-genesis-ckpt/manifest"
#: Version 2 added directory records (``files``). A manifest is written as version 2 only while it lists a
#: directory: a version-1 reader ignores keys it does not know, so it would take a directory record for a
#: file and fail in confusing ways (``IsADirectoryError`` on open, a delete that leaves the files), or on an
#: object store find "no such file" and skip the checkpoint. Seeing version 2 it refuses the whole directory
#: and asks for an upgrade instead (and never rebuilds over it). Stores of plain files stay version 1, so
#: older readers keep reading them.
FORMAT_VERSION = 2
_PLAIN_FORMAT_VERSION = 1

BEST_NAME = "best_model.pth"
INTERRUPT_NAME = "interrupt_checkpoint.pth"
EPOCH_PREFIX = "checkpoint_epoch_"
EPOCH_SUFFIX = ".pth"
_EPOCH_RE = re.compile(rf"^{EPOCH_PREFIX}(\d+){re.escape(EPOCH_SUFFIX)}$")
VERSION_PREFIX = "version_"
VERSION_SUFFIX = ".pth"
_VERSION_RE = re.compile(rf"^{VERSION_PREFIX}(.+){re.escape(VERSION_SUFFIX)}$")

ROLES = ("epoch", "best", "interrupt", "manual", "version")


@dataclass(frozen=True)
class FileEntry:
    """One file inside a directory checkpoint: its byte count and ``"crc32:<8 hex digits>"``."""

    size: int
    checksum: str


def is_relative_file_path(path: object) -> bool:
    """Whether ``path`` is a ``/``-separated relative path that stays inside its directory."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def tree_digest(files: Mapping[str, FileEntry]) -> tuple[int, str]:
    """Total size and a crc32 over the sorted listing: the ``size``/``checksum`` of a directory record.

    Two directories with the same digest hold the same files with the same checksums; it is what the CLI
    shows and what settling an interrupted replacement compares.
    """
    listing = "\n".join(f"{p}\t{e.size}\t{e.checksum}" for p, e in sorted(files.items()))
    return sum(e.size for e in files.values()), f"crc32:{zlib.crc32(listing.encode()) & 0xFFFFFFFF:08x}"


def epoch_name(epoch: int) -> str:
    """The file name of the rolling checkpoint of ``epoch``."""
    return f"{EPOCH_PREFIX}{int(epoch)}{EPOCH_SUFFIX}"


def epoch_of_name(name: str) -> int | None:
    """The epoch number in a rolling checkpoint's file name, or None for any other name."""
    m = _EPOCH_RE.match(name)
    return int(m.group(1)) if m else None


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name that cannot leave its directory."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\x00")


def version_of_name(name: str) -> str | None:
    """The version name in a named version's file name (``version_<name>.pth``), or None."""
    m = _VERSION_RE.match(name)
    return m.group(1) if m else None


def role_of_name(name: str, default: str = "manual") -> str:
    """The role implied by one of our standard file names."""
    if name == BEST_NAME:
        return "best"
    if name == INTERRUPT_NAME:
        return "interrupt"
    if epoch_of_name(name) is not None:
        return "epoch"
    if version_of_name(name) is not None:
        return "version"
    return default


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint file.

    Attributes:
        name: file name inside the store directory.
        role: ``"epoch"``, ``"best"``, ``"interrupt"``, ``"manual"`` or ``"version"`` (a named version).
        epoch: training epoch the state belongs to, if known.
        global_step: optimizer steps taken when the state was captured, if known.
        metrics: monitored and logged scalar metrics at save time.
        size: bytes in the file.
        checksum: ``"crc32:<8 hex digits>"`` of the whole file, computed while writing it.
        created: Unix time of the commit.
        seq: commit order inside this store; larger is newer. Never reused.
        versions: library, Lightning and torch versions that wrote the file.
        monitor: the metric name that ``best`` is judged by, if any.
        files: for a directory checkpoint (sharded strategies: FSDP, DeepSpeed), every file in it by
            relative path; ``size`` and ``checksum`` are then the :func:`tree_digest` of this listing.
            None for a single-file checkpoint.
    """

    name: str
    role: str
    size: int
    checksum: str
    created: float
    seq: int
    epoch: int | None = None
    global_step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    monitor: str | None = None
    files: Mapping[str, FileEntry] | None = None

    @property
    def is_directory(self) -> bool:
        """Whether this checkpoint is a directory of files rather than one file."""
        return self.files is not None

    def metric(self) -> float | None:
        """The value of the monitored metric, if this record has one."""
        if self.monitor is None:
            return None
        return self.metrics.get(self.monitor)

    def with_changes(self, **changes: Any) -> CheckpointRecord:
        """A copy of this record with some fields replaced."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this record."""
        d = asdict(self)
        d["metrics"] = dict(self.metrics)
        d["versions"] = dict(self.versions)
        if self.files is None:
            del d["files"]  # single-file records look exactly as version 1 wrote them
        else:
            d["files"] = {p: {"size": e.size, "checksum": e.checksum} for p, e in sorted(self.files.items())}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CheckpointRecord:
        """Parse one record; raises ``KeyError``/``TypeError``/``ValueError`` when malformed."""
        return cls(
            name=str(d["name"]),
            role=str(d["role"]),
            size=int(d["size"]),
            checksum=str(d["checksum"]),
            created=float(d["created"]),
            seq=int(d["seq"]),
            epoch=None if d.get("epoch") is None else int(d["epoch"]),
            global_step=None if d.get("global_step") is None else int(d["global_step"]),
            metrics={str(k): float(v) for k, v in dict(d.get("metrics") or {}).items()},
            versions={str(k): str(v) for k, v in dict(d.get("versions") or {}).items()},
            monitor=None if d.get("monitor") is None else str(d["monitor"]),
            files=None if d.get("files") is None else _files(d["files"]),
        )


@dataclass(frozen=True)
class Manifest:
    """An immutable snapshot of the manifest: records by name plus the next commit number.

    Two lists make a crash at any point of a commit recoverable (see
    :class:`~lightning_genesis_ckpt.store.CheckpointStore`):

    Attributes:
        replacing: committed names whose file was about to be replaced by new content when this manifest
            was written. Replacing happens in place (``best_model.pth``, the interrupt snapshot), so after a
            crash the file may hold the new content that no record describes yet.
        deleting: names un-committed by this manifest whose files may not be removed yet.
        incoming: for a directory being replaced, the record of its new tree. A file carries its own record
            (the metadata inside it) for recovery to read; a directory does not, so the record travels here.
    """

    records: Mapping[str, CheckpointRecord] = field(default_factory=dict)
    next_seq: int = 1
    replacing: frozenset[str] = frozenset()
    deleting: frozenset[str] = frozenset()
    incoming: Mapping[str, CheckpointRecord] = field(default_factory=dict)

    def get(self, name: str) -> CheckpointRecord | None:
        """The record of ``name``, or None."""
        return self.records.get(name)

    def sorted(self) -> list[CheckpointRecord]:
        """All records, oldest commit first."""
        return sorted(self.records.values(), key=lambda r: r.seq)

    def with_record(self, record: CheckpointRecord) -> Manifest:
        """A new manifest with ``record`` added (or replacing the record of the same name)."""
        records = dict(self.records)
        records[record.name] = record
        name = {record.name}
        return Manifest(
            records,
            max(self.next_seq, record.seq + 1),
            self.replacing - name,
            self.deleting - name,
            _dropped(self.incoming, name),
        )

    def without(self, names: Iterable[str]) -> Manifest:
        """A new manifest without the records of ``names``, which it lists as ``deleting``."""
        drop = set(names)
        records = {n: r for n, r in self.records.items() if n not in drop}
        gone = drop & set(self.records)
        return Manifest(
            records, self.next_seq, self.replacing - drop, self.deleting | gone, _dropped(self.incoming, drop)
        )

    def replacing_file(self, name: str, incoming: CheckpointRecord | None = None) -> Manifest:
        """A new manifest noting that the committed ``name`` is about to get new content (described by
        ``incoming`` for a directory, whose tree carries no record of its own)."""
        pending = dict(self.incoming)
        if incoming is not None:
            pending[name] = incoming
        return replace(self, replacing=self.replacing | {name}, incoming=pending)

    def deleted(self, names: Iterable[str]) -> Manifest:
        """A new manifest that no longer lists ``names`` as ``deleting`` (their files are gone)."""
        return replace(self, deleting=self.deleting - set(names))

    def encode(self) -> bytes:
        """The manifest as UTF-8 JSON."""
        directories = any(r.is_directory for r in self.records.values())
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION if directories else _PLAIN_FORMAT_VERSION,
            "next_seq": self.next_seq,
            "checkpoints": [r.to_json() for r in self.sorted()],
        }
        # Written only when set (``deleting`` may outlive its files until the next start clears it).
        if self.replacing:
            doc["replacing"] = sorted(self.replacing)
        if self.deleting:
            doc["deleting"] = sorted(self.deleting)
        if self.incoming:  # older readers ignore it: they treat the replacement as they always did
            doc["incoming"] = [r.to_json() for _, r in sorted(self.incoming.items())]
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, path: str) -> Manifest:
        """Parse a manifest file's bytes.

        Raises:
            ManifestError: not JSON, not our format, malformed records, or a newer format version
                (``.newer_format`` is set then: such a manifest must not be rebuilt over).
        """
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(path, f"not valid JSON ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(path, "not a lightning-genesis-ckpt manifest")
        version = doc.get("version")
        if not isinstance(version, int):
            raise ManifestError(path, f"invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise ManifestError(
                path,
                f"written by a newer format version {version} (this library reads up to "
                f"{FORMAT_VERSION}); upgrade lightning-genesis-ckpt to use this directory",
                newer_format=True,
            )
        try:
            records = [CheckpointRecord.from_json(r) for r in doc["checkpoints"]]
            next_seq = int(doc.get("next_seq", 1))
            replacing, deleting = (_names(doc.get(key)) for key in ("replacing", "deleting"))
            incoming = [CheckpointRecord.from_json(r) for r in doc.get("incoming") or []]
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(path, f"malformed record ({e!r})") from e
        if version < 2 and any(r.is_directory for r in records):
            raise ManifestError(path, f"directory records need format version 2, the manifest says {version}")
        names = [r.name for r in records]
        # A hostile or damaged manifest must not make the store read, replace or delete anything outside
        # its directory or its own bookkeeping files.
        if any(r.name not in replacing or not r.is_directory for r in incoming):
            raise ManifestError(path, "an incoming record is not a directory being replaced")
        for name in [*names, *replacing, *deleting]:
            if not is_plain_name(name) or name in (MANIFEST_NAME, LOCK_NAME) or is_temp_name(name):
                raise ManifestError(path, f"invalid file name {name!r}: not a plain checkpoint file name")
        if len(set(names)) != len(names):
            raise ManifestError(path, "a file name is listed twice")
        top = max((r.seq for r in records), default=0)
        return cls(
            {r.name: r for r in records},
            max(next_seq, top + 1),
            replacing,
            deleting,
            {r.name: r for r in incoming},
        )


def _dropped(records: Mapping[str, CheckpointRecord], names: Iterable[str]) -> dict[str, CheckpointRecord]:
    drop = set(names)
    return {n: r for n, r in records.items() if n not in drop}


def _names(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise TypeError(f"expected a list of file names, got {value!r}")
    return frozenset(value)


def _files(value: Any) -> dict[str, FileEntry]:
    """Parse a directory record's ``files``; strict about types, and every path must stay inside."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping of relative paths to files, got {value!r}")
    out = {}
    for rel, entry in value.items():
        if not is_relative_file_path(rel):
            raise ValueError(f"invalid path {rel!r} in a directory record: it must stay inside the directory")
        if not isinstance(entry, dict) or set(entry) != {"size", "checksum"}:
            raise TypeError(f"file {rel!r}: expected {{'size': int, 'checksum': str}}, got {entry!r}")
        size, checksum = entry["size"], entry["checksum"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(checksum, str):
            raise TypeError(f"file {rel!r}: expected a size >= 0 and a checksum string, got {entry!r}")
        out[rel] = FileEntry(size, checksum)
    return out
