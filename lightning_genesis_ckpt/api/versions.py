"""Named versions: checkpoints saved (or tagged) under a name, listed and loaded through the manifest.

A version is a manifest record with role ``"version"`` for the file ``version_<name>.pth`` in a checkpoint
directory. There is no separate index: listing reads the manifest, and the records carry the metrics and
times. Tagging an existing checkpoint commits it under the version's name without re-serializing it (a
hard link on local disks, a server-side copy on object stores).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.names import BEST_NAME, VERSION_PREFIX, VERSION_SUFFIX, version_of_name
from ..core.records import CheckpointRecord
from ..storage.serialization import MapLocation, Serializer
from ..storage.store import CheckpointStore, StoreReader
from ..storage.transaction import Transaction
from .manager import scalar_metrics, strip_metadata

#: ``load_version(..., "latest")``: the most recently committed version.
LATEST = "latest"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


@dataclass(frozen=True)
class Version:
    """One named version, as the manifest records it.

    Attributes:
        name: the version name (``"v1"``, ``"2024-06-01"``, ``"baseline"``).
        file: its file name in the directory.
        created: Unix time the state was saved.
        metrics: scalar metrics recorded with it.
        epoch: training epoch of the state, if known.
        global_step: optimizer steps of the state, if known.
        size: bytes in the file.
        checksum: crc32 of the file.
    """

    name: str
    file: str
    created: float
    metrics: Mapping[str, float]
    epoch: int | None
    global_step: int | None
    size: int
    checksum: str

    @property
    def created_iso(self) -> str:
        """``created`` as an ISO 8601 UTC timestamp."""
        return datetime.datetime.fromtimestamp(self.created, datetime.timezone.utc).isoformat(
            timespec="seconds"
        )

    @classmethod
    def from_record(cls, record: CheckpointRecord) -> Version:
        """The version a ``"version"`` record describes."""
        name = version_of_name(record.name)
        if name is None:
            raise ValueError(f"{record.name!r} is not a version file name")
        return cls(
            name=name,
            file=record.name,
            created=record.created,
            metrics=dict(record.metrics),
            epoch=record.epoch,
            global_step=record.global_step,
            size=record.size,
            checksum=record.checksum,
        )


def version_file(name: str) -> str:
    """The file name of version ``name``; raises ``ValueError`` for a name that cannot be one."""
    if name == LATEST or not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid version name {name!r}: use 1-100 letters, digits, '.', '_', '+' or '-', starting with a "
            f"letter or digit ({LATEST!r} is reserved for the newest version)"
        )
    return f"{VERSION_PREFIX}{name}{VERSION_SUFFIX}"


def _refuse_existing(tx: Transaction, store: CheckpointStore, file: str, name: str, overwrite: bool) -> None:
    if not overwrite and tx.manifest.get(file) is not None:
        raise FileExistsError(
            f"version {name!r} already exists in {store.url}; choose another name or pass overwrite=True"
        )


def save_version(
    save_dir: str,
    state: Any,
    version: str,
    *,
    metrics: Mapping[str, float] | None = None,
    overwrite: bool = False,
    serializer: Serializer = "torch",
    storage_options: Mapping[str, Any] | None = None,
) -> Version:
    """Save ``state`` in ``save_dir`` as version ``version``, atomically and checksummed.

    Args:
        save_dir: checkpoint directory (path or fsspec URL), usually the run's own.
        state: what to save (a state dict, a whole checkpoint...).
        version: the version's name.
        metrics: recorded with the version; default: the top-level numbers in ``state``.
        overwrite: replace an existing version of that name (default: refuse).
        serializer: ``"torch"`` or ``"dill"``.
        storage_options: passed to fsspec.

    Raises:
        FileExistsError: the version exists and ``overwrite`` is False.
        ValueError: an invalid version name.
        StoreLockedError: another process's run holds the directory (from the training process itself, the
            version goes through the run's lock and survives its later commits).
    """
    file = version_file(version)
    counters = state if isinstance(state, Mapping) else {}
    epoch, step = counters.get("epoch"), counters.get("global_step")
    store = CheckpointStore(save_dir, storage_options)
    with store.transaction() as tx:
        _refuse_existing(tx, store, file, version, overwrite)
        record = tx.write(
            file,
            state,
            role="version",
            epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
            global_step=step if isinstance(step, int) and not isinstance(step, bool) else None,
            metrics=scalar_metrics(state) if metrics is None else metrics,
            serializer=serializer,
        )
    return Version.from_record(record)


def tag_version(
    save_dir: str,
    version: str,
    source: str = BEST_NAME,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Version:
    """Commit the committed checkpoint ``source`` (default ``best_model.pth``) as version ``version``.

    The bytes are not re-serialized, and the version keeps the source's metrics, epoch and creation time.

    Raises:
        FileNotFoundError: ``source`` is not a committed checkpoint of ``save_dir``.
        FileExistsError: the version exists and ``overwrite`` is False.
        StoreLockedError: as :func:`save_version`.
    """
    file = version_file(version)
    store = CheckpointStore(save_dir, storage_options)
    with store.transaction() as tx:
        _refuse_existing(tx, store, file, version, overwrite)
        store.verify(source)  # never give a damaged file a name people will deploy
        record = tx.copy(source, file, role="version")
    return Version.from_record(record)


def list_versions(save_dir: str, *, storage_options: Mapping[str, Any] | None = None) -> list[Version]:
    """The versions in ``save_dir``, oldest first."""
    store = StoreReader(save_dir, storage_options, verbose=False)
    return [
        Version.from_record(r) for r in store.records() if r.role == "version" and version_of_name(r.name)
    ]


def load_version(
    save_dir: str,
    version: str = LATEST,
    *,
    map_location: MapLocation = "cpu",
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load version ``version`` (or the newest, ``"latest"``), checksum-verified, tensors on ``map_location``.

    Raises:
        FileNotFoundError: no such version (the message lists the existing ones).
        CheckpointCorruptError, UnsafeCheckpointError: as :func:`lightning_genesis_ckpt.load`.
    """
    store = StoreReader(save_dir, storage_options, verbose=False)
    versions = [
        Version.from_record(r) for r in store.records() if r.role == "version" and version_of_name(r.name)
    ]
    if version == LATEST:
        if not versions:
            raise FileNotFoundError(f"{store.url} has no versions yet; save one with save_version()")
        chosen = versions[-1]
    else:
        match = [v for v in versions if v.name == version]
        if not match:
            known = ", ".join(v.name for v in versions) or "none"
            raise FileNotFoundError(f"{store.url} has no version {version!r} (versions: {known})")
        chosen = match[0]
    state = store.load(
        chosen.file, map_location=map_location, trusted=trusted, serializer="dill" if trusted else None
    )
    return strip_metadata(state)
