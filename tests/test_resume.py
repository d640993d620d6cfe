from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lightning_genesis_ckpt import CheckpointRecord, CheckpointStore, UnsafeCheckpointError
from lightning_genesis_ckpt.core.ordering import candidates, interrupt_then_epoch
from lightning_genesis_ckpt.storage.resume import resolve


def r(name: str, role: str, step: int | None, seq: int) -> CheckpointRecord:
    return CheckpointRecord(
        name=name, role=role, size=1, checksum="crc32:0", created=0.0, seq=seq, global_step=step
    )


@pytest.mark.parametrize(
    ("records", "order"),
    [
        # the snapshot is newer than the newest rolling checkpoint: it goes first
        ([r("e1", "epoch", 20, 1), r("snap", "interrupt", 25, 2)], ["snap", "e1"]),
        # a stale snapshot (older step) loses to a newer rolling checkpoint
        ([r("snap", "interrupt", 15, 1), r("e1", "epoch", 20, 2)], ["e1", "snap"]),
        # same step: the later commit wins; best_model (a copy) comes after its peers
        (
            [r("e1", "epoch", 20, 1), r("best", "best", 20, 2), r("snap", "interrupt", 20, 3)],
            ["snap", "e1", "best"],
        ),
        # manual files are never resume candidates
        ([r("mine", "manual", 99, 1), r("e0", "epoch", 10, 2)], ["e0"]),
    ],
)
def test_candidate_order(records: list[CheckpointRecord], order: list[str]) -> None:
    assert [c.name for c in candidates(records)] == order


def e(name: str, role: str, epoch: int | None, seq: int) -> CheckpointRecord:
    return CheckpointRecord(
        name=name, role=role, size=1, checksum="crc32:0", created=0.0, seq=seq, epoch=epoch
    )


@pytest.mark.parametrize(
    ("records", "order"),
    [
        # plain loops record no steps: the interrupt snapshot first, then epochs numerically (10 > 9)
        (
            [e("checkpoint_epoch_9.pth", "epoch", 9, 1), e("checkpoint_epoch_10.pth", "epoch", 10, 2)],
            ["checkpoint_epoch_10.pth", "checkpoint_epoch_9.pth"],
        ),
        ([e("e3", "epoch", 3, 1), e("snap", "interrupt", None, 2)], ["snap", "e3"]),
        ([e("snap", "interrupt", 2, 1), e("e3", "epoch", 3, 2)], ["snap", "e3"]),
        # an epoch file's number counts even when the record lacks it (imported files)
        (
            [e("checkpoint_epoch_4.pth", "epoch", None, 1), e("x", "epoch", 3, 2)],
            ["checkpoint_epoch_4.pth", "x"],
        ),
        # best and manual are not among the manager's roles
        ([e("best", "best", 99, 1), e("mine", "manual", 99, 2), e("e0", "epoch", 0, 3)], ["e0"]),
    ],
)
def test_manager_candidate_order(records: list[CheckpointRecord], order: list[str]) -> None:
    got = candidates(records, roles=("interrupt", "epoch"), key=interrupt_then_epoch)
    assert [c.name for c in got] == order


def test_resolve_skips_corrupt_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save("checkpoint_epoch_0.pth", {"w": torch.ones(3)}, role="epoch", global_step=1)
    store.save("checkpoint_epoch_1.pth", {"w": torch.ones(3) * 2}, role="epoch", global_step=2)
    with open(tmp_path / "checkpoint_epoch_1.pth", "r+b") as f:
        f.seek(60)
        f.write(b"\x00\x01\x02")
    with caplog.at_level(logging.WARNING):
        found = resolve(store)
    assert found.record is not None and found.record.name == "checkpoint_epoch_0.pth"
    assert torch.equal(found.checkpoint["w"], torch.ones(3))
    assert [n for n, _ in found.skipped] == ["checkpoint_epoch_1.pth"]
    assert "checksum" in found.skipped[0][1] and "checkpoint_epoch_1.pth" in caplog.text
    dry = resolve(store, load=False)
    assert dry.record is not None and dry.record.name == "checkpoint_epoch_0.pth" and dry.checkpoint is None


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resolve_refuses_unsafe_files_instead_of_skipping(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ck"))
    store.save("checkpoint_epoch_0.pth", {"w": torch.ones(3)}, role="epoch", global_step=1)
    marker = tmp_path / "pwned"
    store.save("checkpoint_epoch_1.pth", {"x": Exploit(str(marker))}, role="epoch", global_step=2)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_epoch_1\.pth"):
        resolve(store)
    assert not marker.exists()
