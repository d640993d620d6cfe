"""Adopting the library mid-project: register existing checkpoint files into a store's manifest."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from typing import IO, Any

from ..core.names import epoch_of_name, role_of_name
from ..core.records import CheckpointRecord
from ..storage import serialization
from ..storage.sources import SourceFile
from ..storage.store import CheckpointStore
from .manager import scalar_metrics

log = logging.getLogger(__name__)

#: A Lightning checkpoint with these keys holds a full training state: the callback can resume from it.
_LIGHTNING_TRAINING_KEYS = ("state_dict", "loops", "optimizer_states", "lr_schedulers")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def import_checkpoint(
    source: str | os.PathLike[str],
    save_dir: str,
    name: str | None = None,
    *,
    role: str | None = None,
    epoch: int | None = None,
    global_step: int | None = None,
    metrics: Mapping[str, float] | None = None,
    overwrite: bool = False,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> CheckpointRecord:
    """Register an existing plain-PyTorch or Lightning checkpoint file in the store at ``save_dir``.

    A file already inside ``save_dir`` is registered where it is; any other file is first copied in
    (atomically, byte for byte). Either way its size and crc32 go into the manifest, and from then on it is
    verified like the store's own files. The file is opened (weights-only, tensors left unread) to refuse
    damaged files and to read its epoch and step.

    Like every writer it goes through the directory's lock (see ``StoreLockedError``).

    The role decides what uses the file: ``best_model.pth``, ``checkpoint_epoch_<n>.pth`` and
    ``interrupt_checkpoint.pth`` get their usual roles; any other Lightning training checkpoint becomes an
    ``"epoch"`` checkpoint, so ``GenesisCheckpoint`` resumes from it (and retires it like its own once
    ``keep_last`` newer ones exist); everything else is ``"manual"`` (kept, never resumed from or deleted).

    Args:
        source: the existing file (path or fsspec URL).
        save_dir: the checkpoint directory to register it in.
        name: its file name there (default: the source's).
        role: override the role described above.
        epoch: override the epoch read from the file.
        global_step: override the global step read from the file.
        metrics: override the metrics read from the file.
        overwrite: replace a file or record of the same name (default: refuse).
        trusted: allow reading a file that needs full pickle (may run code from it).
        storage_options: passed to fsspec for both locations.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        FileExistsError: ``name`` is taken in ``save_dir`` and ``overwrite`` is False.
        CheckpointCorruptError: ``source`` is not a readable torch checkpoint.
        UnsafeCheckpointError: ``source`` needs ``trusted=True``.
    """
    options = dict(storage_options or {})
    src = SourceFile(source, options)
    store = CheckpointStore(save_dir, options)
    name = name or src.name
    in_place = src.is_in(store, name)
    if not src.exists():
        raise FileNotFoundError(f"{src.display} does not exist: nothing to import")
    obj = src.load_structure(trusted=trusted)
    fields: Mapping[str, Any] = obj if isinstance(obj, Mapping) else {}
    is_training = all(k in fields for k in _LIGHTNING_TRAINING_KEYS)
    implied = role_of_name(name)
    record_fields: dict[str, Any] = {
        "role": role or (implied if implied != "manual" else "epoch" if is_training else "manual"),
        "epoch": epoch
        if epoch is not None
        else _int(fields.get("epoch"))
        if "epoch" in fields
        else epoch_of_name(name),
        "global_step": global_step if global_step is not None else _int(fields.get("global_step")),
        "metrics": scalar_metrics(fields) if metrics is None else metrics,
    }
    with store.transaction() as tx:
        if not overwrite and (tx.manifest.get(name) is not None or (not in_place and store.exists(name))):
            raise FileExistsError(
                f"{store.url_for(name)} already exists; choose another name= or pass overwrite=True"
            )
        if in_place:
            record = tx.register(name, **record_fields)
        else:

            def copy_in(out: IO[bytes]) -> None:
                with src.open() as fin:
                    shutil.copyfileobj(fin, out, serialization.READ_CHUNK)

            record = tx.write_stream(
                name, copy_in, overwrite_unlisted=overwrite, versions={}, **record_fields
            )
    log.info("imported %s as %s (role %s)", src.display, store.url_for(name), record.role)
    return record
