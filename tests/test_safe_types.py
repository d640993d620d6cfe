"""Hyperparameters of common types resume with default (weights-only) loading; anything else is named at the
first save; nothing is imported because a file names it."""

from __future__ import annotations

import dataclasses
import enum
import logging
import pathlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import TinyModel
from omegaconf import DictConfig, ListConfig, OmegaConf
from test_callback import fit

from lightning_genesis_ckpt import CheckpointStore, UnsafeCheckpointError
from lightning_genesis_ckpt.storage import safe_types


class Stage(enum.Enum):
    WARMUP = "warmup"
    MAIN = "main"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    root: pathlib.Path
    splits: tuple[int, ...] = (8, 1, 1)
    stage: Stage = Stage.MAIN


@dataclasses.dataclass
class OptimConfig:
    """A structured-config schema: typed with plain types (subscripted generics pickle through a getitem call)."""

    lr: float = 0.1
    name: str = "adamw"
    stage: Stage = Stage.MAIN
    root: pathlib.Path = pathlib.Path("/s")


class Custom:
    """Not a dataclass or enum: weights-only loading cannot know it is harmless."""

    def __init__(self) -> None:
        self.x = 1


def extras() -> dict[str, Any]:
    return {
        "path": pathlib.Path("/data/run1"),
        "config": DataConfig(pathlib.Path("/data")),
        "stage": Stage.WARMUP,
        "omega": OmegaConf.create({"model": {"width": 16}, "tags": ["a", "b"], "lr": 0.1}),
        "omega_list": OmegaConf.create([1, "x"]),
        "structured": OmegaConf.structured(OptimConfig),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.float64(2.5),
        "count": np.int64(7),
    }


class WithExtras(TinyModel):
    def __init__(self, custom: bool = False) -> None:
        super().__init__()
        self.custom = custom
        self.loaded: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["extra"] = {**extras(), **({"custom": Custom()} if self.custom else {})}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded = checkpoint["extra"]


def test_common_hparam_types_resume_with_default_loading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = str(tmp_path / "ck")
    with caplog.at_level(logging.WARNING):
        fit(d, 1, model=WithExtras())
    assert "weights-only loading refuses" not in caplog.text
    model, _, cb = fit(d, 2, model=WithExtras())
    assert cb.resumed_from is not None and cb.resumed_from.name == "checkpoint_epoch_0.pth"
    got, want = model.loaded, extras()
    assert got is not None
    for key in ("path", "config", "stage", "scalar", "count"):
        assert got[key] == want[key] and type(got[key]) is type(want[key]), key
    assert isinstance(got["omega"], DictConfig) and got["omega"] == want["omega"]
    assert isinstance(got["omega_list"], ListConfig) and got["omega_list"] == want["omega_list"]
    assert OmegaConf.to_object(got["structured"]) == OptimConfig()
    assert np.array_equal(got["array"], want["array"]) and got["array"].dtype == np.float32


def test_other_objects_are_named_at_the_first_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = str(tmp_path / "ck")
    with caplog.at_level(logging.WARNING):
        fit(d, 2, model=WithExtras(custom=True))
    warnings = [r.getMessage() for r in caplog.records if "weights-only loading refuses" in r.getMessage()]
    assert len(warnings) == 1  # the first save, not every save
    assert "checkpoint_epoch_0.pth" in warnings[0]
    assert "checkpoint['extra']['custom'] (a test_safe_types.Custom" in warnings[0]
    assert "trusted=True" in warnings[0] and "dataclass" in warnings[0]
    assert "['extra']['config']" not in warnings[0]  # the known-safe types are not reported
    with pytest.raises(UnsafeCheckpointError, match=r"test_safe_types\.Custom"):
        CheckpointStore(d).load("checkpoint_epoch_1.pth")


def test_a_dataclass_of_a_module_not_imported_is_refused_and_not_imported(tmp_path: Path) -> None:
    (tmp_path / "genesis_private_cfg.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass Private:\n    x: int = 1\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import genesis_private_cfg

        path = tmp_path / "ck.pt"
        torch.save({"cfg": genesis_private_cfg.Private()}, path)
        assert safe_types.allowed_globals(str(path)) == [
            (genesis_private_cfg.Private, "genesis_private_cfg.Private")
        ]
        del sys.modules["genesis_private_cfg"]
        allowed, refused = safe_types.refused_globals(str(path))
        assert allowed == [] and refused == ["genesis_private_cfg.Private"]
        assert "genesis_private_cfg" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("genesis_private_cfg", None)


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("pathlib.PosixPath", True),
        ("numpy.core.multiarray._reconstruct", True),  # a numpy 1 file
        ("numpy._core.multiarray.scalar", True),
        ("omegaconf.dictconfig.DictConfig", True),
        ("test_safe_types.Stage", True),
        ("test_safe_types.DataConfig", True),
        ("test_safe_types.Custom", False),  # imported, but neither a dataclass nor an enum
        ("test_safe_types.extras", False),  # a function
        ("os.system", False),
        ("builtins.eval", False),
        ("numpy.load", False),
    ],
)
def test_resolve_allows_exactly_the_known_safe_names(name: str, allowed: bool) -> None:
    assert (safe_types.resolve(name) is not None) is allowed
