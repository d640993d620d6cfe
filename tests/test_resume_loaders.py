"""Exact mid-epoch resume for every kind of train loader: workers, persistent workers, custom samplers and
batch samplers, torchdata's StatefulDataLoader, and the warning for an IterableDataset without state.

Each case is a pair of real Trainer runs in this process: an uninterrupted one, and one stopped mid-epoch
(after a step checkpoint, by an exception with ``save_on_exception=False``: all that a ``kill -9`` leaves;
or by a real SIGTERM, which writes the interrupt snapshot) then resumed by a fresh Trainer. They are compared
by their final weights with ``torch.equal``. The dataset logs every index it loads, so the tests also see
that the skipped batches were not loaded.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from models import RaiseAt, SignalAt, TinyModel, make_data, make_trainer
from test_callback import STEPS_PER_EPOCH, assert_bit_identical, weights
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, WeightedRandomSampler

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint

BATCH = 16
N = STEPS_PER_EPOCH * BATCH  # 192 training samples


class LoggedDataset(Dataset):
    """The training set; appends every index it loads to ``log`` (``O_APPEND``: safe from worker processes).

    ``augment`` adds noise drawn from the global torch RNG in ``__getitem__``, as random augmentations do.
    """

    def __init__(self, log: Path, augment: bool) -> None:
        self.data = make_data()[0]
        self.log, self.augment = log, augment

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        x, y = self.data[i]
        return (x + 0.01 * torch.randn_like(x), y) if self.augment else (x, y)


class RandpermSampler(Sampler[int]):
    """A user's shuffle: the whole order drawn eagerly in ``__iter__`` with ``torch.randperm``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n).tolist())


class NumpySampler(Sampler[int]):
    """A shuffle drawn lazily from numpy's global RNG."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from np.random.permutation(self.n).tolist()


class ChunkBatchSampler(Sampler[list[int]]):
    """A custom batch_sampler: contiguous chunks of 8 and 24 samples, in an order drawn from Python's
    ``random``."""

    def __init__(self, n: int) -> None:
        bounds = [0, *itertools.accumulate([8, 24] * (n // 32))]
        self.chunks = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[list[int]]:
        for i in random.sample(range(len(self.chunks)), len(self.chunks)):
            yield self.chunks[i]


def make_loader(case: str, log: Path) -> DataLoader:
    workers = {"workers2": 2, "persistent": 2}.get(case, 0)
    data = LoggedDataset(log, augment=workers == 0)  # workers' own RNGs are not replayed: see docs/resume.md
    if case == "batch_sampler":
        return DataLoader(data, batch_sampler=ChunkBatchSampler(N))
    sampler: Sampler[int] | None = {
        "randperm": lambda: RandpermSampler(N),
        "numpy": lambda: NumpySampler(N),
        "weighted": lambda: WeightedRandomSampler(torch.linspace(0.1, 1.0, N), N),
    }.get(case, lambda: None)()
    return DataLoader(
        data,
        batch_size=BATCH,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=case == "persistent",
    )


def fit(d: Path, loader: Any, extra: tuple[Any, ...] = (), **ckpt: Any) -> tuple[TinyModel, Any]:
    pl.seed_everything(0)
    model = TinyModel()
    val = DataLoader(make_data()[1], batch_size=BATCH)
    trainer = make_trainer([GenesisCheckpoint(str(d), verbose=False, **ckpt), *extra], 3)
    trainer.fit(model, loader, val)
    return model, trainer


def read(log: Path) -> list[int]:
    return [int(i) for i in log.read_text().split()] if log.exists() else []


CASES = ["workers2", "persistent", "randperm", "numpy", "weighted", "batch_sampler"]


@pytest.mark.parametrize("case", CASES)
def test_resume_from_a_step_checkpoint_is_bit_identical(tmp_path: Path, case: str) -> None:
    straight, _ = fit(tmp_path / "straight", make_loader(case, tmp_path / "straight.log"))
    batches = len(make_loader(case, tmp_path / "unused.log"))
    d = tmp_path / "ck"
    crash = RaiseAt(epoch=1, batch=9)  # after the step checkpoint at epoch 1, batch 8
    with pytest.raises(RuntimeError, match="injected"):
        fit(
            d,
            make_loader(case, tmp_path / "first.log"),
            (crash,),
            every_n_train_steps=4,
            save_on_exception=False,
        )
    log = tmp_path / "resumed.log"
    resumed, trainer = fit(d, make_loader(case, log), every_n_train_steps=4)
    assert trainer.global_step == 3 * batches
    assert_bit_identical(weights(straight), weights(resumed))
    # Loaded in the resumed run: the 4 batches after the 8 skipped ones, then all of epoch 2.
    loaded, straight_loaded = read(log), read(tmp_path / "straight.log")
    if case in ("workers2", "persistent"):
        # Lightning's own first iterator prefetches up to 2 x 2 batches before it is replaced.
        assert 4 * BATCH + N <= len(loaded) <= 8 * BATCH + N
    else:
        # The very samples of the uninterrupted run, in its order (and so with its augmentation draws).
        assert loaded == straight_loaded[-len(loaded) :]
        if case == "batch_sampler":
            assert N + 4 * 8 <= len(loaded) <= N + 4 * 24  # 8 of 12 chunks of 8 or 24 skipped
        else:
            assert len(loaded) == 4 * BATCH + N
    if case == "persistent":
        # The resumed epoch was a reset of a persistent iterator: the state that made the iterator is kept.
        plan = torch.load(d / "checkpoint_step_20.pth", weights_only=False)["callbacks"]
        assert any(v.get("fast_forward", {}).get("reset_rng") is not None for v in plan.values())


def test_sigterm_snapshot_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    straight, _ = fit(tmp_path / "straight", make_loader("randperm", tmp_path / "a.log"))
    d = tmp_path / "ck"
    with pytest.raises(SystemExit):
        fit(
            d,
            make_loader("randperm", tmp_path / "b.log"),
            (SignalAt(epoch=1, batch=5, signum=signal.SIGTERM),),
        )
    snapshot = CheckpointStore(str(d)).manifest().get("interrupt_checkpoint.pth")
    assert snapshot is not None and snapshot.global_step == STEPS_PER_EPOCH + 6
    log = tmp_path / "c.log"
    resumed, _ = fit(d, make_loader("randperm", log))
    assert_bit_identical(weights(straight), weights(resumed))
    assert len(read(log)) == 6 * BATCH + N


def test_stateful_dataloader_uses_its_own_state_and_is_not_skipped_twice(tmp_path: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader(log: Path) -> Any:
        pl.seed_everything(0)  # its RandomSampler seeds its own generator from the global RNG when built
        return stateful.StatefulDataLoader(LoggedDataset(log, augment=True), batch_size=BATCH, shuffle=True)

    straight, _ = fit(tmp_path / "straight", loader(tmp_path / "a.log"))
    d = tmp_path / "ck"
    with pytest.raises(RuntimeError, match="injected"):
        fit(
            d,
            loader(tmp_path / "b.log"),
            (RaiseAt(epoch=1, batch=9),),
            every_n_train_steps=4,
            save_on_exception=False,
        )
    checkpoint = torch.load(d / "checkpoint_step_20.pth", weights_only=False)
    assert not any("fast_forward" in v for v in checkpoint["callbacks"].values())
    log = tmp_path / "c.log"
    resumed, _ = fit(d, loader(log), every_n_train_steps=4)
    assert_bit_identical(weights(straight), weights(resumed))
    assert len(read(log)) == 4 * BATCH + N


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        data = make_data()[0]
        for i in torch.randperm(len(data)).tolist():
            yield data[i]


@pytest.mark.parametrize("kind", ["iterable", "generator"])
def test_an_inexact_loader_warns_once_at_the_first_mid_epoch_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    if kind == "iterable":
        loader, why = DataLoader(Stream(), batch_size=BATCH), "IterableDataset (Stream)"
    else:
        own = torch.Generator().manual_seed(1)
        loader, why = DataLoader(make_data()[0], batch_size=BATCH, shuffle=True, generator=own), "generator="
    with caplog.at_level(logging.WARNING):
        fit(tmp_path / "ck", loader, every_n_train_steps=4)
    warnings = [r.getMessage() for r in caplog.records if "will not be bit-identical" in r.getMessage()]
    assert len(warnings) == 1, warnings  # six or more mid-epoch saves, one warning
    assert "epoch 0, batch 4" in warnings[0] and why in warnings[0]
    assert "The train dataloader (DataLoader)" in warnings[0]
