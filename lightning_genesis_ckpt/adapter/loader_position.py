"""Which train DataLoaders can be fast-forwarded, and the index-level skip that positions one mid-epoch.

The skip wraps the loader's *index sampler* (its ``batch_sampler``, or its ``sampler`` when batching is off)
while the fit loop makes the iterator again. The wrapper hands the iterator the sampler's indices from batch
``skip`` on, so nothing is loaded for the skipped batches, not even by worker processes, which receive their
first indices while the iterator is being made. The inner sampler is iterated as in the original run and at
the same moment (its ``__iter__`` when the iterator calls ``iter``, its first draw at the first index), so a
sampler that draws its order from the global RNG draws the same order.

A loader that keeps its own position (``state_dict``/``load_state_dict``, e.g. torchdata's
``StatefulDataLoader``) is left alone: Lightning saves and restores its state in the loops' state, and a skip
on top of it would skip twice.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from . import _lightning_loops, rng

#: Returned by :func:`unsupported_reason` for a loader that restores its own position (not a warning).
OWN_STATE = "the train dataloader keeps its own state (state_dict/load_state_dict), which Lightning restores"


def keeps_own_state(loader: Any) -> bool:
    """Whether ``loader`` saves and restores its position itself, as Lightning's ``_Stateful`` protocol asks."""
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


def unsupported_reason(trainer: Any) -> str | None:
    """Why this run's train data cannot be fast-forwarded, or None when it can (:data:`OWN_STATE` when the
    loader positions itself)."""
    loaders = _lightning_loops.train_loaders(trainer)
    if len(loaders) != 1:
        return f"{len(loaders)} train dataloaders (only one is fast-forwarded)"
    dl = loaders[0]
    if keeps_own_state(dl):
        return OWN_STATE
    if not isinstance(dl, DataLoader):
        return f"the train dataloader is a {type(dl).__name__}, not a torch DataLoader"
    if isinstance(dl.dataset, IterableDataset):
        return (
            f"the train dataset is an IterableDataset ({type(dl.dataset).__name__}) with no state_dict: its "
            "position cannot be restored without re-reading it (use torchdata's StatefulDataLoader)"
        )
    if dl.generator is not None:
        return "the train DataLoader has its own generator= (its state is not recorded)"
    index_sampler = dl.batch_sampler if dl.batch_sampler is not None else dl.sampler
    samplers = [dl.sampler, getattr(dl.batch_sampler, "sampler", None)]
    if not hasattr(index_sampler, "__len__"):
        return f"the train DataLoader's sampler {type(index_sampler).__name__} has no __len__"
    if any(getattr(s, "generator", None) is not None for s in samplers):
        return "the train DataLoader's sampler has its own generator= (its state is not recorded)"
    if trainer.world_size > 1 and not any(isinstance(s, DistributedSampler) for s in samplers):
        return (
            f"{trainer.world_size} processes without a DistributedSampler (the ranks' orders cannot be "
            "replayed from rank 0's RNG)"
        )
    return None


def _skipping(indices: Iterator[Any], skip: int) -> Iterator[Any]:
    # Consumed in C, so 10,000 batches of indices are skipped in milliseconds; nothing is loaded for them.
    collections.deque(itertools.islice(indices, skip), maxlen=0)
    yield from indices


class _SkipFirst:
    """An index sampler that, while armed, starts every iterator ``skip`` items in (after restoring the RNG
    states ``reset_rng``, when given: a persistent iterator's epoch drew its order at a later state than the
    one that made the iterator). Disarmed, it is the inner sampler."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed: tuple[int, dict[str, Any] | None] | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __iter__(self) -> Iterator[Any]:
        if self.armed is None:
            return iter(self.inner)
        skip, reset_rng = self.armed
        if reset_rng is not None:
            rng.restore(reset_rng)
        return _skipping(iter(self.inner), skip)


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` on the loader's samplers, as Lightning's fit loop does only after ``on_train_start``."""
    for sampler in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


def position(trainer: Any, plan: dict[str, Any]) -> None:
    """Make the train iterator again, at batch ``plan["batches"]`` of epoch ``plan["epoch"]``.

    ``plan["rng"]`` is the RNG state that made the epoch's iterator (its base seed, hence the workers' seeds);
    ``plan.get("reset_rng")`` the state at which a persistent iterator started the epoch, when later.
    """
    dl = _lightning_loops.train_loaders(trainer)[0]
    attr = "batch_sampler" if dl.batch_sampler is not None else "sampler"
    original = getattr(dl, attr)
    wrapper = _SkipFirst(original)
    set_sampler_epoch(dl, int(plan["epoch"]))
    # DataLoader refuses new samplers after __init__; the swap lasts only while the iterator is made.
    object.__setattr__(dl, attr, wrapper)
    try:
        if dl.persistent_workers and dl.num_workers > 0 and dl._iterator is not None:
            # Lightning's iterator has workers seeded from this process's RNG: the epoch needs the original's.
            dl._iterator._shutdown_workers()
            dl._iterator = None
        if isinstance(plan["rng"], dict):
            rng.restore(plan["rng"])
        else:  # a plan from before the other generators were recorded: the torch state alone
            torch.set_rng_state(plan["rng"])
        reset_rng = plan.get("reset_rng")
        if reset_rng is not None:
            # First the workers and the base seed, with every index skipped so that none is prefetched;
            # then the reset that starts the epoch, at the state the original epoch started at.
            wrapper.armed = (len(original), None)
            _lightning_loops.restart_train_iterator(trainer, lambda loader: loader)
        wrapper.armed = (int(plan["batches"]), reset_rng)
        _lightning_loops.restart_train_iterator(trainer, lambda loader: loader)
        if dl.num_workers == 0:
            _start_sampler(live_iterator(trainer))
    finally:
        wrapper.armed = None
        object.__setattr__(dl, attr, original)


def _start_sampler(iterator: Any) -> None:
    """Take the first index now, while the RNG is at the epoch's start: without workers the original run's
    sampler drew its order at the first batch, right after the iterator drew its base seed."""
    indices = getattr(iterator, "_sampler_iter", None)
    if indices is not None:
        iterator._sampler_iter = itertools.chain(list(itertools.islice(indices, 1)), indices)


def live_iterator(trainer: Any) -> Any:
    """The train DataLoader's live iterator, or None."""
    iterators = _lightning_loops.train_iterators(trainer)
    return iterators[0] if len(iterators) == 1 else None


def reuses_iterator(trainer: Any) -> bool:
    """Whether the train loader keeps one iterator across epochs (``persistent_workers`` with workers)."""
    loaders = _lightning_loops.train_loaders(trainer)
    dl = loaders[0] if len(loaders) == 1 else None
    return bool(isinstance(dl, DataLoader) and dl.persistent_workers and dl.num_workers > 0)
