"""The Lightning internals we rely on exist in the Lightning version CI installs, and RNG state round-trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from models import make_trainer

from lightning_genesis_ckpt.adapter import _lightning, rng
from lightning_genesis_ckpt.storage import serialization


def test_lightning_internals_present() -> None:
    trainer = make_trainer([], 1)
    _lightning.check_compatibility(trainer)


def test_incompatible_lightning_is_a_clear_error() -> None:
    class NotATrainer:
        pass

    with pytest.raises(RuntimeError, match="does not support Lightning"):
        _lightning.check_compatibility(NotATrainer())


def test_resume_hook_installs_and_uninstalls() -> None:
    trainer = make_trainer([], 1)
    connector = trainer._checkpoint_connector
    uninstall = _lightning.install_resume_hook(trainer, lambda: None)
    assert "resume_start" in connector.__dict__
    uninstall()
    assert "resume_start" not in connector.__dict__


def test_rng_roundtrip_through_weights_only_load(tmp_path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = rng.capture()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    rng.restore(torch.load(path, weights_only=True))
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


def test_dump_streams_without_a_second_buffer() -> None:
    import tracemalloc

    class Sink:
        def __init__(self) -> None:
            self.size = 0

        def write(self, data) -> int:
            n = len(memoryview(data).cast("B"))
            self.size += n
            return n

        def flush(self) -> None:
            pass

    obj = {"big": torch.zeros(8 * 2**20)}  # 32 MiB
    sink = Sink()
    tracemalloc.start()
    try:
        size, _ = serialization.dump(obj, sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == sink.size > 32 * 2**20
    assert peak < 2**20, f"serialization held {peak / 2**20:.1f} MiB of Python buffers"


@pytest.mark.parametrize(
    ("size", "elapsed", "expected"),
    [
        (47_923, 0.004, "46.8 KiB in 0.00s"),  # too quick to time: no speed (it used to say "0 MiB/s")
        (47_923, 0.05, "46.8 KiB in 0.05s, 936.0 KiB/s"),
        (3 * 2**30, 2.0, "3.0 GiB in 2.00s, 1.5 GiB/s"),
        (None, 1.234, "in 1.23s"),
    ],
)
def test_transfer_summary_picks_a_unit_that_fits(size: int | None, elapsed: float, expected: str) -> None:
    from lightning_genesis_ckpt.core.display import transfer_summary

    assert transfer_summary(size, elapsed) == expected
