"""Frozen exclusion: a LoRA-like model (a large frozen base, a small trained adapter) through real Trainers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from models import RaiseAt, make_data
from safetensors.torch import load_file
from test_callback import assert_bit_identical, weights
from torch import nn
from torch.utils.data import DataLoader

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import CheckpointStore, FrozenBaseMismatchError, GenesisCheckpoint
from lightning_genesis_ckpt.storage.frozen import FROZEN_KEY

WIDTH = 64
BASE_KEYS = {"base.weight", "base.bias"}


class LoraModel(pl.LightningModule):
    """``base`` is the pretrained part (built from ``base_seed``, frozen); ``lora_a``/``lora_b``/``head`` train."""

    def __init__(self, base_seed: int = 0, rank: int = 4) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(base_seed)
            self.base = nn.Linear(WIDTH, WIDTH)
        self.base.requires_grad_(False)
        self.register_buffer("scale", torch.full((WIDTH,), 0.5))
        self.lora_a = nn.Parameter(torch.randn(WIDTH, rank) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(rank, WIDTH))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x) + (x @ self.lora_a @ self.lora_b) * self.scale
        return self.head(torch.relu(h))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)


def fit(
    dirpath: str, epochs: int, *, base_seed: int = 0, extra: tuple[pl.Callback, ...] = (), **cb_kwargs: Any
) -> tuple[LoraModel, pl.Trainer, GenesisCheckpoint]:
    pl.seed_everything(0)
    model = LoraModel(base_seed)
    train, val = make_data(width=WIDTH)
    cb_kwargs.setdefault("exclude_frozen", True)
    cb = GenesisCheckpoint(dirpath, monitor="val_loss", **cb_kwargs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[cb, *extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=16))
    return model, trainer, cb


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoints_leave_the_base_out_and_a_resume_is_bit_identical(
    tmp_path: Path, async_save: bool
) -> None:
    straight, _, _ = fit(str(tmp_path / "straight"), 3)
    d = str(tmp_path / "ck")
    fit(d, 2, keep_last=1, async_save=async_save)
    resumed, _, cb = fit(d, 3, keep_last=1, async_save=async_save)
    assert cb.resumed_from is not None and cb.resumed_from.name == "checkpoint_epoch_1.pth"
    assert_bit_identical(weights(straight), weights(resumed))

    store = CheckpointStore(d)
    bases = [r for r in store.records() if r.role == "base"]
    assert len(bases) == 1, "the base copy is written once per base, and retention never deletes it"
    raw = torch.load(Path(d) / "checkpoint_epoch_2.pth", weights_only=True)
    assert BASE_KEYS.isdisjoint(raw["state_dict"]) and "lora_a" in raw["state_dict"]
    assert set(raw[FROZEN_KEY]["names"]) == BASE_KEYS
    assert raw[FROZEN_KEY]["base"] == bases[0].name
    full = torch.load(Path(d) / bases[0].name, weights_only=True)["state_dict"]
    assert torch.equal(full["base.weight"], resumed.base.weight)


def test_an_interrupt_snapshot_leaves_the_base_out_and_resumes_bit_identically(tmp_path: Path) -> None:
    straight, _, _ = fit(str(tmp_path / "straight"), 2)
    d = str(tmp_path / "ck")
    with pytest.raises(RuntimeError, match="injected"):
        fit(d, 2, extra=(RaiseAt(epoch=1, batch=5),))
    snapshot = torch.load(Path(d) / "interrupt_checkpoint.pth", weights_only=True)
    assert BASE_KEYS.isdisjoint(snapshot["state_dict"]) and FROZEN_KEY in snapshot
    resumed, _, cb = fit(d, 2)
    assert cb.resumed_from is not None and cb.resumed_from.name == "interrupt_checkpoint.pth"
    assert_bit_identical(weights(straight), weights(resumed))


def test_a_changed_base_is_refused_on_resume(tmp_path: Path) -> None:
    d = str(tmp_path / "ck")
    fit(d, 1)
    with pytest.raises(FrozenBaseMismatchError, match=r"the base model changed: .*base\.weight"):
        fit(d, 2, base_seed=1)


def test_load_and_export_give_the_complete_state(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    model, _, _ = fit(str(d), 1, frozen_buffers=("scale",))
    ckpt = d / "best_model.pth"
    assert "scale" not in torch.load(ckpt, weights_only=True)["state_dict"]

    # From the store's one copy of the frozen tensors, and from a model built on the same base.
    for state in (genesis.load(ckpt), genesis.load(ckpt, frozen_from=LoraModel(0))):
        assert FROZEN_KEY not in state
        assert_bit_identical(state["state_dict"], weights(model))
    with pytest.raises(FrozenBaseMismatchError, match=r"base\.weight"):
        genesis.load(ckpt, frozen_from=LoraModel(base_seed=1))

    out = genesis.export(ckpt, tmp_path / "model.safetensors")
    assert_bit_identical(load_file(out), weights(model))

    # Without the store's copy, only a model can complete it, and the error says so.
    base = next(r.name for r in CheckpointStore(str(d)).records() if r.role == "base")
    CheckpointStore(str(d)).delete([base])
    with pytest.raises(FileNotFoundError, match="pass the model"):
        genesis.load(ckpt)
    assert_bit_identical(genesis.load(ckpt, frozen_from=LoraModel(0))["state_dict"], weights(model))


def test_a_named_buffer_must_exist_and_needs_exclude_frozen(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs exclude_frozen=True"):
        GenesisCheckpoint(str(tmp_path), exclude_frozen=False, frozen_buffers=("scale",))
    with pytest.raises(KeyError, match="nosuch"):
        fit(str(tmp_path / "ck"), 1, frozen_buffers=("nosuch",))
