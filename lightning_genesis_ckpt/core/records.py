"""Checkpoint records: what the manifest lists about each checkpoint, and what each file carries about itself.

Pure data and pure functions: JSON-ready encodings, and the record a file embeds (``"genesis_ckpt"`` in a checkpoint dict, ``.genesis_record.json`` in a directory), which is what
a lost manifest is rebuilt from.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .names import is_relative_file_path

#: Key under which each checkpoint written by the store carries its own record fields.
METADATA_KEY = "genesis_ckpt"


@dataclass(frozen=True)
class FileEntry:
    """One file inside a directory checkpoint: its byte count and ``"crc32:<8 hex digits>"``."""

    size: int
    checksum: str


@dataclass(frozen=True)
class Stamp:
    """What identifies the bytes under a name: size and checksum (a directory's: its :func:`tree_digest`)."""

    size: int
    checksum: str


def tree_digest(files: Mapping[str, FileEntry]) -> tuple[int, str]:
    """Total size and a crc32 over the sorted listing: the ``size``/``checksum`` of a directory record.

    Two directories with the same digest hold the same files with the same checksums.
    """
    listing = "\n".join(f"{p}\t{e.size}\t{e.checksum}" for p, e in sorted(files.items()))
    return sum(e.size for e in files.values()), f"crc32:{zlib.crc32(listing.encode()) & 0xFFFFFFFF:08x}"


# JSON has no NaN or infinity. These spellings are valid JSON strings, and ``float()`` reads them back
# (so do the manifest readers of earlier versions, which call float() on every metric).
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def metric_to_json(value: float) -> float | str:
    """A metric as JSON can hold it: finite numbers as they are, NaN and infinities as strings."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def metric_from_json(value: Any) -> float:
    """The inverse of :func:`metric_to_json`; raises ``TypeError``/``ValueError`` for anything else."""
    if isinstance(value, str):
        if value not in _NON_FINITE:
            raise ValueError(f"not a metric value: {value!r}")
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a metric value: {value!r}")
    return float(value)


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as records hold them: string names, float values."""
    return {str(k): float(v) for k, v in (metrics or {}).items()}


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer or null, got {value!r}")
    return value


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint.

    Attributes:
        name: file name inside the store directory.
        role: ``"epoch"`` or ``"step"`` (saved on a schedule, subject to retention), ``"best"``,
            ``"interrupt"``, ``"manual"`` or ``"version"`` (a named version).
        epoch: training epoch the state belongs to, if known.
        global_step: optimizer steps taken when the state was captured, if known.
        metrics: monitored and logged scalar metrics at save time.
        size: bytes in the file.
        checksum: ``"crc32:<8 hex digits>"`` of the whole file, computed while writing it.
        created: Unix time the state was saved.
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

    @property
    def stamp(self) -> Stamp:
        """Size and checksum: what the bytes under this record's name must still be."""
        return Stamp(self.size, self.checksum)

    def metric(self) -> float | None:
        """The value of the monitored metric, if this record has one."""
        if self.monitor is None:
            return None
        return self.metrics.get(self.monitor)

    def with_changes(self, **changes: Any) -> CheckpointRecord:
        """A copy of this record with some fields replaced."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this record (strict JSON: non-finite metrics become strings)."""
        d = asdict(self)
        d["metrics"] = {k: metric_to_json(v) for k, v in self.metrics.items()}
        d["versions"] = dict(self.versions)
        if self.files is None:
            del d["files"]  # single-file records look exactly as version 1 wrote them
        else:
            d["files"] = {p: {"size": e.size, "checksum": e.checksum} for p, e in sorted(self.files.items())}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CheckpointRecord:
        """Parse one record; raises ``KeyError``/``TypeError``/``ValueError`` when malformed."""
        if not isinstance(d, Mapping):
            raise TypeError(f"expected a record, got {d!r}")
        size = d["size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TypeError(f"invalid size {size!r}")
        return cls(
            name=_string(d["name"]),
            role=_string(d["role"]),
            size=size,
            checksum=_string(d["checksum"]),
            created=float(d["created"]),
            seq=int(d["seq"]),
            epoch=_optional_int(d.get("epoch")),
            global_step=_optional_int(d.get("global_step")),
            metrics={_string(k): metric_from_json(v) for k, v in _mapping(d.get("metrics")).items()},
            versions={_string(k): _string(v) for k, v in _mapping(d.get("versions")).items()},
            monitor=None if d.get("monitor") is None else _string(d["monitor"]),
            files=None if d.get("files") is None else files_from_json(d["files"]),
        )


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping, got {value!r}")
    return value


def files_from_json(value: Any) -> dict[str, FileEntry]:
    """Parse a directory record's ``files``; strict about types, and every path must stay inside."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping of relative paths to files, got {value!r}")
    out = {}
    for rel, entry in value.items():
        if not is_relative_file_path(rel):
            raise ValueError(f"invalid path {rel!r} in a directory record: it must stay inside the directory")
        if not isinstance(entry, Mapping) or set(entry) != {"size", "checksum"}:
            raise TypeError(f"file {rel!r}: expected {{'size': int, 'checksum': str}}, got {entry!r}")
        size, checksum = entry["size"], entry["checksum"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(checksum, str):
            raise TypeError(f"file {rel!r}: expected a size >= 0 and a checksum string, got {entry!r}")
        out[rel] = FileEntry(size, checksum)
    return out


# ------------------------------------------------------------------------------------ embedded records
def embedded(record: CheckpointRecord, write_id: str) -> dict[str, Any]:
    """The fields a checkpoint carries about itself, under :data:`METADATA_KEY`.

    ``name`` is the name it was written under and ``write_id`` tells this write from every other: a copy of
    the file under another name (``cp checkpoint_epoch_2.pth keep.pth``) is recognisable as a copy.
    """
    return {
        "name": record.name,
        "write_id": write_id,
        "role": record.role,
        "epoch": record.epoch,
        "global_step": record.global_step,
        "metrics": dict(record.metrics),
        "monitor": record.monitor,
        "created": record.created,
        "versions": dict(record.versions),
    }


def record_from_embedded(meta: Any, name: str, size: int, checksum: str, role: str) -> CheckpointRecord:
    """The record for the file ``name`` from the fields it embeds (``seq`` 0).

    Raises:
        TypeError, ValueError, KeyError: the embedded fields are malformed.
    """
    if not isinstance(meta, Mapping):
        raise TypeError(f"expected a mapping of record fields, got a {type(meta).__name__}")
    metrics = {_string(k): float(v) for k, v in _mapping(meta.get("metrics")).items()}
    return CheckpointRecord(
        name=name,
        role=role,
        size=size,
        checksum=checksum,
        created=float(meta.get("created", 0.0)),
        seq=0,
        epoch=_optional_int(meta.get("epoch")),
        global_step=_optional_int(meta.get("global_step")),
        metrics=metrics,
        versions={_string(k): _string(v) for k, v in _mapping(meta.get("versions")).items()},
        monitor=None if meta.get("monitor") is None else _string(meta["monitor"]),
    )
