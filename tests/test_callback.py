"""End-to-end tests of GenesisCheckpoint with a real Trainer on CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import StoreTarget
from models import FLAVOURS, RaiseAt, TinyModel, flavour, loaders, make_trainer

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint, MonitorNotFoundError

STEPS_PER_EPOCH = 12  # 192 training samples / batch size 16


def fit(
    dirpath: str | StoreTarget,
    epochs: int,
    *,
    model: pl.LightningModule | None = None,
    seed: int = 0,
    extra: list[pl.Callback] | None = None,
    ckpt_path: str | None = None,
    lightning: str = "pytorch_lightning",
    trainer_kwargs: dict[str, Any] | None = None,
    **cb_kwargs: Any,
):
    if isinstance(dirpath, StoreTarget):
        cb_kwargs.setdefault("storage_options", dirpath.storage_options)
        dirpath = dirpath.url
    f = flavour(lightning)
    f.pl.seed_everything(seed)
    model = model or f.TinyModel()
    train, val = loaders()
    cb = GenesisCheckpoint(dirpath, **cb_kwargs)
    trainer = f.make_trainer([cb, *(extra or [])], epochs, **(trainer_kwargs or {}))
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, trainer, cb


def weights(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


def test_resume_is_bit_exact(store_url: StoreTarget, tmp_path: Path) -> None:
    straight, _, _ = fit(str(tmp_path / "straight"), 4)
    fit(store_url, 2)
    resumed, trainer, cb = fit(store_url, 4)
    assert cb.resumed_from is not None and cb.resumed_from.name == "checkpoint_epoch_1.pth"
    # The path Lightning restored from is the URL, protocol and all.
    assert trainer.ckpt_path == cb.store.url_for("checkpoint_epoch_1.pth")
    assert trainer.global_step == 4 * STEPS_PER_EPOCH
    assert_bit_identical(weights(straight), weights(resumed))
    # The optimizer and scheduler states came back too, not just the weights.
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


@pytest.mark.parametrize("lightning", FLAVOURS)
def test_both_lightning_packages(tmp_path: Path, lightning: str) -> None:
    """One GenesisCheckpoint class works with pytorch_lightning.Trainer and lightning.pytorch.Trainer."""
    straight, _, _ = fit(str(tmp_path / "straight"), 3, lightning=lightning)
    d = str(tmp_path / "ck")
    fit(d, 1, lightning=lightning, monitor="val_loss")
    resumed, trainer, cb = fit(d, 3, lightning=lightning, monitor="val_loss")
    assert type(trainer).__module__.startswith(lightning)
    assert cb.resumed_from is not None and cb.resumed_from.epoch == 0
    assert_bit_identical(weights(straight), weights(resumed))
    loaded = flavour(lightning).TinyModel.load_from_checkpoint(os.path.join(d, "best_model.pth"))
    assert loaded.hparams.hidden == 32


def test_files_are_standard_lightning_checkpoints(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 2, monitor="val_loss")
    for name in ("checkpoint_epoch_1.pth", "best_model.pth"):
        ckpt = torch.load(os.path.join(d, name), weights_only=True)
        for key in (
            "state_dict",
            "optimizer_states",
            "lr_schedulers",
            "loops",
            "callbacks",
            "epoch",
            "global_step",
            "hyper_parameters",
            "pytorch-lightning_version",
        ):
            assert key in ckpt, key
        rng = next(v for k, v in ckpt["callbacks"].items() if k.startswith("GenesisCheckpoint"))["rng"]
        assert {"torch", "numpy", "python", "cuda"} <= set(rng)
    # load_from_checkpoint and fit(ckpt_path=...) accept the files unchanged, without our callback.
    loaded = TinyModel.load_from_checkpoint(os.path.join(d, "best_model.pth"))
    assert loaded.hparams.hidden == 32
    trainer = make_trainer([], 3, enable_checkpointing=False)
    train, val = loaders()
    trainer.fit(TinyModel(), train, val, ckpt_path=os.path.join(d, "checkpoint_epoch_1.pth"))
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * STEPS_PER_EPOCH


def test_explicit_ckpt_path_wins_over_auto_resume(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 3)
    _, trainer, cb = fit(d, 4, ckpt_path=os.path.join(d, "checkpoint_epoch_0.pth"))
    assert cb.resumed_from is None
    assert trainer.ckpt_path == os.path.join(d, "checkpoint_epoch_0.pth")
    assert trainer.global_step == 4 * STEPS_PER_EPOCH


def test_auto_resume_off_starts_fresh(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 2)
    _, trainer, cb = fit(d, 2, auto_resume=False)
    assert cb.resumed_from is None and trainer.global_step == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupt_newest_falls_back_with_warning(
    store_url: StoreTarget, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    fit(store_url, 3)
    # Damaged behind the store's back (on S3: overwritten through the server by another client).
    fs = store_url.fs()
    newest = store_url.store().path("checkpoint_epoch_2.pth")
    if damage == "truncate":
        fs.pipe_file(newest, fs.cat_file(newest)[: fs.size(newest) // 2])
    elif damage == "garbage":
        fs.pipe_file(newest, os.urandom(4096))
    else:
        fs.rm_file(newest)
    with caplog.at_level(logging.WARNING):
        _, trainer, cb = fit(store_url, 4)
    assert "skipping checkpoint" in caplog.text and "checkpoint_epoch_2.pth" in caplog.text
    assert cb.resumed_from is not None and cb.resumed_from.name == "checkpoint_epoch_1.pth"
    assert trainer.global_step == 4 * STEPS_PER_EPOCH


def test_no_valid_checkpoint_starts_fresh_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = str(tmp_path / "ck")
    fit(d, 2, keep_last=2)
    for name in ("checkpoint_epoch_0.pth", "checkpoint_epoch_1.pth"):
        os.truncate(os.path.join(d, name), 100)
    with caplog.at_level(logging.WARNING):
        _, trainer, cb = fit(d, 1)
    assert "starting from scratch" in caplog.text
    assert cb.resumed_from is None and trainer.global_step == STEPS_PER_EPOCH


class ScriptedScore(TinyModel):
    """Logs a scripted ``score`` per epoch so retention decisions are known in advance."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores

    def on_train_epoch_end(self) -> None:
        self.log("score", self.scores[self.current_epoch])


def test_retention_keep_last_top_k_and_best(store_url: StoreTarget) -> None:
    scores = [5.0, 1.0, 4.0, 3.0, 2.0, 6.0]  # epoch 1 is best, epoch 4 second best
    fit(store_url, 6, model=ScriptedScore(scores), monitor="score", mode="min", keep_last=2, save_top_k=2)
    files = [n for n in store_url.names() if n.endswith(".pth")]
    assert files == [
        "best_model.pth",
        "checkpoint_epoch_1.pth",
        "checkpoint_epoch_4.pth",
        "checkpoint_epoch_5.pth",
    ]
    store = store_url.store()
    assert sorted(store.manifest().records) == [*files]
    best = store.manifest().get("best_model.pth")
    assert best is not None and best.epoch == 1 and best.metric() == 1.0
    fs = store_url.fs()
    assert fs.cat_file(store.path("best_model.pth")) == fs.cat_file(store.path("checkpoint_epoch_1.pth"))


def test_rolling_order_is_numeric_past_ten_epochs(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 12, keep_last=3)
    assert sorted(n for n in os.listdir(d) if n.endswith(".pth")) == [
        "checkpoint_epoch_10.pth",
        "checkpoint_epoch_11.pth",
        "checkpoint_epoch_9.pth",
    ]


def test_best_is_saved_even_when_no_rolling_checkpoint_is_due(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 4, model=ScriptedScore([3.0, 1.0, 2.0, 2.5]), monitor="score", every_n_epochs=0)
    assert sorted(n for n in os.listdir(d) if n.endswith(".pth")) == [
        "best_model.pth",
        "checkpoint_epoch_3.pth",
    ]
    best = CheckpointStore(d).manifest().get("best_model.pth")
    assert best is not None and best.epoch == 1


def test_every_n_epochs(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 5, every_n_epochs=2)
    assert sorted(n for n in os.listdir(d) if n.endswith(".pth")) == [
        "checkpoint_epoch_1.pth",
        "checkpoint_epoch_3.pth",
        "checkpoint_epoch_4.pth",
    ]


def test_exception_writes_snapshot_and_resume_uses_it(store_url: StoreTarget) -> None:
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(store_url, 4, extra=[RaiseAt(epoch=2, batch=5)])
    store = store_url.store()
    snap = store.manifest().get("interrupt_checkpoint.pth")
    assert snap is not None and snap.role == "interrupt"
    assert snap.global_step == 2 * STEPS_PER_EPOCH + 5
    _, trainer, cb = fit(store_url, 4)
    assert cb.resumed_from is not None and cb.resumed_from.name == "interrupt_checkpoint.pth"
    assert trainer.global_step == 4 * STEPS_PER_EPOCH
    # Retired once a newer checkpoint committed.
    assert store_url.store().manifest().get("interrupt_checkpoint.pth") is None
    assert "interrupt_checkpoint.pth" not in store_url.names()


def test_snapshot_survives_a_crash_right_after_resuming(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    with pytest.raises(RuntimeError):
        fit(d, 4, extra=[RaiseAt(epoch=1, batch=3)])
    step = CheckpointStore(d).manifest().get("interrupt_checkpoint.pth").global_step
    with pytest.raises(RuntimeError):
        fit(d, 4, extra=[RaiseAt(epoch=1, batch=4)])  # dies again before any new commit
    snap = CheckpointStore(d).manifest().get("interrupt_checkpoint.pth")
    assert snap is not None and snap.global_step == step + 1
    _, trainer, cb = fit(d, 4)
    assert cb.resumed_from.name == "interrupt_checkpoint.pth" and trainer.global_step == 4 * STEPS_PER_EPOCH


class CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def test_unwritable_dirpath_fails_at_setup(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    counter = CountSteps()
    with pytest.raises(OSError, match=r"a_file/ck.*not writable"):
        fit(str(blocker / "ck"), 1, extra=[counter])
    assert counter.batches == 0


def test_monitor_never_logged_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MonitorNotFoundError, match=r"val_acc.*Available metrics: train_loss, val_loss"):
        fit(str(tmp_path / "ck"), 2, monitor="val_acc")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"mode": "best"}, "mode"),
        ({"save_top_k": -1}, "save_top_k"),
        ({"every_n_epochs": -2}, "every_n_epochs"),
        ({"monitor": ""}, "monitor"),
    ],
)
def test_constructor_rejects_bad_settings(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GenesisCheckpoint(str(tmp_path), **kwargs)
