"""Step, time and validation triggers, and exact resume from a step checkpoint: real Trainers, in-process.

Each exactness case is a pair: one uninterrupted run, and a run stopped after a step checkpoint (an
exception with ``save_on_exception=False``: all that is left is what a ``kill -9`` leaves) then resumed;
they are compared by their weights, bit for bit, and by the epoch-level metrics they logged.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from models import RaiseAt, TinyModel, loaders, make_trainer
from test_callback import STEPS_PER_EPOCH, assert_bit_identical, weights
from torch.utils.data import DataLoader

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint


class EpochMeans(pl.Callback):
    """Records the epoch-level ``train_loss`` mean that Lightning computes at every epoch end."""

    def __init__(self) -> None:
        self.means: dict[int, float] = {}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.means[trainer.current_epoch] = float(trainer.callback_metrics["train_loss"])


def run(
    d: str, epochs: int, *, shuffle: bool = True, extra: tuple[Any, ...] = (), workers: int = 0, **ckpt: Any
) -> tuple[TinyModel, Any, EpochMeans]:
    pl.seed_everything(0)
    model = TinyModel()
    train, val = loaders()
    train = DataLoader(
        train.dataset, batch_size=16, shuffle=shuffle, num_workers=workers, persistent_workers=workers > 0
    )
    means = EpochMeans()
    ckpt.setdefault("verbose", False)
    trainer = make_trainer([GenesisCheckpoint(d, **ckpt), means, *extra], epochs)
    trainer.fit(model, train, val)
    return model, trainer, means


def test_step_checkpoints_names_order_retention_and_fresh_metrics(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    run(d, 2, every_n_train_steps=5, keep_last=3, monitor="val_loss")
    records = CheckpointStore(d).manifest().records
    rolling = sorted(
        (r for r in records.values() if r.role in ("epoch", "step")), key=lambda r: r.global_step
    )
    # Steps 5, 10 | epoch 0 ends at 12 | 15, 20 | epoch 1 ends at 24; keep_last=3 across both kinds.
    assert [(r.name, r.global_step) for r in rolling] == [
        ("checkpoint_step_15.pth", 15),
        ("checkpoint_step_20.pth", 20),
        ("checkpoint_epoch_1.pth", 24),
    ]
    # A step checkpoint carries no validation metric: the last validation ran at an earlier step.
    assert "val_loss" not in records["checkpoint_step_20.pth"].metrics
    assert "val_loss" in records["checkpoint_epoch_1.pth"].metrics
    assert records["best_model.pth"].metric() is not None


def test_best_is_judged_at_every_validation(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    pl.seed_everything(0)
    train, val = loaders()
    trainer = make_trainer(
        [GenesisCheckpoint(d, monitor="val_loss", save_on_validation=True, keep_last=10, verbose=False)],
        1,
        val_check_interval=0.25,
    )
    trainer.fit(TinyModel(), train, val)
    records = CheckpointStore(d).manifest().records
    # Validations after batches 3, 6, 9 (mid-epoch: step checkpoints) and 12 (the epoch end's own).
    assert sorted(r.global_step for r in records.values() if r.role in ("epoch", "step")) == [3, 6, 9, 12]
    assert all("val_loss" in r.metrics for r in records.values())
    values = {r.global_step: r.metrics["val_loss"] for r in records.values() if r.role != "best"}
    best = records["best_model.pth"]
    assert best.metric() == min(values.values())
    assert best.global_step == min(values, key=values.__getitem__)


def test_time_trigger_and_bad_settings(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    run(d, 1, train_time_interval=datetime.timedelta(microseconds=1), every_n_epochs=0, keep_last=100)
    steps = sorted(r.global_step for r in CheckpointStore(d).manifest().records.values() if r.role == "step")
    assert steps == list(range(1, STEPS_PER_EPOCH))  # every step; the last one is the epoch end's save
    for bad in ({"every_n_train_steps": -1}, {"train_time_interval": 5}, {"save_on_validation": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenesisCheckpoint(d, **bad)


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_from_a_step_checkpoint_is_bit_identical(tmp_path: Path, shuffle: bool) -> None:
    straight, _, straight_means = run(str(tmp_path / "straight"), 3, shuffle=shuffle)
    d = str(tmp_path / "ck")
    crash = RaiseAt(epoch=1, batch=7)  # after the step-16 checkpoint (epoch 1, batch 4), before step 20
    with pytest.raises(RuntimeError, match="injected"):
        run(d, 3, shuffle=shuffle, extra=(crash,), every_n_train_steps=4, save_on_exception=False)
    resumed, trainer, means = run(d, 3, shuffle=shuffle, every_n_train_steps=4)
    ckpt = next(cb for cb in trainer.callbacks if isinstance(cb, GenesisCheckpoint))
    assert ckpt.resumed_from is not None and ckpt.resumed_from.name == "checkpoint_step_16.pth"
    assert trainer.global_step == 3 * STEPS_PER_EPOCH
    assert_bit_identical(weights(straight), weights(resumed))
    assert means.means[2] == straight_means.means[2]
    # The interrupted epoch's mean covers all of its batches, not only those after the resume.
    assert torch.tensor(means.means[1]).item() == straight_means.means[1]
