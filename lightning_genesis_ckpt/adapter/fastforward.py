"""Mid-epoch resume of a plain DataLoader: the interrupted epoch goes on with the batches it would have had.

A snapshot from the middle of an epoch restores the model, optimizer, loops and RNG, but Lightning restarts a
plain ``DataLoader`` from a new shuffle, so the rest of that epoch trains on other batches. This module
records what decides an epoch's batches and replays it on resume:

* **Recording.** A DataLoader iterator draws one int64 from the global torch RNG when it is created (its
  ``_base_seed``), and a default ``RandomSampler`` draws its permutation seed from the same RNG just after.
  So the torch RNG state just before the epoch's iterator was created determines the whole epoch. Lightning
  creates that iterator between hooks, so the states at the hooks before it (fit start, after a restore,
  sanity-check start, epoch start) are candidates; the one whose first draw equals the live iterator's
  ``_base_seed`` is the state that made this epoch.
* **Replaying.** On resume, after the fit loop has made its own iterator, :meth:`FastForward.resume` sets
  the RNG back to that state, makes the iterator again, advances its *index* sampler past the batches the
  epoch had trained on (no sample is loaded for them), then restores the RNG state of the snapshot.
  Lightning's fetcher does not prefetch from a sized loader, so batch ``k`` is loaded at the same RNG state
  as in the uninterrupted run: random augmentations in ``__getitem__`` come out the same too.

Supported: one process, one train ``DataLoader`` with ``num_workers=0``, a map-style dataset, and the default
samplers (``RandomSampler`` or ``SequentialSampler`` without a ``generator``, under the default
``BatchSampler``); the resume must stop at a batch boundary (preemption signals do). Anything else falls back
to Lightning's behaviour (the epoch restarts from a new shuffle), with a warning naming the reason. Extending
it: workers need the skip applied before the iterator hands out indices (a wrapping batch sampler); DDP needs
each rank's ``DistributedSampler`` epoch and position; custom samplers need their own ``state_dict``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler

from . import _lightning_loops, epoch_metrics, fit_state, rng

log = logging.getLogger(__name__)

_MAX_CANDIDATES = 8


def _first_draw(state: torch.Tensor) -> int:
    """The int64 a DataLoader iterator created at RNG state ``state`` takes as its ``_base_seed``."""
    g = torch.Generator()
    g.set_state(state)
    return int(torch.empty((), dtype=torch.int64).random_(generator=g).item())


@dataclass(frozen=True)
class EpochStart:
    """The epoch whose iterator the torch RNG state ``rng`` created (``base_seed`` proves it)."""

    epoch: int
    rng: torch.Tensor
    base_seed: int


def unsupported_reason(trainer: Any) -> str | None:
    """Why this run's train data cannot be fast-forwarded, or None when it can."""
    if trainer.world_size > 1:
        return f"{trainer.world_size} processes (only single-process runs are fast-forwarded)"
    loaders = _lightning_loops.train_loaders(trainer)
    if len(loaders) != 1:
        return f"{len(loaders)} train dataloaders (only one is fast-forwarded)"
    dl = loaders[0]
    if not isinstance(dl, DataLoader):
        return f"the train dataloader is a {type(dl).__name__}, not a torch DataLoader"
    if isinstance(dl.dataset, IterableDataset):
        return "the train dataset is an IterableDataset"
    if dl.num_workers > 0:
        return f"the train DataLoader has num_workers={dl.num_workers} (only 0 is fast-forwarded)"
    if dl.generator is not None:
        return "the train DataLoader has its own generator="
    sampler = dl.sampler
    if type(dl.batch_sampler) is not BatchSampler or type(sampler) not in (RandomSampler, SequentialSampler):
        return f"the train DataLoader uses a custom sampler ({type(sampler).__name__})"
    if getattr(sampler, "generator", None) is not None:
        return "the train DataLoader's RandomSampler has its own generator="
    return None


class _Positioned:
    """A DataLoader seen through this wrapper makes its next iterator start at batch ``skip``."""

    def __init__(self, loader: DataLoader, skip: int) -> None:
        self.loader = loader
        self.skip = skip

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        indices = it._sampler_iter
        for _ in range(self.skip):
            next(indices, None)
        # Start the sampler now, while the RNG is still at the epoch's start: RandomSampler draws its
        # permutation seed at its first item, which in the original run came right after the base seed.
        first = list(itertools.islice(indices, 1))
        it._sampler_iter = itertools.chain(first, indices)
        return it


class FastForward:
    """Records how each epoch's batches were drawn, and replays an interrupted epoch on resume."""

    def __init__(self) -> None:
        self._candidates: list[torch.Tensor] = []
        self.epoch_start: EpochStart | None = None
        self._observed_epoch: int | None = None

    def candidate(self) -> None:
        """Note the current RNG state: a train iterator may be created before the next hook."""
        self._candidates = [*self._candidates[-(_MAX_CANDIDATES - 1) :], torch.get_rng_state()]

    def observe(self, trainer: Any) -> None:
        """At the epoch's first batch: find which noted state created the live train iterator."""
        epoch = trainer.current_epoch
        if self._observed_epoch == epoch:
            return
        self._observed_epoch = epoch
        if self.epoch_start is not None and self.epoch_start.epoch == epoch:
            return  # a resumed epoch: replayed from the snapshot's record
        self.epoch_start = None
        iterators = _lightning_loops.train_iterators(trainer)
        base_seed = getattr(iterators[0], "_base_seed", None) if len(iterators) == 1 else None
        if isinstance(base_seed, int):
            for state in reversed(self._candidates):
                if _first_draw(state) == base_seed:
                    self.epoch_start = EpochStart(epoch, state, base_seed)
                    break
        self._candidates = []

    def plan(self, trainer: Any) -> tuple[dict[str, Any] | None, str | None]:
        """``(plan, None)`` to store in a mid-epoch snapshot, or ``(None, reason)`` when it cannot be exact."""
        reason = unsupported_reason(trainer)
        start = self.epoch_start
        if reason is None and (start is None or start.epoch != trainer.current_epoch):
            reason = "the RNG state that shuffled this epoch could not be identified"
        if reason is not None or start is None:
            return None, reason
        batches = fit_state.batches_trained(trainer)
        plan = {"epoch": start.epoch, "batches": batches, "rng": start.rng, "base_seed": start.base_seed}
        return plan, None

    def resume(self, trainer: Any, plan: dict[str, Any]) -> str | None:
        """Position the train iterator at the snapshot's batch; returns why not, or None once done.

        The caller restores the snapshot's RNG state afterwards: making the iterator used the torch RNG.
        """
        epoch, batches = int(plan["epoch"]), int(plan["batches"])
        # processed, not completed: a checkpoint from on_train_batch_end counts its batch as processed only
        # (Lightning completes it when the loop restarts, after this point).
        done = fit_state.batches_trained(trainer)
        if trainer.current_epoch != epoch or done != batches:
            return f"the restored loops are at epoch {trainer.current_epoch} batch {done}"
        reason = unsupported_reason(trainer)
        if reason is not None:
            return reason
        torch.set_rng_state(plan["rng"])
        _lightning_loops.restart_train_iterator(trainer, lambda dl: _Positioned(dl, batches))
        iterators = _lightning_loops.train_iterators(trainer)
        if getattr(iterators[0], "_base_seed", None) != plan["base_seed"]:
            return "the train DataLoader does not draw its shuffle as it did when the snapshot was taken"
        self.epoch_start = EpochStart(epoch, plan["rng"], int(plan["base_seed"]))
        self._observed_epoch = epoch
        log.info(
            "fast-forwarded the train DataLoader to batch %d of epoch %d: same shuffle, no batch repeated "
            "(Lightning's warning that the dataloader is not resumable does not apply)",
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
                plan, _ = self.plan(trainer)
                if plan is not None:
                    state["fast_forward"] = plan
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
            rng.restore(restored["rng"])  # making the iterator again drew from the RNG
