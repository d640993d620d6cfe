"""Drop-in behaviour for Lightning projects: ModelCheckpoint's surface and ``ckpt_path``, the snapshot policy,
the ``monitor`` check, ReduceLROnPlateau across a resume, mid-epoch fast-forward. Real Trainers, in-process."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_target
from models import BigModel, RaiseAt, SignalAt, TinyModel, loaders, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from test_callback import STEPS_PER_EPOCH, assert_bit_identical, fit, weights
from torch.utils.data import DataLoader

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint, MonitorNotFoundError


class Recorder(TinyModel):
    """Logs ``val_loss`` and remembers which weights each test / validate / predict call ran with."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.evaluated: list[float] = []

    def _mark(self) -> None:
        self.evaluated.append(float(self.net[0].weight.sum()))

    def on_test_start(self) -> None:
        self._mark()

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn != "fit":
            self._mark()

    def on_predict_start(self) -> None:
        self._mark()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", torch.nn.functional.mse_loss(self(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def weight_sum(path: str, store: CheckpointStore) -> float:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return float(store.load(name)["state_dict"]["net.0.weight"].sum())


@pytest.mark.parametrize(
    ("backend", "order"),
    [("local", "genesis_only"), ("local", "modelcheckpoint_first"), ("s3", "genesis_first")],
)
def test_ckpt_path_best_last_and_none_load_our_files(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, order: str
) -> None:
    target = make_target(request, tmp_path, backend)
    pl.seed_everything(0)
    cb = GenesisCheckpoint(
        target.url, monitor="val_loss", storage_options=target.storage_options, keep_last=2
    )
    callbacks: list[Any] = [cb]
    if order == "modelcheckpoint_first":
        callbacks.insert(0, ModelCheckpoint(dirpath=str(tmp_path / "mc"), monitor="val_loss"))
    elif order == "genesis_first":
        callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / "mc"), monitor="val_loss"))
    model = Recorder()
    train, val = loaders()
    trainer = make_trainer(callbacks, 3, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(model, train, val)
    store = target.store()

    # ModelCheckpoint's attributes, with its meanings, from the manifest.
    best = store.manifest().get("best_model.pth")
    assert cb.best_model_path == store.url_for("best_model.pth")
    assert cb.best_model_score == torch.tensor(best.metric())
    assert cb.last_model_path == store.url_for("checkpoint_epoch_2.pth")
    assert cb.best_model_path in cb.best_k_models and len(cb.best_k_models) == 1
    assert cb.kth_best_model_path == cb.best_model_path and cb.kth_value == cb.best_model_score
    assert cb.current_score == torch.tensor(store.manifest().get("checkpoint_epoch_2.pth").metric())
    assert cb.dirpath == (store.root if backend == "local" else target.url)

    in_memory = float(model.net[0].weight.sum())
    trainer.test(ckpt_path="best", dataloaders=val)
    trainer.validate(ckpt_path="last", dataloaders=val)
    trainer.predict(ckpt_path="best", dataloaders=val)
    trainer.test(dataloaders=val)  # no model, no ckpt_path: Lightning's default is "best"
    assert trainer.ckpt_path == cb.best_model_path
    best_sum = weight_sum(cb.best_model_path, store)
    last_sum = weight_sum(cb.last_model_path, store)
    assert model.evaluated == [best_sum, last_sum, best_sum, best_sum]
    if best.epoch != 2:
        assert best_sum != last_sum != in_memory
    assert not store.manifest().get("interrupt_checkpoint.pth")


def test_ckpt_path_best_in_a_new_process_and_without_monitor(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 2)
    # A fresh trainer (an evaluation script): "best" without a monitor is the newest rolling checkpoint,
    # as with ModelCheckpoint(monitor=None); "last" is the newest state; both read from the manifest.
    cb = GenesisCheckpoint(d)
    model = Recorder()
    trainer = make_trainer([cb], 1)
    _, val = loaders()
    trainer.test(model, val, ckpt_path="best")
    trainer.validate(model, val, ckpt_path="last")
    expected = weight_sum(os.path.join(d, "checkpoint_epoch_1.pth"), CheckpointStore(d))
    assert model.evaluated == [expected, expected]
    assert (
        cb.best_model_path
        == cb.last_model_path
        == os.path.join(CheckpointStore(d).root, "checkpoint_epoch_1.pth")
    )
    assert cb.best_k_models == {} and cb.best_model_score is None
    # Nothing there yet: "best" is a clear error, "last" loads nothing (as Lightning does), neither a crash.
    empty = GenesisCheckpoint(str(tmp_path / "empty"), monitor="val_loss")
    with pytest.raises(ValueError, match=r'ckpt_path="best".*no best checkpoint'):
        make_trainer([empty], 1).test(Recorder(), val, ckpt_path="best")


def test_exceptions_outside_an_interrupted_fit_write_no_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class FailingTest(Recorder):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            raise RuntimeError("bug in test_step")

    class FailingSanity(Recorder):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if self.trainer.sanity_checking:
                raise RuntimeError("bug in validation_step")

    class FailingAfterFit(Recorder):
        def on_train_end(self) -> None:
            raise RuntimeError("bug in on_train_end")

    d = str(tmp_path / "ck")
    train, val = loaders()
    model = FailingTest()
    trainer = make_trainer([GenesisCheckpoint(d)], 1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, train, val)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="test_step"):
        trainer.test(ckpt_path="last", dataloaders=val)
    for cls, match in ((FailingSanity, "validation_step"), (FailingAfterFit, "on_train_end")):
        with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match=match):
            make_trainer([GenesisCheckpoint(d)], 2, limit_train_batches=2, limit_val_batches=1).fit(
                cls(), train, val
            )
    assert CheckpointStore(d).manifest().get("interrupt_checkpoint.pth") is None
    assert "interrupt" not in caplog.text
    assert not os.path.exists(os.path.join(d, "genesis.lock"))


class CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1


def test_misspelled_monitor_fails_at_the_first_validation_as_a_configuration_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = str(tmp_path / "ck")
    counter = CountBatches()
    pl.seed_everything(0)
    trainer = make_trainer([GenesisCheckpoint(d, monitor="val_los"), counter], 3, val_check_interval=4)
    train, val = loaders()
    with caplog.at_level(logging.WARNING), pytest.raises(MonitorNotFoundError, match=r"val_los.*val_loss"):
        trainer.fit(TinyModel(), train, val)
    assert counter.batches == 4  # the first validation, not the end of a 12-batch epoch
    assert "interrupted" not in caplog.text and "run again" not in caplog.text
    assert CheckpointStore(d).manifest().get("interrupt_checkpoint.pth") is None
    # A metric logged in on_train_epoch_end does not exist at the first validation: that is no error.
    fit(str(tmp_path / "late"), 1, model=LateMetric(), monitor="late", save_top_k=1)


class LateMetric(TinyModel):
    def on_train_epoch_end(self) -> None:
        self.log("late", float(self.current_epoch))


class Plateau(TinyModel):
    """ReduceLROnPlateau that reduces every time (mode='max' on a falling loss), on epoch or step interval."""

    def __init__(self, interval: str = "epoch") -> None:
        super().__init__(lr=1e-4)
        self.interval = interval
        self.lrs: list[float] = []

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        config = {"scheduler": sched, "monitor": "val_loss"}
        if self.interval == "step":
            # Steps mid-epoch read the previous validation's val_loss, which a restart used to lack.
            config.update(interval="step", frequency=4, strict=False)
        return {"optimizer": opt, "lr_scheduler": config}

    def on_train_epoch_start(self) -> None:
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_reduce_lr_on_plateau_resumes_exactly(tmp_path: Path, interval: str) -> None:
    def model() -> Plateau:
        pl.seed_everything(0)  # the same initial weights in every run
        return Plateau(interval)

    straight, straight_trainer, _ = fit(str(tmp_path / "straight"), 4, model=model())
    d = str(tmp_path / "ck")
    fit(d, 2, model=model())
    resumed, trainer, _ = fit(d, 4, model=model())
    assert resumed.lrs == straight.lrs[2:], (straight.lrs, resumed.lrs)
    assert straight.lrs[2] < straight.lrs[1]  # the scheduler did reduce across the resume point
    assert_bit_identical(weights(straight), weights(resumed))
    final = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert final == straight_trainer.lr_scheduler_configs[0].scheduler.state_dict()


@pytest.mark.parametrize("shuffle", [True, False])
def test_mid_epoch_resume_continues_the_same_batches(tmp_path: Path, shuffle: bool) -> None:
    class Sequenced(TinyModel):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.seen.append(batch[0][:, 0].clone())
            return super().training_step(batch, batch_idx)

    def run(d: str, extra: list[Any]) -> tuple[Sequenced, Any]:
        pl.seed_everything(0)
        model = Sequenced()
        train, val = loaders()
        train = DataLoader(train.dataset, batch_size=16, shuffle=shuffle)
        trainer = make_trainer([GenesisCheckpoint(d, verbose=False), *extra], 3)
        trainer.fit(model, train, val)
        return model, trainer

    straight, _ = run(str(tmp_path / "straight"), [])
    d = str(tmp_path / "ck")
    with pytest.raises(RuntimeError, match="injected"):
        run(d, [RaiseAt(epoch=1, batch=5)])
    resumed, trainer = run(d, [])
    assert trainer.global_step == 3 * STEPS_PER_EPOCH
    tail = STEPS_PER_EPOCH + 5
    assert all(torch.equal(a, b) for a, b in zip(straight.seen[tail:], resumed.seen, strict=True))
    assert_bit_identical(weights(straight), weights(resumed))


def test_exception_between_accumulation_steps_is_not_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash cannot wait for the optimizer step (preemption signals do): the loss is said, not hidden."""
    train, val = loaders()
    for batch, warned in ((4, True), (6, False)):  # batch 6 starts a window of 3: nothing accumulated yet
        caplog.clear()
        trainer = make_trainer(
            [GenesisCheckpoint(str(tmp_path / f"ck{batch}")), RaiseAt(epoch=0, batch=batch)],
            1,
            accumulate_grad_batches=3,
        )
        with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="injected"):
            trainer.fit(TinyModel(), train, val)
        assert ("between two gradient-accumulation steps" in caplog.text) is warned


def test_sigterm_while_an_async_save_is_in_flight_and_during_the_sanity_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real SIGTERMs in this process: the in-flight save commits, then the snapshot; the code is 143."""
    d = str(tmp_path / "ck")
    train, val = loaders()
    pl.seed_everything(0)
    cb = GenesisCheckpoint(d, async_save=True)
    trainer = make_trainer([cb, SignalAt(epoch=1, batch=0, signum=signal.SIGTERM)], 3)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stopped:
        trainer.fit(BigModel(ballast_mb=16), train, val)  # epoch 0's save is still being written at batch 0
    assert stopped.value.code == 143
    store = CheckpointStore(d)
    assert {"checkpoint_epoch_0.pth", "interrupt_checkpoint.pth"} <= set(store.manifest().records)
    assert store.manifest().get("interrupt_checkpoint.pth").global_step == STEPS_PER_EPOCH + 1
    for name in store.manifest().records:
        store.verify(name)

    caplog.clear()
    sanity = make_trainer(
        [GenesisCheckpoint(d, auto_resume=False), SignalAt(0, 0, signal.SIGTERM, sanity=True)], 4
    )
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stopped:
        sanity.fit(TinyModel(), train, val, ckpt_path=None)
    assert stopped.value.code == 143
    assert "before training started: no snapshot; the newest committed checkpoint is" in caplog.text
    assert store.manifest(refresh=True).get("interrupt_checkpoint.pth").global_step == STEPS_PER_EPOCH + 1
