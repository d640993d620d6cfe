"""Mid-epoch resume: the interrupted epoch goes on with the batches it would have had, none loaded twice.

A snapshot from the middle of an epoch restores the model, optimizer, loops and RNG, but Lightning restarts a
``DataLoader`` from a new shuffle, so the rest of that epoch trains on other batches. This module records
what decides an epoch's batches and replays it on resume:

* **Recording.** A DataLoader iterator draws one int64 from the global torch RNG when it is made (its
  ``_base_seed``, which also seeds its workers), and a sampler drawing from the global RNG (the default
  ``RandomSampler``, or a user's ``torch.randperm`` shuffle) draws its order just after. So the RNG states just
  before the epoch's iterator was made determine the whole epoch. Lightning makes that iterator between
  hooks, so the states at the hooks before it (fit start, after a restore, sanity-check start, epoch start)
  are candidates; the one whose first draw equals the live iterator's ``_base_seed`` is the state that made
  this epoch. A persistent-workers iterator is made once and only *reset* at later epochs (no base seed
  drawn): for those the epoch-start state is recorded beside the state that made the iterator.
* **Replaying.** On resume, after the fit loop has made its own iterator, :meth:`FastForward.resume` sets the
  RNG back, makes the iterator again with its index sampler wrapped so that it starts at the snapshot's batch
  (:mod:`.loader_position`: no sample is loaded for the skipped batches, in this process or in a worker),
  then restores the RNG states of the snapshot. Lightning's fetcher does not prefetch from a sized loader, so
  with ``num_workers=0`` batch ``k`` is loaded at the same RNG state as in the uninterrupted run: random
  augmentations in ``__getitem__`` come out the same too.

Exact: one train ``DataLoader`` over a map-style dataset, any ``num_workers``, ``persistent_workers``, the
default or a custom ``Sampler``/``batch_sampler`` whose order comes from the global RNGs (torch, numpy,
Python) or from ``set_epoch`` (``DistributedSampler`` under DDP, each rank skipping the same number of
batches). A loader with its own ``state_dict`` (torchdata's ``StatefulDataLoader``) is restored by Lightning
and not fast-forwarded. Not exact, with a warning at the first mid-epoch save naming the reason: an
``IterableDataset`` without state, a ``generator=`` on the loader or sampler, several train loaders. Limits
of workers: a worker's own RNG is reseeded per epoch from the base seed, so the indices are exact, but random
augmentations drawn inside workers differ unless they depend only on the index (the skipped batches' draws
are not replayed); the resume must stop at a batch boundary (preemption signals do).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from . import _lightning_loops, epoch_metrics, fit_state, loader_position, rng

log = logging.getLogger(__name__)

_MAX_CANDIDATES = 8


def _first_draw(state: dict[str, Any]) -> int:
    """The int64 a DataLoader iterator created at RNG states ``state`` takes as its ``_base_seed``."""
    g = torch.Generator()
    g.set_state(state["torch"])
    return int(torch.empty((), dtype=torch.int64).random_(generator=g).item())


@dataclass(frozen=True)
class EpochStart:
    """The epoch whose iterator the RNG states ``rng`` created (``base_seed`` proves it); ``reset_rng``: the
    states at which a persistent iterator, made at an earlier epoch, started this one."""

    epoch: int
    rng: dict[str, Any]
    base_seed: int
    reset_rng: dict[str, Any] | None = None


def _ref(obj: Any) -> weakref.ref[Any] | None:
    try:
        return None if obj is None else weakref.ref(obj)
    except TypeError:  # an iterator type without weak references: treated as made anew every epoch
        return None


class FastForward:
    """Records how each epoch's batches were drawn, and replays an interrupted epoch on resume."""

    def __init__(self) -> None:
        self._candidates: list[dict[str, Any]] = []
        self.epoch_start: EpochStart | None = None
        self._observed_epoch: int | None = None
        # The iterator the recorded epoch start belongs to: a persistent one lives on into later epochs.
        self._recorded_iterator: weakref.ref[Any] | None = None
        self._warned = False

    def candidate(self) -> None:
        """Note the current RNG states: a train iterator may be made, or reset, before the next hook."""
        self._candidates = [*self._candidates[-(_MAX_CANDIDATES - 1) :], rng.capture()]

    def observe(self, trainer: Any) -> None:
        """At the epoch's first batch: find which noted state made (or reset) the live train iterator."""
        epoch = trainer.current_epoch
        if self._observed_epoch == epoch:
            return
        self._observed_epoch = epoch
        previous, self.epoch_start = self.epoch_start, None
        if previous is not None and previous.epoch == epoch:
            self.epoch_start = previous  # a resumed epoch: replayed from the snapshot's record
            return
        iterator = loader_position.live_iterator(trainer)
        same = (
            iterator is not None
            and self._recorded_iterator is not None
            and self._recorded_iterator() is iterator
        )
        if same and previous is not None and self._candidates and loader_position.reuses_iterator(trainer):
            # A persistent iterator, reset for this epoch: its base seed was drawn at an earlier epoch, and
            # the sampler draws its order at the reset, made right after the epoch-start hook.
            self.epoch_start = EpochStart(epoch, previous.rng, previous.base_seed, self._candidates[-1])
        else:
            base_seed = getattr(iterator, "_base_seed", None)
            for state in reversed(self._candidates if isinstance(base_seed, int) else []):
                if _first_draw(state) == base_seed:
                    self.epoch_start = EpochStart(epoch, state, int(base_seed))
                    break
        self._recorded_iterator = _ref(iterator)
        self._candidates = []

    def plan(self, trainer: Any) -> tuple[dict[str, Any] | None, str | None]:
        """``(plan, None)`` to store in a mid-epoch checkpoint, or ``(None, reason)`` when it is not
        fast-forwarded (:data:`.loader_position.OWN_STATE` when the loader restores its own position)."""
        reason = loader_position.unsupported_reason(trainer)
        start = self.epoch_start
        if reason is None and (start is None or start.epoch != trainer.current_epoch):
            reason = "the RNG state that shuffled this epoch could not be identified"
        if reason is not None or start is None:
            return None, reason
        plan = {
            "epoch": start.epoch,
            "batches": fit_state.batches_trained(trainer),
            "rng": start.rng,
            "base_seed": start.base_seed,
            "reset_rng": start.reset_rng,
        }
        return plan, None

    def warn_once(self, trainer: Any, reason: str) -> None:
        """The first mid-epoch save of a fit that will not resume exactly says so, naming the loader."""
        if self._warned or reason == loader_position.OWN_STATE or not trainer.is_global_zero:
            return
        self._warned = True
        loaders = _lightning_loops.train_loaders(trainer)
        names = ", ".join(type(dl).__name__ for dl in loaders) or "none"
        log.warning(
            "mid-epoch checkpoint at epoch %d, batch %d: a resume from it will not be bit-identical. The train "
            "dataloader (%s) is not fast-forwarded, because %s; the resumed run starts that epoch's loader "
            "again (Lightning's behaviour). Checkpoints at epoch ends are exact. This is said once per fit.",
            trainer.current_epoch,
            fit_state.batches_trained(trainer),
            names,
            reason,
        )

    def resume(self, trainer: Any, plan: dict[str, Any]) -> str | None:
        """Position the train iterator at the snapshot's batch; returns why not, or None once done.

        The caller restores the snapshot's RNG state afterwards: making the iterator used the RNG.
        """
        epoch, batches = int(plan["epoch"]), int(plan["batches"])
        # processed, not completed: a checkpoint from on_train_batch_end counts its batch as processed only
        # (Lightning completes it when the loop restarts, after this point).
        done = fit_state.batches_trained(trainer)
        if trainer.current_epoch != epoch or done != batches:
            return f"the restored loops are at epoch {trainer.current_epoch} batch {done}"
        reason = loader_position.unsupported_reason(trainer)
        if reason is not None:
            return reason
        loader_position.position(trainer, plan)
        iterator = loader_position.live_iterator(trainer)
        if getattr(iterator, "_base_seed", None) != plan["base_seed"]:
            return "the train DataLoader does not draw its shuffle as it did when the snapshot was taken"
        states = plan["rng"] if isinstance(plan["rng"], dict) else {"torch": plan["rng"]}
        self.epoch_start = EpochStart(epoch, states, int(plan["base_seed"]), plan.get("reset_rng"))
        self._observed_epoch = epoch
        self._recorded_iterator = _ref(iterator)
        log.info(
            "fast-forwarded the train DataLoader to batch %d of epoch %d: same order, no batch repeated, none "
            "of the skipped ones loaded (Lightning's warning that the dataloader is not resumable does not "
            "apply)",
            batches,
            epoch,
        )
        return None

    def capture(self, trainer: Any | None) -> dict[str, Any]:
        """The callback state a checkpoint carries: the global RNG states and, once training has started
        (``trainer`` given), the logged metrics, pending plateau steps and, mid-epoch, the epoch's running
        means and its fast-forward plan. The inverse of :meth:`restore`."""
        state: dict[str, Any] = {"rng": rng.capture()}
        if trainer is not None:
            state["callback_metrics"] = _lightning_loops.scalar_callback_metrics(trainer)
            state["plateau_steps"] = _lightning_loops.pending_plateau_steps(trainer)
            if fit_state.mid_epoch(trainer):
                state["epoch_metrics"] = epoch_metrics.capture(trainer)
                plan, reason = self.plan(trainer)
                if plan is not None:
                    state["fast_forward"] = plan
                elif reason is not None:
                    self.warn_once(trainer, reason)
        return state

    def restore(self, trainer: Any, restored: dict[str, Any]) -> None:
        """Apply the callback state a resumed run restored, once Lightning has restored the optimizers and reset
        its metrics (at ``on_train_start``): the logged metrics, the interrupted epoch's running means, pending
        plateau steps, and the interrupted epoch's remaining batches."""
        if restored.get("callback_metrics"):
            _lightning_loops.restore_callback_metrics(trainer, restored["callback_metrics"])
        if restored.get("epoch_metrics"):
            epoch_metrics.restore(trainer, restored["epoch_metrics"])
        if restored.get("plateau_steps"):
            _lightning_loops.step_plateau_schedulers(trainer, restored["plateau_steps"])
        plan = restored.get("fast_forward")
        if plan is not None:
            reason = self.resume(trainer, plan)
            if reason is not None:
                log.warning("the resumed epoch cannot continue with the same batches: %s", reason)
        if plan is not None or "epoch_metrics" in restored:
            # Mid-epoch, the original run went on from the saved states with no iterator made in between;
            # the resumed run has made one (a StatefulDataLoader's too, which draws a base seed).
            rng.restore(restored["rng"])
