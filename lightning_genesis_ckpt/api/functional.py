"""The Genesis serialization API: ``save`` / ``load`` one file, atomically and checksummed, on any fsspec URL.

``import lightning_genesis_ckpt as genesis`` then ``genesis.save(model.state_dict(), "model.pth")``.

A single file's store is its parent directory: the file gets a record (size, crc32) in the manifest there,
and ``load`` verifies it. A file with no record (written by ``torch.save`` elsewhere) still loads, safely,
just without a checksum to compare.

Deliberate difference from the Genesis documentation: ``save`` does **not** clear the caller's dictionary.
Clearing it was a way to free memory early; here the object is streamed straight into the file without a
second in-memory copy, and a caller that keeps training after a save needs its state intact.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..core.errors import CheckpointCorruptError
from ..core.names import BACKUP_SUFFIX
from ..core.records import CheckpointRecord
from ..storage import frozen
from ..storage.location import Conduct
from ..storage.serialization import MapLocation, Serializer
from ..storage.store import CheckpointStore

log = logging.getLogger(__name__)

__all__ = ["BACKUP_SUFFIX", "FileStore", "file_store", "load", "load_checkpoint", "save", "save_checkpoint"]


class FileStore(CheckpointStore):
    """The store of a single file's parent directory, which may be any directory of the user's.

    It differs from a checkpoint directory in two ways: a missing or unreadable manifest means "no records
    yet", never "rebuild it by loading every file here" (that would read, and warn about, the user's code and
    data files, which are none of ours), and the lock holder never lists or sweeps the directory. Files
    written by ``save`` therefore carry no embedded metadata either: ``load`` returns exactly the object that
    was saved.
    """

    conduct = Conduct(rebuilds=False, sweeps=False)


def file_store(
    file_path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[FileStore, str]:
    """The store of ``file_path``'s directory and the file's name in it."""
    text = os.fspath(file_path)
    protocol, sep, rest = text.partition("://")
    if not sep:
        protocol, rest = "", text
    parent, slash, name = rest.rpartition("/")
    if not name:
        raise ValueError(f"{text!r} is a directory, not a file path: give the file's name too")
    if not slash:
        parent = "" if sep else "."
    elif not parent:
        parent = "/"
    parent_url = f"{protocol}://{parent}" if sep else parent
    return FileStore(parent_url, storage_options), name


def save(
    obj: Any,
    file_path: str | os.PathLike[str],
    serializer: Serializer = "torch",
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointRecord:
    """Save ``obj`` (usually a state dict) to ``file_path`` atomically, with a checksum in the manifest.

    When ``file_path`` exists, its current content is kept as ``<file_path>.genesis.bak`` until the new
    content has committed, then the backup is removed. If the save fails, the original is intact: restored
    from the backup if the failure came after anything had touched it.

    Like every writer, it goes through the directory's lock: into a directory that a live run in another
    process writes, it is refused with :class:`~lightning_genesis_ckpt.StoreLockedError`.

    Args:
        obj: what to save: a state dict, or any object torch (or dill) can pickle.
        file_path: local path or fsspec URL (``memory://...``, ``s3://bucket/key.pth``).
        serializer: ``"torch"``, or ``"dill"`` for objects plain pickle cannot handle (lambdas, closures).
            Loading a dill file requires ``load(..., trusted=True)``.
        storage_options: passed to fsspec (credentials, endpoint).

    Returns:
        The manifest record of the committed file.

    Raises:
        OSError: the write failed (disk full, permissions, network). The previous file is intact.
        StoreLockedError: another run holds the directory.
    """
    store, name = file_store(file_path, storage_options)
    return save_into(store, name, obj, serializer)


def save_into(
    store: CheckpointStore, name: str, obj: Any, serializer: Serializer = "torch"
) -> CheckpointRecord:
    """``save`` into a given store: a transaction that keeps the previous file as a backup until it commits."""
    return store.save_file(name, obj, serializer)


def load(
    file_path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    trusted: bool = False,
    mmap: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    frozen_from: torch.nn.Module | None = None,
) -> Any:
    """Load what :func:`save` (or ``torch.save``) wrote to ``file_path``, in one verified pass.

    The checksum is verified while the file is read when the directory's manifest lists it. Loading is
    weights-only (tensors, containers, numbers, strings) unless ``trusted=True``. It never writes: after a save
    that was killed midway, the committed version is loaded from its backup, which the next save settles.

    A checkpoint saved with ``GenesisCheckpoint(exclude_frozen=True)`` is returned complete: its frozen
    parameters come from ``frozen_from`` or else from the store's one copy of them, after their fingerprint is
    checked.

    Args:
        file_path: local path or fsspec URL.
        map_location: where tensors go (passed to ``torch.load``); the default ``"cpu"`` loads GPU-saved
            files on any machine.
        trusted: allow arbitrary pickled objects, including files saved with ``serializer="dill"``. Only
            for files you trust: unpickling can run code.
        mmap: memory-map the tensors of a local file instead of reading them (``torch.load(mmap=True)``);
            ignored for remote files and files in torch's legacy format.
        storage_options: passed to fsspec.
        frozen_from: the model (as constructed from its base weights) to take left-out frozen parameters
            from; None: the store's copy (``frozen_base_*.pth``).

    Raises:
        FileNotFoundError: no such file (or, for a checkpoint without its frozen parameters and no
            ``frozen_from``, no copy of them in the store).
        FrozenBaseMismatchError: the frozen parameters found differ from those the checkpoint was saved with.
        CheckpointCorruptError: truncated, damaged or not a checkpoint (a ``pickle.UnpicklingError``).
        UnsafeCheckpointError: the file needs code execution to load and ``trusted`` is False (also a
            ``pickle.UnpicklingError``); its message says how to proceed.
        OSError: reading failed for another reason than damage (EIO, the network), raised as it is.
    """
    store, name = file_store(file_path, storage_options)
    record = store.manifest().get(name)
    # dill's unpickler reads plain pickles too, so a trusted load never needs to know how the file was made.
    kwargs: dict[str, Any] = {
        "map_location": map_location,
        "trusted": trusted,
        "serializer": "dill" if trusted else None,
        "mmap": mmap,
    }
    try:
        obj = store.load(name, **kwargs)
    except (CheckpointCorruptError, FileNotFoundError):
        backup = name + BACKUP_SUFFIX
        if record is None or not store.exists(backup):
            raise
        try:
            obj = store.load(backup, expect=record, **kwargs)
        except (CheckpointCorruptError, FileNotFoundError):
            raise
        log.warning(
            "%s did not match its manifest record (a save was interrupted); loaded the committed version "
            "from %s, which the next save settles",
            store.url_for(name),
            store.url_for(backup),
        )
    return frozen.complete_from(store, obj, store.url_for(name), frozen_from)


def save_checkpoint(
    model_state_dict: Mapping[str, Any],
    optimizer_state_dict: Mapping[str, Any],
    file_path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointRecord:
    """Save ``{"model_state_dict": ..., "optimizer_state_dict": ...}`` to ``file_path`` (see :func:`save`)."""
    state = {"model_state_dict": model_state_dict, "optimizer_state_dict": optimizer_state_dict}
    return save(state, file_path, storage_options=storage_options)


def load_checkpoint(
    file_path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load a :func:`save_checkpoint` file; returns ``(model_state_dict, optimizer_state_dict)``.

    Raises:
        ValueError: the file is a valid checkpoint of another layout (use :func:`load` for those).
        FileNotFoundError, CheckpointCorruptError, UnsafeCheckpointError: as :func:`load`.
    """
    state = load(file_path, map_location=map_location, trusted=trusted, storage_options=storage_options)
    keys = ("model_state_dict", "optimizer_state_dict")
    if not isinstance(state, Mapping) or not all(k in state for k in keys):
        found = ", ".join(map(str, list(state)[:8])) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{os.fspath(file_path)!r} was not written by save_checkpoint: expected the keys {keys}, found "
            f"{found or 'nothing'}. Load it with genesis.load() instead."
        )
    return state["model_state_dict"], state["optimizer_state_dict"]
