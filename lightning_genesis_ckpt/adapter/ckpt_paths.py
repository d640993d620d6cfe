"""Which of our checkpoints Lightning loads: auto-resume, ``ckpt_path="best"``/``"last"``, and named files.

Every load goes through the store, checksum-verified and weights-only (plus the known-safe types), so an
``s3://`` URL that needs ``storage_options`` (a custom endpoint, credentials) loads as well as a local path;
Lightning's own CheckpointIO would open such a URL without them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from ..core.display import transfer_summary
from ..core.preservation import Mode
from ..core.records import CheckpointRecord
from ..storage.resume import Resolution, resolve
from ..storage.store import CheckpointStore
from . import distributed
from ._lightning import LocalPathOpener, Resolved
from .frozen_saves import completed
from .surface import CheckpointView, view

log = logging.getLogger(__name__)

_LIGHTNING_TRAINING_KEYS = ("state_dict", "loops", "optimizer_states", "lr_schedulers")


def validate_training_checkpoint(checkpoint: Any) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None: it can)."""
    if not isinstance(checkpoint, dict):
        return f"not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)"
    missing = [k for k in _LIGHTNING_TRAINING_KEYS if k not in checkpoint]
    if missing:
        return f"not a Lightning training checkpoint (missing {', '.join(missing)})"
    return None


def validate_weights_checkpoint(checkpoint: Any) -> str | None:
    """Why ``checkpoint`` cannot be tested / validated / predicted with (None: it can)."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a Lightning checkpoint (no state_dict)"
    return None


class CheckpointPaths:
    """The reading side of :class:`GenesisCheckpoint`, for Lightning's restore and ``ckpt_path``.

    Args:
        store: the checkpoint directory.
        monitor, mode, k: what "best" means (see :func:`lightning_genesis_ckpt.surface.view`).
        trusted: load files that need full pickle.
    """

    def __init__(
        self, store: CheckpointStore, monitor: str | None, mode: Mode, k: int, trusted: bool
    ) -> None:
        self.store = store
        self.monitor = monitor
        self.mode: Mode = mode
        self.k = k
        self.trusted = trusted
        #: The record the current ``fit`` resumed from, if any.
        self.resumed_from: CheckpointRecord | None = None
        # "last" is verified and loaded when it is chosen; the restore then takes it from here.
        self._loaded: dict[str, Any] = {}

    def view(self) -> CheckpointView:
        return view(self.store.records(), self.monitor, self.mode, self.k)

    def url(self, record: CheckpointRecord | None) -> str:
        return "" if record is None else self.store.url_for(record.name)

    # ------------------------------------------------------------------------------ ckpt_path
    def select(
        self, trainer: Any, fn: str, ckpt_path: Any, model_provided: bool, model_connected: bool
    ) -> tuple[bool, Any]:
        """Answer ``ckpt_path`` for ``trainer.<fn>(...)``: ``(True, path)``, or ``(False, None)`` for Lightning.

        ``"best"`` and ``"last"`` name our files wherever the callback is listed and whether or not a
        ``ModelCheckpoint`` is there too; so does no ``ckpt_path`` at all in test / validate / predict
        after ``fit`` (Lightning's "best" default). Everything else is Lightning's to resolve.
        """
        if ckpt_path is None and fn != "fit" and not model_provided and model_connected:
            ckpt_path = "best"
            if trainer.is_global_zero:
                log.warning(
                    "trainer.%s() was called without a model or ckpt_path: using the best checkpoint of "
                    "GenesisCheckpoint in %s (pass ckpt_path='best' or 'last' to choose and silence this)",
                    fn,
                    self.store.url,
                )
        if ckpt_path == "best":
            best = self.view().best
            if best is None:
                how = (
                    "no checkpoint was committed yet"
                    if self.monitor is None
                    else f"none has a {self.monitor!r} value yet"
                )
                raise ValueError(
                    f'.{fn}(ckpt_path="best"): GenesisCheckpoint has no best checkpoint in {self.store.url} '
                    f"({how}); pass an explicit ckpt_path"
                )
            return True, self.url(best)
        if ckpt_path == "last":
            validate = validate_training_checkpoint if fn == "fit" else validate_weights_checkpoint
            found = resolve(self.store, trusted=self.trusted, validate=validate)
            if found.record is None:
                log.warning(
                    '.%s(ckpt_path="last"): no checkpoint in %s yet; nothing is loaded', fn, self.store.url
                )
                return True, None
            url = self.url(found.record)
            if found.checkpoint is not None:
                self._loaded[url] = found.checkpoint
            return True, url
        return False, None

    # --------------------------------------------------------------------------------- loading
    def record_named_by(self, path: str) -> CheckpointRecord | None:
        """The committed record that ``path`` (a URL or local path) names in this store, if any."""
        name = self.store.name_of(path)
        return None if name is None else self.store.manifest().get(name)

    def resolve_for_load(self, trainer: Any, path: str | None, *, auto_resume: bool) -> Resolved:
        """The resume hook's answer (see :func:`lightning_genesis_ckpt._lightning.install_resume_hook`): a
        checkpoint saved without its frozen parameters comes completed from the model (:mod:`.frozen_saves`)."""
        return completed(trainer, self._resolve_for_load(trainer, path, auto_resume=auto_resume))

    def _resolve_for_load(self, trainer: Any, path: str | None, *, auto_resume: bool) -> Resolved:
        fn = str(getattr(trainer.state.fn, "value", trainer.state.fn))
        if path is None:
            if fn != "fit" or not auto_resume:
                return None
            return self.resume(trainer)
        loaded = self._loaded.pop(path, None)
        record = self.record_named_by(path)
        if record is None:
            return None  # not ours: Lightning loads it
        if record.is_directory:
            return path, lambda: self.store.local_copy(record.name)
        if loaded is None:
            loaded = self.store.load(record.name, trusted=self.trusted)
        if fn == "fit":
            self.resumed_from = None  # an explicit ckpt_path, not an auto-resume
        return path, loaded

    def resume(self, trainer: Any) -> tuple[str, dict[str, Any] | LocalPathOpener] | None:
        """Auto-resume: the newest valid checkpoint, verified and loaded (None: start fresh)."""
        start = time.perf_counter()
        if trainer.world_size > 1:
            found = self._resolve_distributed(trainer)
        else:
            found = resolve(self.store, trusted=self.trusted, validate=validate_training_checkpoint)
        if found.record is None:
            return None
        rec = found.record
        self.resumed_from = rec
        if self.store.verbose and trainer.is_global_zero:
            log.info(
                "resuming from %s (epoch %s, step %s; verified and loaded %s)",
                self.store.url_for(rec.name),
                rec.epoch,
                rec.global_step,
                transfer_summary(rec.size, time.perf_counter() - start),
            )
        if rec.is_directory:
            return self.store.url_for(rec.name), lambda: self.store.local_copy(rec.name)
        return self.store.url_for(rec.name), found.checkpoint

    def _resolve_distributed(self, trainer: Any) -> Resolution:
        """Rank 0 chooses (its result, or its error, reaches every rank: :mod:`.distributed`); every rank then
        loads that same file, checksum-verified."""
        found = Resolution(record=None)

        def choose() -> str | None:
            nonlocal found
            found = resolve(self.store, trusted=self.trusted, validate=validate_training_checkpoint)
            return None if found.record is None else found.record.name

        name = distributed.on_rank_zero(trainer.strategy, trainer.is_global_zero, trainer.world_size, choose)
        if name is None or trainer.is_global_zero:
            return found
        try:
            record = self.store.manifest(refresh=True).get(name)
            if record is not None and record.is_directory:
                return Resolution(record=record)  # the strategy loads it, on every rank (see the hook)
            checkpoint = self.store.load(name, trusted=self.trusted)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"rank {trainer.global_rank} cannot read {self.store.url_for(name)}, chosen by rank 0 for "
                "resuming: with several nodes, dirpath must be storage that all nodes share (for example s3://...)"
            ) from e
        return Resolution(record=record, checkpoint=checkpoint)

    def forget_loaded(self) -> None:
        self._loaded.clear()


class ModelCheckpointAttributes:
    """ModelCheckpoint's attributes with its meanings, read from the manifest (``paths``): correct after a
    resume and in a new process. ``dirpath``, ``monitor``, ``mode`` and ``save_top_k`` are plain attributes
    of the class that mixes this in."""

    paths: CheckpointPaths
    monitor: str | None
    mode: Mode
    last_saved: CheckpointRecord | None

    @property
    def resumed_from(self) -> CheckpointRecord | None:
        """The record auto-resume restored from in the current ``fit``, if any."""
        return self.paths.resumed_from

    @property
    def best_model_path(self) -> str:
        """``best_model.pth`` (with a ``monitor``) or the newest rolling checkpoint (without); "" if none."""
        return self.paths.url(self.paths.view().best)

    @property
    def best_model_score(self) -> torch.Tensor | None:
        best = self.paths.view().best
        value = None if best is None or self.monitor is None else best.metric()
        return None if value is None else torch.tensor(value)

    @property
    def best_k_models(self) -> dict[str, torch.Tensor]:
        """The ``save_top_k`` best checkpoints (at least 1) by ``monitor``: path or URL -> score."""
        return {self.paths.url(r): torch.tensor(r.metric()) for r in self.paths.view().best_k}

    @property
    def kth_best_model_path(self) -> str:
        return self.paths.url(self.paths.view().kth)

    @property
    def kth_value(self) -> torch.Tensor:
        kth = self.paths.view().kth
        value = None if kth is None else kth.metric()
        return torch.tensor(value if value is not None else (math.inf if self.mode == "min" else -math.inf))

    @property
    def last_model_path(self) -> str:
        """The newest checkpoint with a full training state (what auto-resume and ``ckpt_path="last"`` use)."""
        return self.paths.url(self.paths.view().last)

    @property
    def current_score(self) -> torch.Tensor | None:
        """The ``monitor`` value of the checkpoint committed last by this callback."""
        value = None if self.last_saved is None else self.last_saved.metric()
        return None if value is None else torch.tensor(value)
