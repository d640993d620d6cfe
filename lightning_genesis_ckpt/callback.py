"""GenesisCheckpoint: a thin Lightning adapter that turns trainer hooks into calls on a CheckpointStore."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import rng
from ._lightning import (
    CHECKPOINT_BASES,
    LocalPathOpener,
    check_compatibility,
    dump_checkpoint,
    install_resume_hook,
    writes_directory,
)
from .async_save import BackgroundSaver, SnapshotBuffers
from .errors import MonitorNotFoundError
from .manifest import BEST_NAME, INTERRUPT_NAME, CheckpointRecord, epoch_name
from .reader import transfer_summary
from .resume import Resolution, resolve
from .retention import EveryNEpochs, KeepBestK, KeepLastN, Mode, is_better, rolling_to_delete
from .sharded import save_sharded
from .store import CheckpointStore

if TYPE_CHECKING:
    from pytorch_lightning.callbacks import Checkpoint as _CheckpointBase
else:
    # Every installed Lightning flavour's Checkpoint: see _lightning.CHECKPOINT_BASES.
    _CheckpointBase = type("_CheckpointBase", CHECKPOINT_BASES, {})

log = logging.getLogger(__name__)

_LIGHTNING_TRAINING_KEYS = ("state_dict", "loops", "optimizer_states", "lr_schedulers")


def _validate_training_checkpoint(checkpoint: Any) -> str | None:
    if not isinstance(checkpoint, dict):
        return f"not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)"
    missing = [k for k in _LIGHTNING_TRAINING_KEYS if k not in checkpoint]
    if missing:
        return f"not a Lightning training checkpoint (missing {', '.join(missing)})"
    return None


class GenesisCheckpoint(_CheckpointBase):
    """Atomic, checksummed checkpoints on any fsspec URL, with exact auto-resume and interrupt snapshots.

    Files in ``dirpath``: ``checkpoint_epoch_{epoch}.pth`` (the newest ``keep_last`` are kept),
    ``best_model.pth`` (best by ``monitor``/``mode``), ``interrupt_checkpoint.pth`` (Ctrl+C, SIGTERM or a
    crash inside ``fit``), and ``genesis_manifest.json``. Every file is a standard Lightning checkpoint plus
    the global RNG states, loadable with ``torch.load(weights_only=True)``.

    It works with ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` alike.

    During ``fit`` the run holds ``genesis.lock`` in ``dirpath`` (see :mod:`lightning_genesis_ckpt.lock`): a
    second run on the same directory fails at setup with :class:`StoreLockedError`. A save that fails (disk
    full, I/O error) stops training with :class:`CheckpointSaveError`; everything committed stays intact.

    Args:
        dirpath: directory path or fsspec URL (``memory://...``, ``s3://bucket/prefix``...).
        monitor: logged metric that decides ``best_model.pth`` and top-k protection; None disables both.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        save_top_k: rolling checkpoints of the ``k`` best epochs by ``monitor`` are protected from rolling
            deletion (0: no protection).
        keep_last: how many of the newest rolling checkpoints to keep (at least 1).
        every_n_epochs: save a rolling checkpoint every n epochs (and always after the final epoch);
            0 saves only the final epoch (``best_model.pth`` is still kept up to date).
        auto_resume: ``trainer.fit(model)`` without ``ckpt_path`` resumes from the newest valid checkpoint
            here. An explicit ``ckpt_path`` always wins.
        save_on_exception: write ``interrupt_checkpoint.pth`` when ``fit`` is interrupted or crashes.
        storage_options: passed to fsspec (credentials, endpoints); never written to files or logs.
        async_save: write rolling/best checkpoints on a background thread. Training is blocked only while
            the state is copied to private CPU memory (a consistent snapshot; this needs one extra copy of
            the checkpoint in RAM while the save runs). At most one save is in flight: the next one waits
            for it. A failed background save is raised at the next batch, the next save, or the end of
            ``fit``. Interrupt snapshots are always synchronous.
        trusted: allow resuming from files that need full pickle (custom classes in hparams). Only for files
            you trust: unpickling can run code.
        verbose: log one info line per save and resume. Warnings are always logged.
    """

    def __init__(
        self,
        dirpath: str,
        monitor: str | None = None,
        mode: Mode = "min",
        save_top_k: int = 1,
        keep_last: int = 5,
        every_n_epochs: int = 1,
        auto_resume: bool = True,
        save_on_exception: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        *,
        async_save: bool = False,
        trusted: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"GenesisCheckpoint(mode={mode!r}) is invalid: use 'min' or 'max'")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(
                f"GenesisCheckpoint(keep_last={keep_last!r}) is invalid: keep at least 1 checkpoint"
            )
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < 0:
            raise ValueError(
                f"GenesisCheckpoint(save_top_k={save_top_k!r}) is invalid: use 0 or a positive int"
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(
                f"GenesisCheckpoint(every_n_epochs={every_n_epochs!r}) is invalid: use 0 or a positive int"
            )
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(
                f"GenesisCheckpoint(monitor={monitor!r}) is invalid: give a logged metric's name"
            )
        self.dirpath = str(dirpath)
        self.monitor = monitor
        self.mode: Mode = mode
        self.auto_resume = auto_resume
        self.async_save = async_save
        self.save_on_exception = save_on_exception
        self.trusted = trusted
        self.verbose = verbose
        self.store = CheckpointStore(self.dirpath, storage_options, verbose=verbose)
        self.save_policy = EveryNEpochs(every_n_epochs)
        self.retention = (KeepLastN(keep_last), KeepBestK(save_top_k, monitor, mode))
        #: The record auto-resume restored from in the current ``fit``, if any.
        self.resumed_from: CheckpointRecord | None = None
        #: The most recent record this callback committed.
        self.last_saved: CheckpointRecord | None = None
        self._uninstall_resume_hook: Any = None
        self._saver = BackgroundSaver()
        self._snapshots = SnapshotBuffers()
        self._training_started = False
        self._validated = False

    # ------------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_compatibility(trainer)
        self.resumed_from = None
        self._training_started = False
        self._validated = False
        # Lightning's convention: info lines come from global rank 0 only (every rank loads on resume).
        self.store.verbose = self.verbose and trainer.is_global_zero
        if trainer.is_global_zero:
            # Fail here, before any training step, rather than after the first epoch's work.
            self.store.ensure_writable()
            self.store.acquire_lock()
            try:
                # Only the lock holder may clean up after a killed writer: it cannot be a live one's files.
                self.store.sweep_temp()
                self.store.manifest(refresh=True)
                self.store.finish_deletions()
            except BaseException:
                self.store.release_lock()
                raise
        if self.auto_resume:
            self._uninstall_resume_hook = install_resume_hook(trainer, lambda: self._resolve_resume(trainer))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._uninstall_resume_hook is not None:
            self._uninstall_resume_hook()
            self._uninstall_resume_hook = None
        self._finish_background_save(raise_errors=False)
        self.store.release_lock()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # The end of a successful fit: the last background save must have committed, or the user hears of it.
        self._saver.wait()

    def _resolve_resume(self, trainer: Any) -> tuple[str, dict[str, Any] | LocalPathOpener] | None:
        start = time.perf_counter()
        if trainer.world_size > 1:
            found = self._resolve_resume_distributed(trainer)
        else:
            found = resolve(self.store, trusted=self.trusted, validate=_validate_training_checkpoint)
        if found.record is None:
            return None
        rec = found.record
        self.resumed_from = rec
        if self.verbose and trainer.is_global_zero:
            elapsed = time.perf_counter() - start
            log.info(
                "resuming from %s (epoch %s, step %s; verified and loaded %s)",
                self.store.url_for(rec.name),
                rec.epoch,
                rec.global_step,
                transfer_summary(rec.size, elapsed),
            )
        if rec.is_directory:
            return self.store.url_for(rec.name), lambda: self.store.local_copy(rec.name)
        return self.store.url_for(rec.name), found.checkpoint

    def _resolve_resume_distributed(self, trainer: Any) -> Resolution:
        """Rank 0 chooses; every rank then loads that same file, checksum-verified.

        One broadcast, reached by every rank at the same point of setup. Rank 0 always takes part in it, even
        when its search fails, so no rank is left waiting: the failure is re-raised everywhere instead.
        """
        found = Resolution(record=None)
        failure = None
        if trainer.is_global_zero:
            try:
                found = resolve(self.store, trusted=self.trusted, validate=_validate_training_checkpoint)
            except Exception as e:
                failure = e
        name, reason = trainer.strategy.broadcast(
            (
                found.record.name if found.record else None,
                None if failure is None else f"{type(failure).__name__}: {failure}",
            ),
            src=0,
        )
        if failure is not None:
            raise failure
        if reason is not None:
            raise RuntimeError(
                f"rank 0 could not choose a checkpoint to resume from in {self.store.url}: {reason}"
            )
        if name is None or trainer.is_global_zero:
            return found
        try:
            record = self.store.manifest(refresh=True).get(name)
            if record is not None and record.is_directory:
                return Resolution(record=record)  # the strategy loads it, on every rank (see the hook)
            checkpoint = self.store.load(name, trusted=self.trusted)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"rank {trainer.global_rank} cannot read {self.store.url_for(name)}, chosen by rank 0 for resuming: "
                "with several nodes, dirpath must be storage that all nodes share (for example s3://...)"
            ) from e
        return Resolution(record=record, checkpoint=checkpoint)

    # ------------------------------------------------------------------------------ callback state
    def state_dict(self) -> dict[str, Any]:
        # Captured when the checkpoint dict is built, i.e. at the save point; restored during Lightning's
        # restore, before the resumed run's first dataloader iterator draws its shuffle seed.
        return {"rng": rng.capture()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            rng.restore(state_dict["rng"])

    # ---------------------------------------------------------------------------------- triggers
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._training_started = True

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._saver.raise_if_failed()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # The previous save must have committed before "is this the best?" is judged against the manifest.
        self._saver.wait()
        epoch = trainer.current_epoch
        metrics = self._metrics(trainer)
        decision: tuple[bool, bool] | None = None
        if trainer.is_global_zero:
            value = self._monitored_value(trainer, metrics)
            best = self.store.manifest().get(BEST_NAME)
            improved = value is not None and is_better(value, best.metric() if best else None, self.mode)
            due = self.save_policy.should_save(epoch, self._is_final_epoch(trainer))
            decision = (due, improved) if due or improved else None
        if trainer.world_size > 1:
            # Rank 0 decides for all: strategies that shard the model gather state inside dump_checkpoint,
            # which every rank must then join. (Only rank 0 reads the manifest or writes anything.)
            decision = trainer.strategy.broadcast(decision, src=0)
        if decision is None:
            return
        due, improved = decision
        checkpoint = dump_checkpoint(trainer)
        fields = {
            "epoch": epoch,
            "global_step": trainer.global_step,
            "metrics": metrics,
            "monitor": self.monitor,
        }
        if writes_directory(trainer.strategy):
            # Sharded state: every rank writes its shard through the strategy, synchronously.
            name = epoch_name(epoch) if due else BEST_NAME
            record = save_sharded(
                self.store, trainer, checkpoint, name, role="epoch" if due else "best", **fields
            )
            if record is not None:
                self.last_saved = record
                if due and improved:
                    self.store.copy(record.name, BEST_NAME, role="best")
                self._after_commit(record)
            return
        if not trainer.is_global_zero:
            return
        if self.async_save:
            snapshot = self._snapshots.snapshot(checkpoint)
            del checkpoint
            self._saver.submit(lambda: self._commit(snapshot, due, improved, fields))
        else:
            self._commit(checkpoint, due, improved, fields)

    def _commit(self, checkpoint: dict[str, Any], due: bool, improved: bool, fields: dict[str, Any]) -> None:
        """Write one checkpoint, update best_model.pth, then apply retention: in that order, always."""
        if due:
            record = self.store.save(epoch_name(fields["epoch"]), checkpoint, role="epoch", **fields)
            if improved:
                self.store.copy(record.name, BEST_NAME, role="best")
        else:
            record = self.store.save(BEST_NAME, checkpoint, role="best", **fields)
        self.last_saved = record
        self._after_commit(record)

    def _finish_background_save(self, *, raise_errors: bool) -> None:
        try:
            self._saver.wait()
        except Exception as e:
            if raise_errors:
                raise
            log.error("background checkpoint save failed: %s", e)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # A save in flight finishes (and commits) first; its failure must not hide the original exception.
        self._finish_background_save(raise_errors=False)
        # Lightning calls no teardown hook after an exception: the lock goes here, after the snapshot.
        try:
            self._save_snapshot(trainer, exception)
        finally:
            self.store.release_lock()

    def _save_snapshot(self, trainer: Any, exception: BaseException) -> None:
        if not (self.save_on_exception and self._training_started):
            return
        sharded = writes_directory(trainer.strategy)
        if sharded and trainer.world_size > 1:
            # A sharded snapshot needs every rank inside the same collective save; after an exception the
            # other ranks may be anywhere (or dead), and waiting for them could hang the job.
            log.warning(
                "fit interrupted by %s: no snapshot, because a sharded checkpoint needs all %d ranks and they "
                "cannot be gathered safely after an exception; the newest committed checkpoint is used to resume",
                type(exception).__name__,
                trainer.world_size,
            )
            return
        if not trainer.is_global_zero:
            return
        fields = {
            "role": "interrupt",
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "metrics": self._metrics(trainer),
            "monitor": self.monitor,
        }
        try:
            checkpoint = dump_checkpoint(trainer)
            if sharded:
                self.last_saved = save_sharded(self.store, trainer, checkpoint, INTERRUPT_NAME, **fields)
            else:
                self.last_saved = self.store.save(INTERRUPT_NAME, checkpoint, **fields)
            log.warning(
                "fit interrupted by %s: snapshot saved to %s (epoch %d, step %d); run again to resume",
                type(exception).__name__,
                self.store.url_for(INTERRUPT_NAME),
                trainer.current_epoch,
                trainer.global_step,
            )
        except Exception as e:
            # The original exception is what the user must see; a failed snapshot must not replace it.
            log.error(
                "could not save the interrupt snapshot to %s: %s", self.store.url_for(INTERRUPT_NAME), e
            )

    # ------------------------------------------------------------------------------------ helpers
    def _after_commit(self, record: CheckpointRecord) -> None:
        """Retention and snapshot retirement, only ever after a newer checkpoint has committed."""
        records = self.store.records()
        # Never the checkpoint just committed (an explicit ckpt_path can resume from an epoch older than those
        # kept), nor the one this run resumed from until a checkpoint with more training has committed.
        protect = {record.name}
        src = self.resumed_from
        if src is not None and (record.global_step or 0) <= (src.global_step or 0):
            protect.add(src.name)
        doomed = rolling_to_delete(records, self.retention, protect)
        snapshot = self.store.manifest().get(INTERRUPT_NAME)
        if snapshot is not None and (snapshot.global_step or 0) <= (record.global_step or 0):
            doomed.append(INTERRUPT_NAME)
        if doomed:
            try:
                self.store.delete(doomed)
            except OSError as e:  # the new checkpoint is committed; the old ones go at a later commit
                log.warning("could not remove old checkpoints %s: %s", ", ".join(doomed), e)

    @staticmethod
    def _metrics(trainer: Any) -> dict[str, float]:
        out = {}
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[str(key)] = float(value)
        return out

    def _monitored_value(self, trainer: Any, metrics: Mapping[str, float]) -> float | None:
        if self.monitor is None:
            return None
        if self.monitor in metrics:
            value = metrics[self.monitor]
            return None if math.isnan(value) else value
        # A validation metric does not exist before the first validation run: only complain once it
        # should have been logged.
        if self._validated or not trainer.enable_validation:
            available = ", ".join(sorted(metrics)) or "none"
            raise MonitorNotFoundError(
                f"GenesisCheckpoint(monitor={self.monitor!r}) found no such logged metric. Available metrics: "
                f"{available}. Log it with self.log({self.monitor!r}, ...) or change `monitor`."
            )
        return None

    @staticmethod
    def _is_final_epoch(trainer: Any) -> bool:
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
            return True
        max_steps = trainer.max_steps
        return bool(trainer.should_stop or (max_steps is not None and 0 <= max_steps <= trainer.global_step))
