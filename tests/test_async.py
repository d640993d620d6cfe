"""async_save=True: consistent snapshots, exact resume, and errors that always reach the training loop."""

from __future__ import annotations

import os
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from test_callback import STEPS_PER_EPOCH, assert_bit_identical, fit, weights

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint
from lightning_genesis_ckpt.adapter.async_save import BackgroundSaver, SnapshotBuffers
from lightning_genesis_ckpt.storage.atomicity import RenameCommit


def test_snapshot_copies_every_tensor_and_keeps_containers() -> None:
    Pair = namedtuple("Pair", "a b")
    t = torch.ones(3)
    obj = {"x": [t, (t, 1)], "o": OrderedDict(k=t), "p": Pair(t, "s"), "n": 5}
    buffers = SnapshotBuffers()
    snap = buffers.snapshot(obj)
    t.add_(1)
    assert torch.equal(snap["x"][0], torch.ones(3)) and torch.equal(snap["x"][1][0], torch.ones(3))
    assert isinstance(snap["o"], OrderedDict) and isinstance(snap["p"], Pair) and snap["p"].b == "s"
    assert snap["n"] == 5
    # The next snapshot reuses the buffers (same storage) and holds the new values.
    again = buffers.snapshot(obj)
    assert again["x"][0].data_ptr() == snap["x"][0].data_ptr()
    assert torch.equal(again["x"][0], torch.full((3,), 2.0))
    # A changed shape gets a fresh buffer.
    assert buffers.snapshot({"x": [torch.ones(4), (t, 1)]})["x"][0].shape == (4,)


def test_background_saver_runs_one_at_a_time_and_reraises() -> None:
    saver = BackgroundSaver()
    order: list[int] = []
    saver.submit(lambda: order.append(1))
    saver.submit(lambda: order.append(2))
    saver.wait()
    assert order == [1, 2]

    def boom() -> None:
        raise OSError(28, "No space left on device")

    saver.submit(boom)
    with pytest.raises(OSError, match="No space"):
        saver.wait()
    saver.wait()  # reported once, not forever


def test_async_resume_is_bit_exact(tmp_path: Path) -> None:
    straight, _, _ = fit(str(tmp_path / "straight"), 4)
    d = str(tmp_path / "ck")
    fit(d, 2, async_save=True, monitor="val_loss")
    resumed, _, cb = fit(d, 4, async_save=True, monitor="val_loss")
    assert cb.resumed_from is not None and cb.resumed_from.epoch == 1
    assert_bit_identical(weights(straight), weights(resumed))
    assert sorted(CheckpointStore(d).manifest().records) == [
        "best_model.pth",
        *(f"checkpoint_epoch_{i}.pth" for i in range(4)),
    ]


class MutateRightAfterSubmit(GenesisCheckpoint):
    """Changes the weights in place the moment the background save has been handed its job."""

    expected: dict[int, dict[str, torch.Tensor]]

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.expected = getattr(self, "expected", {})
        self.expected[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        super().on_train_epoch_end(trainer, pl_module)
        with torch.no_grad():
            for p in pl_module.parameters():
                p.add_(100.0)


def test_async_save_writes_a_consistent_snapshot(tmp_path: Path) -> None:
    from models import TinyModel, loaders, make_trainer

    d = str(tmp_path / "ck")
    cb = MutateRightAfterSubmit(d, async_save=True)
    train, val = loaders()
    make_trainer([cb], 2).fit(TinyModel(), train, val)
    for epoch, expected in cb.expected.items():
        saved = torch.load(os.path.join(d, f"checkpoint_epoch_{epoch}.pth"), weights_only=True)["state_dict"]
        assert_bit_identical(expected, saved)


class FailOnSecondSave(RenameCommit):
    """Publishing fails like a full disk at the second rolling checkpoint."""

    saves = 0

    def _before_rename(self, tmp: str, final: str) -> None:
        if os.path.basename(final).startswith("checkpoint_epoch_"):
            FailOnSecondSave.saves += 1
            if FailOnSecondSave.saves == 2:
                raise OSError(28, f"No space left on device: {os.path.basename(final)}")


def test_failed_background_save_is_raised_not_lost(tmp_path: Path) -> None:
    from models import TinyModel, loaders, make_trainer

    d = str(tmp_path / "ck")
    cb = GenesisCheckpoint(d, async_save=True)
    cb.store.commit_strategy = FailOnSecondSave()
    FailOnSecondSave.saves = 0
    train, val = loaders()
    trainer = make_trainer([cb], 4)
    with pytest.raises(OSError, match=r"No space left on device: checkpoint_epoch_1\.pth"):
        trainer.fit(TinyModel(), train, val)
    # Raised at a batch soon after the failure (the save fails in the background, after serializing), not at
    # the end of fit.
    assert trainer.global_step < 3 * STEPS_PER_EPOCH
    store = CheckpointStore(d)
    assert "checkpoint_epoch_0.pth" in store.manifest().records
    store.verify("checkpoint_epoch_0.pth")
