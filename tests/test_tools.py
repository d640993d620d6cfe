"""validate_checkpoint and load_state_dict_into, on real files and real modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import StoreTarget
from lightning_files import stock_lightning_checkpoint
from torch import nn

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import LoadReport, load_state_dict_into, validate_checkpoint
from lightning_genesis_ckpt.api.tools import extract_model_state_dict

# torch.compile imports TorchScript pieces that torch 2.13 marks deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


class Net(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def trained(seed: int = 0, classes: int = 3) -> Net:
    torch.manual_seed(seed)
    return Net(classes)


def same(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lightning") / "last.ckpt"
    stock_lightning_checkpoint(path)
    return path


# ------------------------------------------------------------------------------------ validate_checkpoint
def test_valid_file_with_a_manifest_record(store_url: StoreTarget) -> None:
    opts = store_url.storage_options
    genesis.save(trained().state_dict(), f"{store_url.url}/m.pth", storage_options=opts)
    ok, message = validate_checkpoint(f"{store_url.url}/m.pth", storage_options=opts)
    assert ok, message
    assert "matches the manifest" in message and "4 weight tensors" in message


def test_valid_plain_torch_file_says_the_checksum_was_not_checked(tmp_path: Path) -> None:
    torch.save({"model": trained().state_dict(), "epoch": 3}, tmp_path / "plain.pth")
    ok, message = validate_checkpoint(tmp_path / "plain.pth")
    assert ok, message
    assert "no checksum to compare" in message


def test_valid_lightning_checkpoint(lightning_ckpt: Path) -> None:
    ok, message = validate_checkpoint(lightning_ckpt)
    assert ok, message
    assert "Lightning checkpoint (epoch" in message


def test_a_bit_flip_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    genesis.save(trained().state_dict(), str(path))
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # inside the zip's tail: torch would still open it
    path.write_bytes(bytes(data))
    ok, message = validate_checkpoint(path)
    assert not ok and "checksum" in message and "m.pth" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lambda p: p.write_bytes(b""), "corrupt"),
        (lambda p: p.write_bytes(os.urandom(300)), "corrupt"),
        (lambda p: torch.save({"epoch": 3, "note": "no weights"}, p), "holds no tensors"),
        (lambda p: None, "no such file"),
    ],
    ids=["empty", "garbage", "no-tensors", "missing"],
)
def test_invalid_files(tmp_path: Path, content, expected: str) -> None:
    path = tmp_path / "bad.pth"
    content(path)
    ok, message = validate_checkpoint(path)
    assert not ok and expected in message and "bad.pth" in message


def test_a_file_needing_trusted_is_reported_not_raised(tmp_path: Path) -> None:
    genesis.save({"fn": lambda x: x, "w": torch.ones(2)}, str(tmp_path / "d.pth"), serializer="dill")
    ok, message = validate_checkpoint(tmp_path / "d.pth")
    assert not ok and "trusted=True" in message
    assert validate_checkpoint(tmp_path / "d.pth", trusted=True)[0]


# ---------------------------------------------------------------------------------- load_state_dict_into
@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(nn.DataParallel, id="DataParallel"),
        pytest.param(torch.compile, id="torch.compile"),
        pytest.param(lambda m: nn.DataParallel(torch.compile(m)), id="DataParallel-of-compiled"),
    ],
)
def test_wrapped_checkpoints_load_into_a_plain_model_and_back(wrap) -> None:
    source = trained(1)
    wrapped_sd = wrap(source).state_dict()
    assert not same(wrapped_sd, source.state_dict()), "the wrapper must have renamed the keys"
    plain = trained(2)
    report = load_state_dict_into(plain, wrapped_sd)
    assert same(plain, source) and report.complete and len(report.renamed) == 4
    target = wrap(trained(3))
    load_state_dict_into(target, source.state_dict())
    assert same(target.state_dict(), wrapped_sd)


def test_fine_tuning_load_skips_the_new_head_and_reports_it() -> None:
    source, target = trained(1, classes=3), trained(2, classes=5)
    head_before = target.head.weight.clone()
    report = load_state_dict_into(target, source.state_dict(), strict=False, skip_shape_mismatch=True)
    assert [k for k, _, _ in report.shape_mismatched] == ["head.weight", "head.bias"]
    assert report.shape_mismatched[0][1:] == ((3, 8), (5, 8))
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.body[0].weight, source.body[0].weight)
    assert "shape mismatched: head.weight (3, 8) vs model (5, 8)" in str(report)


def test_shape_mismatch_without_skip_raises_and_leaves_the_model_unchanged() -> None:
    target = trained(2, classes=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="skip_shape_mismatch=True"):
        load_state_dict_into(target, trained(1, classes=3).state_dict(), strict=False)
    assert same(target.state_dict(), before)


def test_strict_reports_missing_and_unexpected_before_touching_the_model() -> None:
    source = trained(1).state_dict()
    partial = {k: v for k, v in source.items() if k.startswith("body.")}
    partial["extra.weight"] = torch.zeros(1)
    target = trained(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"missing: head\.weight, head\.bias; unexpected: extra\.weight"):
        load_state_dict_into(target, partial)
    assert same(target.state_dict(), before)
    report = load_state_dict_into(target, partial, strict=False)
    assert (report.missing, report.unexpected) == (["head.weight", "head.bias"], ["extra.weight"])
    assert report.loaded == ["body.0.weight", "body.0.bias"] and not report.complete
    assert isinstance(report, LoadReport)


def test_whole_checkpoints_and_custom_prefixes(tmp_path: Path, lightning_ckpt: Path) -> None:
    source = trained(1)
    opt = torch.optim.SGD(source.parameters(), lr=0.1)
    genesis.save_checkpoint(source.state_dict(), opt.state_dict(), str(tmp_path / "c.pth"))
    target = trained(2)
    load_state_dict_into(target, genesis.load(str(tmp_path / "c.pth")))
    assert same(target, source)
    # A LightningModule keeps the network as self.net: strip "net." to load into the bare network.
    bare = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    ckpt = genesis.load(str(lightning_ckpt))
    report = load_state_dict_into(bare, ckpt, strip_prefixes=("net.",))
    assert report.complete and torch.equal(bare[0].weight, ckpt["state_dict"]["net.0.weight"])


def test_extract_model_state_dict_layouts() -> None:
    w = {"a": torch.ones(1)}
    for ckpt in ({"state_dict": w, "epoch": 1}, {"model_state_dict": w}, {"model": w, "epoch": 2}, w):
        assert extract_model_state_dict(ckpt) == w
    with pytest.raises(ValueError, match="no model weights"):
        extract_model_state_dict({"epoch": 1})
