"""export(): the exported artifact, loaded back with the standard tools, gives the same outputs."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StoreTarget
from lightning_files import stock_lightning_checkpoint
from models import TinyModel
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from torch import nn

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt.api.functional import file_store

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


class Net(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def trained_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    store, name = file_store(url, storage_options)
    with store.fs.open(store.path(name), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyModel]:
    path = tmp_path_factory.mktemp("lightning") / "last.ckpt"
    model = stock_lightning_checkpoint(path)
    return path, model.eval()


def test_safetensors_from_a_plain_checkpoint_has_the_weights_only(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    net = trained_net()
    opt = torch.optim.Adam(net.parameters())
    src = f"{store_url.url}/ckpt.pth"
    genesis.save_checkpoint(nn.DataParallel(net).state_dict(), opt.state_dict(), src, storage_options=opts)
    out = genesis.export(src, f"{store_url.url}/model.safetensors", storage_options=opts)
    weights = safetensors_load(read_bytes(out, opts))
    assert sorted(weights) == sorted(net.state_dict()), "weights only, wrapper prefix stripped"
    fresh = Net().eval()
    fresh.load_state_dict(weights)
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), net(x))


def test_safetensors_from_a_lightning_checkpoint(
    tmp_path: Path, lightning_ckpt: tuple[Path, TinyModel]
) -> None:
    path, model = lightning_ckpt
    out = genesis.export(str(path), str(tmp_path / "tiny.safetensors"))
    fresh = TinyModel().eval()
    fresh.load_state_dict(load_file(out))
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))


def test_tied_weights_export(tmp_path: Path) -> None:
    emb = nn.Embedding(10, 4)
    out_layer = nn.Linear(4, 10, bias=False)
    out_layer.weight = emb.weight  # tied, as in language models
    model = nn.ModuleDict({"emb": emb, "out": out_layer})
    genesis.save(model.state_dict(), str(tmp_path / "tied.pth"))
    weights = load_file(genesis.export(str(tmp_path / "tied.pth"), str(tmp_path / "tied.safetensors")))
    assert torch.equal(weights["emb.weight"], weights["out.weight"])


@pytest.mark.parametrize("fmt", ["torch.export", "torchscript"])
def test_program_formats_reproduce_the_outputs(tmp_path: Path, fmt: str) -> None:
    net = trained_net()
    genesis.save(net.state_dict(), str(tmp_path / "w.pth"))
    x = torch.randn(5, 6)
    out = genesis.export(str(tmp_path / "w.pth"), str(tmp_path / "net.bin"), fmt, model=Net, example_input=x)
    with open(out, "rb") as f:
        buf = io.BytesIO(f.read())
    program = torch.export.load(buf).module() if fmt == "torch.export" else torch.jit.load(buf)
    y = torch.randn(5, 6)  # a different input of the traced shape
    assert torch.allclose(program(y), net(y), atol=0, rtol=0)


def test_lightning_module_class_is_built_from_its_hyperparameters(
    store_url: StoreTarget, lightning_ckpt: tuple[Path, TinyModel]
) -> None:
    opts = store_url.storage_options
    path, model = lightning_ckpt
    x = torch.randn(2, 16)
    out = genesis.export(
        str(path),
        f"{store_url.url}/tiny.pt2",
        "torch.export",
        model=TinyModel,
        example_input=x,
        storage_options=opts,
    )
    program = torch.export.load(io.BytesIO(read_bytes(out, opts))).module()
    assert torch.equal(program(x), model(x))


def test_bad_requests_are_clear(tmp_path: Path) -> None:
    genesis.save(trained_net().state_dict(), str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="not supported"):
        genesis.export(str(tmp_path / "w.pth"), str(tmp_path / "o"), "onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs model="):
        genesis.export(str(tmp_path / "w.pth"), str(tmp_path / "o"), "torch.export")
    with pytest.raises(RuntimeError, match="shape mismatched"):
        genesis.export(
            str(tmp_path / "w.pth"),
            str(tmp_path / "o"),
            "torch.export",
            model=Net(7),
            example_input=torch.ones(1, 7),
        )
    assert not (tmp_path / "o").exists()
