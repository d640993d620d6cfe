"""GenesisCheckpoint: a thin Lightning adapter that turns trainer hooks into calls on a CheckpointStore."""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..core.preservation import AnyOf, BestN, LatestN, Mode, PreservationPolicy
from ..core.records import CheckpointRecord
from ..core.save_decision import Event
from ..storage import safe_types
from ..storage.store import CheckpointStore
from . import _lightning, _lightning_loops, commits, fit_state, frozen_saves, rng, snapshot
from ._lightning import (
    CHECKPOINT_BASES,
    SIGTERM_EXCEPTIONS,
    check_compatibility,
    dump_checkpoint,
    install_resume_hook,
    writes_directory,
)
from .async_save import BackgroundSaver, SnapshotBuffers
from .ckpt_paths import CheckpointPaths, ModelCheckpointAttributes
from .commits import SaveDecision
from .fastforward import FastForward
from .preemption import Preemption, SignalSpec
from .triggers import Triggers

if TYPE_CHECKING:
    from pytorch_lightning.callbacks import Checkpoint as _CheckpointBase
else:
    # Every installed Lightning flavour's Checkpoint: see _lightning.CHECKPOINT_BASES.
    _CheckpointBase = type("_CheckpointBase", CHECKPOINT_BASES, {})


class GenesisCheckpoint(ModelCheckpointAttributes, _CheckpointBase):
    """Atomic, checksummed checkpoints on any fsspec URL, with exact auto-resume and interrupt snapshots.

    Files in ``dirpath``: ``checkpoint_epoch_{epoch}.pth`` and ``checkpoint_step_{step}.pth`` (one sequence,
    ordered by optimizer steps: the newest ``keep_last`` are kept), ``best_model.pth`` (best by
    ``monitor``/``mode``, judged at every validation run with that validation's metrics), ``interrupt_checkpoint.pth`` (Ctrl+C, a preemption
    signal or a crash inside ``fit``), and ``genesis_manifest.json``. Every file is a standard Lightning
    checkpoint plus the global RNG states, loadable with ``torch.load(weights_only=True)``.

    It works with ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` alike, and offers
    ModelCheckpoint's attributes (``best_model_path``, ``best_model_score``, ``best_k_models``,
    ``kth_best_model_path``, ``kth_value``, ``last_model_path``, ``current_score``, ``dirpath``): with it in
    the callbacks, ``trainer.test(ckpt_path="best")`` / ``"last"`` / no ``ckpt_path`` load its files, and
    loggers with ``log_model=True`` upload them.

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
        preserve: a preservation policy instead of ``keep_last`` and ``save_top_k``, e.g.
            ``AnyOf(LatestN(3), BestN(1, "val_loss"), EveryNSteps(10_000))`` (see
            :mod:`lightning_genesis_ckpt.preservation`); the same rules ``CheckpointManager`` and
            ``genesis-ckpt prune`` apply.
        every_n_epochs: save a rolling checkpoint every n epochs (and always after the final epoch);
            0 saves only the final epoch (``best_model.pth`` is still kept up to date).
        every_n_train_steps: also save ``checkpoint_step_{step}.pth`` every n optimizer steps (None: no step
            trigger). A run resumed from one continues bit-identically (see ``docs/resume.md``).
        train_time_interval: also save once this much time (a ``timedelta``) has passed since the last save,
            checked after every optimizer step; rank 0's clock decides.
        save_on_validation: also save after every validation run (``val_check_interval < 1`` saves several
            times per epoch).
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
        preemption_signals: signals that mean "this job is being preempted" (names or numbers, e.g.
            ``("SIGTERM", "SIGUSR1")`` for SLURM's ``--signal=USR1@120``). ``fit`` stops at the next safe
            point (after an optimizer step, never inside validation), commits the snapshot and exits.
        preemption_exit_code: the exit code of a preempted process; None: ``128 + signal`` (143 for
            SIGTERM), which schedulers read as "stopped by the signal, not finished".
        exclude_frozen: leave ``requires_grad=False`` parameters out of every checkpoint (LoRA); each keeps
            their fingerprint, the store one full copy, and a resume takes them from the model as constructed,
            refusing a changed base with :class:`FrozenBaseMismatchError` (see ``docs/performance.md``).
        frozen_buffers: state-dict keys of buffers to leave out as well (needs ``exclude_frozen``).
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
        preemption_signals: Sequence[SignalSpec] = ("SIGTERM",),
        preemption_exit_code: int | None = None,
        preserve: PreservationPolicy | None = None,
        every_n_train_steps: int | None = None,
        train_time_interval: datetime.timedelta | None = None,
        save_on_validation: bool = False,
        exclude_frozen: bool = False,
        frozen_buffers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        fit_state.validate_settings(mode, keep_last, save_top_k, every_n_epochs, monitor)
        fit_state.validate_triggers(every_n_train_steps, train_time_interval, save_on_validation)
        self.monitor = monitor
        self.mode: Mode = mode
        self.save_top_k = save_top_k
        self.auto_resume = auto_resume
        self.async_save = async_save
        self.save_on_exception = save_on_exception
        self.trusted = trusted
        self.verbose = verbose
        self.store = CheckpointStore(str(dirpath), storage_options, verbose=verbose)
        #: The checkpoint directory as ModelCheckpoint names it: an absolute local path, or the URL.
        self.dirpath = self.store.root if self.store.local else self.store.url
        self.triggers = Triggers(every_n_epochs, every_n_train_steps, train_time_interval, save_on_validation)
        #: When a scheduled checkpoint is due: epoch, step, time and validation triggers in one policy.
        self.save_policy = self.triggers.policy
        kept_best = (BestN(save_top_k, monitor, mode),) if monitor is not None else ()
        self.preserve: PreservationPolicy = preserve or AnyOf(LatestN(keep_last), *kept_best)
        self.paths = CheckpointPaths(self.store, monitor, mode, save_top_k, trusted)
        self.preemption = Preemption(preemption_signals, preemption_exit_code)
        self.frozen = frozen_saves.FrozenExclusion(exclude_frozen, frozen_buffers)
        #: The most recent record this callback committed.
        self.last_saved: CheckpointRecord | None = None
        self._uninstall_resume_hook: Any = None
        self._saver = BackgroundSaver()
        self._snapshots = SnapshotBuffers()
        self._fast_forward = FastForward()
        self._restored: dict[str, Any] = {}
        self._training_started = self._training_finished = False
        self._monitor_checked = self._types_checked = False
        self._unreported: CheckpointRecord | None = None
        self._trainer_ref: weakref.ref[Any] | None = None
        _lightning.install_ckpt_path_selection()

    def select_ckpt_path(
        self, trainer: Any, fn: str, ckpt_path: Any, model_provided: bool, model_connected: bool
    ) -> tuple[bool, Any]:
        """``ckpt_path="best"``/``"last"``/None for ``trainer.<fn>``: our files, whatever the callback order."""
        return self.paths.select(trainer, fn, ckpt_path, model_provided, model_connected)

    # ------------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_compatibility(trainer)
        self.frozen.check(trainer)
        self.store.verbose = self.verbose and trainer.is_global_zero
        # Every load of this trainer (auto-resume, ckpt_path="best"/"last", one of our files by name)
        # goes through the store: verified, and with the storage_options a URL needs.
        self._uninstall_resume_hook = install_resume_hook(
            trainer, lambda path: self.paths.resolve_for_load(trainer, path, auto_resume=self.auto_resume)
        )
        if stage != "fit":
            return
        self.paths.resumed_from = None
        self.preemption.reset()
        self._fast_forward = FastForward()
        self._restored = {}
        self._training_started = self._training_finished = False
        self._monitor_checked = self._types_checked = False
        # Lightning's convention: info lines come from global rank 0 only (every rank loads on resume).
        if trainer.is_global_zero:
            # Fail here, before any training step, rather than after the first epoch's work. Taking the lock
            # also settles what a killed writer left (only the holder may: it cannot be a live one's files).
            self.store.ensure_writable()
            self.store.acquire_lock()

    def _close(self) -> None:
        if self._uninstall_resume_hook is not None:
            self._uninstall_resume_hook()
            self._uninstall_resume_hook = None
        self.paths.forget_loaded()
        self.preemption.release()
        self.store.release_lock()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._saver.wait_logging_errors()
        self._close()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._fast_forward.candidate()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # The end of a successful fit: the last background save must have committed, or the user hears of it.
        self._saver.wait()
        self._report_commit(trainer)

    def state_dict(self) -> dict[str, Any]:
        # Captured when the checkpoint dict is built, i.e. at the save point; restored during Lightning's
        # restore, before the resumed run's first dataloader iterator draws its shuffle seed.
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        return self._fast_forward.capture(trainer if self._training_started else None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            rng.restore(state_dict["rng"])
            # The next train iterator may be made from exactly this state (a restart at an epoch boundary).
            self._fast_forward.candidate()
        # Applied at on_train_start, once Lightning has restored the optimizers and reset its metrics.
        self._restored = dict(state_dict)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._fast_forward.candidate()
        self.preemption.take_over(trainer, defer=False)  # nothing trained yet: stop at once

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer_ref = weakref.ref(trainer)
        self._training_started = True
        self.triggers.start()
        self.preemption.take_over(trainer, defer=True)
        restored, self._restored = self._restored, {}
        self._fast_forward.restore(trainer, restored)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._fast_forward.candidate()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._saver.raise_if_failed()
        if not self._saver.busy:
            self._report_commit(trainer)
        self._fast_forward.observe(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.triggers.at_steps
            and _lightning_loops.at_optimizer_step_boundary(trainer)
            and not self.triggers.deferred_to_epoch_end(trainer)
        ):
            self._save(trainer, "step")
        self.preemption.after_train_batch(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._training_started and not trainer.sanity_checking:
            self.preemption.validation_started(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self._training_started:
            return
        self.preemption.validation_ended(trainer)
        # Every rank checks (the metric names are the same everywhere), so every rank raises together.
        if not self._monitor_checked and self.monitor is not None:
            final = not _lightning_loops.may_log_at_epoch_end(trainer, self)
            self._monitor_checked = fit_state.check_monitor(trainer, self.monitor, final=final)
        self.triggers.validation_ended(trainer)
        if not self.triggers.deferred_to_epoch_end(trainer):
            # A validation in the middle of the epoch: the best is judged on its metrics, now.
            self._save(trainer, "validation")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._training_finished = True

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._monitor_checked and self.monitor is not None:
            self._monitor_checked = fit_state.check_monitor(trainer, self.monitor, final=True)
        try:
            self._save(trainer, "epoch")
        finally:
            self.preemption.epoch_ended(trainer)

    def _save(self, trainer: Any, event: Event) -> None:
        """One save point: decide on rank 0 (the schedule, and the best by this moment's metrics), then commit
        the checkpoint, its best copy and retention as one transaction."""
        context = self.triggers.context(trainer, event)
        if (
            event == "step"
            and not self.triggers.needs_rank_zero
            and not self.save_policy.should_save(context)
        ):
            return  # the common case between two step saves: a pure check, no collective, no I/O
        # The previous save must have committed before "is this the best?" is judged against the manifest.
        self._saver.wait()
        self._report_commit(trainer)
        metrics = self.triggers.fresh_metrics(trainer, event)
        value = fit_state.monitored_value(self.monitor, metrics)
        decision = commits.decide_everywhere(
            trainer,
            lambda: commits.decide(
                self.store,
                self.save_policy,
                self.triggers.epoch_policy,
                self.monitor,
                self.mode,
                value,
                context,
            ),
        )
        if decision is None:
            return
        if decision.due:
            self.triggers.saved(context.global_step)
        checkpoint = dump_checkpoint(trainer)
        fields = {
            "epoch": context.epoch,
            "global_step": context.global_step,
            "metrics": metrics,
            "monitor": self.monitor,
        }
        if writes_directory(trainer.strategy):
            # Sharded state: every rank writes its shard through the strategy, synchronously.
            record = commits.commit_sharded(
                self.store, trainer, checkpoint, decision, fields, self.preserve, self.resumed_from
            )
            if record is not None:
                self.last_saved = self._unreported = record
                self._report_commit(trainer)
            return
        if not trainer.is_global_zero:
            return
        self._check_types(checkpoint, decision.name)
        checkpoint = self.frozen.apply(self.store, trainer, checkpoint)
        if self.async_save:
            snapshot = self._snapshots.snapshot(checkpoint)
            del checkpoint
            self._saver.submit(lambda: self._commit(snapshot, decision, fields))
        else:
            self._commit(checkpoint, decision, fields)
            self._report_commit(trainer)

    def _commit(self, checkpoint: dict[str, Any], decision: SaveDecision, fields: dict[str, Any]) -> None:
        """The checkpoint, best_model.pth and retention, as one transaction (see :mod:`.commits`)."""
        record = commits.commit(self.store, checkpoint, decision, fields, self.preserve, self.resumed_from)
        # Loggers hear of it on the training thread (async saves run elsewhere).
        self.last_saved = self._unreported = record

    def _report_commit(self, trainer: Any) -> None:
        """``logger.after_save_checkpoint`` for a new commit, as ModelCheckpoint calls it (rank 0 only)."""
        record, self._unreported = self._unreported, None
        if record is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.after_save_checkpoint(weakref.proxy(self))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # A save in flight finishes (and commits) first; its failure must not hide the original exception.
        self._saver.wait_logging_errors()
        preempted = isinstance(exception, SIGTERM_EXCEPTIONS)
        # Lightning calls no teardown hook after an exception: the lock goes here, after the snapshot.
        try:
            self._save_snapshot(trainer, exception, preempted)
        finally:
            self._close()
            if preempted and isinstance(exception, SystemExit) and exception.code is None:
                # SIGTERMException is a SystemExit without a code: the process would exit 0, "finished".
                exception.code = self.preemption.exit_code()

    def _save_snapshot(self, trainer: Any, exception: BaseException, preempted: bool) -> None:
        what = self.preemption.describe() if preempted else type(exception).__name__
        reason = fit_state.no_snapshot_reason(
            trainer,
            exception,
            started=self._training_started,
            finished=self._training_finished,
            enabled=self.save_on_exception,
        )
        if reason is not None:
            if preempted and trainer.is_global_zero:
                snapshot.warn_not_taken(self.store, self.paths.view().last, what, reason)
            return
        record = snapshot.take(
            self.store,
            trainer,
            monitor=self.monitor,
            what=what,
            check_types=self._check_types,
            elapsed=lambda: self.preemption.seconds_since_signal() if preempted else None,
            prepare=lambda checkpoint: self.frozen.apply(self.store, trainer, checkpoint),
        )
        self.last_saved = record or self.last_saved

    # ------------------------------------------------------------------------------------ helpers
    def _check_types(self, checkpoint: dict[str, Any], name: str) -> None:
        """At the first save of a fit: warn about objects weights-only loading would refuse on resume."""
        if not (self._types_checked or self.trusted):
            self._types_checked = True
            safe_types.warn_refused(checkpoint, self.store.url_for(name))
