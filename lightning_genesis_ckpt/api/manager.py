"""CheckpointManager: the Genesis checkpoint-manager API for plain PyTorch loops, on the callback's store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import threading
import time
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar

import torch

from ..core.errors import CheckpointCorruptError
from ..core.names import BEST_NAME, EPOCH_PREFIX, INTERRUPT_NAME, epoch_name
from ..core.preservation import LatestN, PreservationPolicy, RetentionContext, select_deletions
from ..core.records import METADATA_KEY, CheckpointRecord
from ..storage.location import Conduct
from ..storage.resume import interrupt_then_epoch, resolve
from ..storage.serialization import Serializer, check_map_location
from ..storage.store import CheckpointStore

log = logging.getLogger(__name__)

#: Keys of a state dict that are recorded as the record's epoch / step rather than as metrics.
_COUNTER_KEYS = ("epoch", "global_step")


def scalar_metrics(state: Any) -> dict[str, float]:
    """The top-level numbers of a state dict (``val_acc``, ``train_loss`` ...), as the manifest records them."""
    out: dict[str, float] = {}
    if not isinstance(state, Mapping):
        return out
    for key, value in state.items():
        if key in _COUNTER_KEYS or not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _counter(state: Any, key: str) -> int | None:
    value = state.get(key) if isinstance(state, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def strip_metadata(obj: Any) -> Any:
    """Remove the record fields the store embeds in each file, so callers get back what they saved."""
    if isinstance(obj, dict):
        obj.pop(METADATA_KEY, None)
    return obj


class CheckpointManager:
    """Best, rolling and interrupt checkpoints for a plain PyTorch training loop.

    The files, names and manifest are the same as :class:`~lightning_genesis_ckpt.GenesisCheckpoint`'s:
    every save is atomic and checksummed, every load is verified, and ``save_dir`` may be any fsspec URL.

    Deliberate differences from the Genesis utility of the same name:

    * The interrupt snapshot is **not deleted when it is loaded**. It is retired once an epoch checkpoint
      with at least as much training has committed, so a crash right after resuming loses nothing.
    * A failed save **raises** (the original logged and went on, so training could continue with nothing on
      disk). Old checkpoints are deleted only after the new one has committed.
    * ``max_to_keep < 1`` is an error rather than silently becoming 1.
    * Loading is weights-only unless ``trusted=True`` (states holding custom objects need it).

    A directory that already holds Genesis-style files but no manifest (written by the original utility) is
    adopted: its ``best_model.pth``, ``checkpoint_epoch_*.pth`` and ``interrupt_checkpoint.pth`` are loaded
    (weights-only) and checksummed into the manifest, with a warning listing them; in memory for loading, on
    disk with the first save.

    The manager only writes when it saves. From its first save on it holds the directory's lock, like a
    training run (another process writing there is refused with ``StoreLockedError``, and a writer of this
    process goes through it), until :meth:`close` (or the end of a ``with CheckpointManager(...)`` block, or
    the manager being garbage-collected). A manager that only loads (an evaluation loop polling a live run's
    directory) never removes or rewrites anything.

    Args:
        save_dir: directory path or fsspec URL; created if missing.
        device: where loaded tensors are mapped (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        max_to_keep: how many epoch checkpoints to keep, newest by epoch number (numerically).
        preserve: a preservation policy to use instead of ``LatestN(max_to_keep)``, e.g.
            ``AnyOf(LatestN(3), EveryNSteps(10_000))``; the same rules as the callback's and ``prune``'s.
        storage_options: passed to fsspec (credentials, endpoint); never written anywhere.
        trusted: allow loading files that need full pickle (may run code from the file).
        serializer: ``"torch"``, or ``"dill"`` for states plain pickle cannot hold (loading then needs
            ``trusted=True``).
        verbose: log one info line per save and load. Warnings are always logged.

    Raises:
        ValueError: ``max_to_keep < 1``, or ``device`` is not available on this machine.
    """

    BEST_MODEL_NAME: ClassVar[str] = BEST_NAME
    EPOCH_CKPT_PREFIX: ClassVar[str] = EPOCH_PREFIX
    INTERRUPT_CKPT_NAME: ClassVar[str] = INTERRUPT_NAME

    def __init__(
        self,
        save_dir: str = "checkpoint",
        device: str | torch.device = "cpu",
        max_to_keep: int = 5,
        *,
        storage_options: Mapping[str, Any] | None = None,
        trusted: bool = False,
        serializer: Serializer = "torch",
        verbose: bool = True,
        preserve: PreservationPolicy | None = None,
    ) -> None:
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(
                f"CheckpointManager(max_to_keep={max_to_keep!r}) is invalid: keep at least 1 checkpoint"
            )
        if serializer not in ("torch", "dill"):
            raise ValueError(
                f"CheckpointManager(serializer={serializer!r}) is invalid: use 'torch' or 'dill'"
            )
        check_map_location(device)
        self.save_dir = str(save_dir)
        self.device = device
        self.max_to_keep = max_to_keep
        self.trusted = trusted
        self.serializer: Serializer = serializer
        self.verbose = verbose
        self.preserve: PreservationPolicy = preserve or LatestN(max_to_keep)
        self.store = _ManagerStore(self.save_dir, storage_options, verbose=verbose)
        #: The record the last successful ``load_*`` call returned, if any.
        self.last_loaded: CheckpointRecord | None = None
        # Created up front like the original; creating an empty directory removes or rewrites nothing.
        with contextlib.suppress(OSError):
            self.store.ensure_directory()
        self._release = weakref.finalize(self, _release_soon, self.store)
        self.store.manifest()  # read (and, for a directory of the original utility, adopted) up front

    def close(self) -> None:
        """Release the directory's lock if this manager holds it (it does from its first save on)."""
        self._release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- saving
    def save_best_model(self, state: Mapping[str, Any], metric: float) -> CheckpointRecord:
        """Save ``state`` as ``best_model.pth``. The caller decides that it is the best; ``metric`` is recorded.

        Returns:
            The committed record (``metrics["metric"]`` holds ``metric``).
        """
        metrics = {**scalar_metrics(state), "metric": float(metric)}
        record = self._save(BEST_NAME, state, role="best", metrics=metrics, monitor="metric")
        if self.verbose:
            log.info("new best model in %s (metric %.6g)", self.store.url_for(BEST_NAME), float(metric))
        return record

    def save_epoch_checkpoint(self, state: Mapping[str, Any], epoch: int) -> CheckpointRecord:
        """Save ``state`` as ``checkpoint_epoch_{epoch}.pth``, then apply the rolling cleanup.

        In the same transaction, epoch checkpoints the preservation policy does not keep (beyond the newest
        ``max_to_keep`` by epoch number, by default) are retired, and the interrupt snapshot once this
        checkpoint has at least as much training. Their files go after the commit; a failed removal is
        logged and does not undo the save.
        """
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"save_epoch_checkpoint(epoch={epoch}) is invalid: epochs are counted from 0")
        return self._save(epoch_name(epoch), state, role="epoch", epoch=epoch)

    def save_interrupt_checkpoint(self, state: Mapping[str, Any]) -> CheckpointRecord:
        """Save a snapshot on Ctrl+C or preemption; :meth:`load_latest_checkpoint` prefers it."""
        record = self._save(INTERRUPT_NAME, state, role="interrupt")
        log.warning(
            "interrupt snapshot saved to %s; run again to resume from it", self.store.url_for(INTERRUPT_NAME)
        )
        return record

    def _save(self, name: str, state: Mapping[str, Any], *, role: str, **fields: Any) -> CheckpointRecord:
        if not isinstance(state, Mapping):
            raise TypeError(f"CheckpointManager saves a dict of state, got a {type(state).__name__}")
        self.store.acquire_lock()  # the manager is a writer from here on (see the class doc)
        fields.setdefault("epoch", _counter(state, "epoch"))
        fields.setdefault("metrics", scalar_metrics(state))
        with self.store.transaction() as tx:
            record = tx.write(
                name,
                dict(state),
                role=role,
                global_step=_counter(state, "global_step"),
                serializer=self.serializer,
                **fields,
            )
            context = RetentionContext(now=time.time(), just_committed=record, resumed_from=self.last_loaded)
            tx.delete(select_deletions(tx.manifest.records.values(), self.preserve, context))
        return record

    # --------------------------------------------------------------------------------------- loading
    def load_best_model(self) -> dict[str, Any] | None:
        """The state saved by :meth:`save_best_model`, tensors on ``device``; None if none (or it is corrupt).

        Checksum-verified, then on a local disk loaded with ``mmap`` (the tensors are mapped from the file,
        not read into a second copy).

        Raises:
            UnsafeCheckpointError: the file needs ``trusted=True`` to load.
        """
        if self.store.manifest(refresh=True).get(BEST_NAME) is None:
            if self.verbose:
                log.info("no best model in %s yet", self.save_dir)
            return None
        try:
            # Inference loads are what mmap is for: on local disks the tensors are mapped, not read twice.
            state = self.store.load(
                BEST_NAME,
                map_location=self.device,
                trusted=self.trusted,
                serializer=self._load_serializer,
                mmap=True,
            )
        except (CheckpointCorruptError, FileNotFoundError) as e:
            log.warning("cannot load the best model: %s", str(e))
            return None
        self.last_loaded = self.store.manifest().get(BEST_NAME)
        if self.verbose:
            log.info("loaded %s", self.store.url_for(BEST_NAME))
        return strip_metadata(state)

    def load_latest_checkpoint(self) -> dict[str, Any] | None:
        """The state to resume from, tensors on ``device``; None when there is nothing to resume.

        Order: the interrupt snapshot, else the epoch checkpoint with the highest epoch number. Each candidate's
        checksum is verified; a missing or corrupt one is skipped with a warning and the next is tried.

        Raises:
            UnsafeCheckpointError: a candidate needs ``trusted=True`` to load (never skipped silently:
                starting over would lose the run).
        """
        self.store.manifest(refresh=True)
        found = resolve(
            self.store,
            trusted=self.trusted,
            map_location=self.device,
            serializer=self._load_serializer,
            roles=("interrupt", "epoch"),
            key=interrupt_then_epoch,
            validate=lambda obj: (
                None if isinstance(obj, dict) else f"holds a {type(obj).__name__}, not a dict"
            ),
        )
        if found.record is None:
            if self.verbose:
                log.info("no checkpoint to resume from in %s", self.save_dir)
            return None
        self.last_loaded = found.record
        if self.verbose:
            log.info("resuming from %s (epoch %s)", self.store.url_for(found.record.name), found.record.epoch)
        return strip_metadata(found.checkpoint)

    @property
    def _load_serializer(self) -> Serializer | None:
        # dill's unpickler also reads plain pickles: a trusted load works whichever serializer saved the file.
        return "dill" if self.trusted else None


def _release_soon(store: CheckpointStore) -> None:
    """Release a collected manager's lock: at once, or from a thread of its own when the collection happened
    on an event loop's thread (s3fs's), where the blocking I/O of a release cannot run."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        store.release_lock()
        return
    threading.Thread(target=store.release_lock, name="genesis-ckpt-release", daemon=True).start()


class _ManagerStore(CheckpointStore):
    """The manager's store: a lost manifest is rebuilt with the files of the original Genesis utility too
    (standard names, no embedded record), which are loaded and checksummed as they are (see :mod:`.recovery`)."""

    conduct = Conduct(adopts_standard_names=True)
