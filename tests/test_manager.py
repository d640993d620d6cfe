"""CheckpointManager: the Genesis manager API for plain PyTorch loops, on the callback's store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StoreTarget
from torch import nn

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import CheckpointManager, CheckpointStore, UnsafeCheckpointError
from lightning_genesis_ckpt.core.names import LOCK_NAME, MANIFEST_NAME


def state(epoch: int, **extra: Any) -> dict[str, Any]:
    torch.manual_seed(epoch)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(), **extra}


def damage(store: CheckpointStore, name: str) -> None:
    with store.fs.open(store.path(name), "rb") as f:
        data = f.read()
    with store.fs.open(store.path(name), "wb") as f:
        f.write(data[: len(data) // 2])


def manager(target: StoreTarget, **kwargs: Any) -> CheckpointManager:
    """A manager over ``target``, as a user opens one: its URL plus its storage options."""
    return CheckpointManager(target.url, storage_options=target.storage_options, **kwargs)


def files(store: CheckpointStore) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False))


def test_constants_match_the_genesis_names_and_the_callbacks() -> None:
    assert CheckpointManager.BEST_MODEL_NAME == "best_model.pth"
    assert CheckpointManager.EPOCH_CKPT_PREFIX == "checkpoint_epoch_"
    assert CheckpointManager.INTERRUPT_CKPT_NAME == "interrupt_checkpoint.pth"


def test_defaults_match_the_genesis_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mgr = CheckpointManager()
    assert (mgr.save_dir, mgr.device, mgr.max_to_keep) == ("checkpoint", "cpu", 5)
    assert (tmp_path / "checkpoint").is_dir(), "created up front, like the original"


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_to_keep_must_be_a_positive_int(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(str(tmp_path), max_to_keep=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_unavailable_device_fails_at_construction(tmp_path: Path) -> None:
    # Rather than every checkpoint later failing to load and being skipped as "corrupt".
    with pytest.raises(ValueError, match="no cuda device"):
        CheckpointManager(str(tmp_path), device="cuda")


def test_rolling_cleanup_keeps_the_newest_by_epoch_number(store_url: StoreTarget) -> None:
    mgr = manager(store_url, max_to_keep=3)
    for epoch in range(12):  # 9, 10, 11: numeric order, where "9" > "10" lexically
        mgr.save_epoch_checkpoint(state(epoch), epoch)
    kept = [f"checkpoint_epoch_{e}.pth" for e in (10, 11, 9)]
    assert sorted(r.name for r in mgr.store.records()) == sorted(kept)
    assert files(mgr.store) == sorted([*kept, LOCK_NAME, MANIFEST_NAME]), (
        "a manager that saved holds the lock"
    )
    mgr.close()
    assert files(mgr.store) == sorted([*kept, MANIFEST_NAME])
    loaded = mgr.load_latest_checkpoint()
    assert loaded is not None and loaded["epoch"] == 11


def test_latest_prefers_the_interrupt_snapshot_and_keeps_it_until_the_next_save(
    store_url: StoreTarget,
) -> None:
    mgr = manager(store_url)
    for epoch in range(3):
        mgr.save_epoch_checkpoint(state(epoch), epoch)
    mgr.save_interrupt_checkpoint(state(2, batch=17))
    loaded = mgr.load_latest_checkpoint()
    assert loaded is not None and loaded["batch"] == 17
    assert mgr.last_loaded is not None and mgr.last_loaded.role == "interrupt"
    # A crash right after resuming: the next process resumes from the same snapshot.
    again = manager(store_url).load_latest_checkpoint()
    assert again is not None and again["batch"] == 17
    mgr.save_epoch_checkpoint(state(3), 3)
    assert "interrupt_checkpoint.pth" not in mgr.store.manifest().records
    assert "interrupt_checkpoint.pth" not in files(mgr.store)
    latest = mgr.load_latest_checkpoint()
    assert latest is not None and latest["epoch"] == 3


def test_a_best_model_save_does_not_retire_the_snapshot(store_url: StoreTarget) -> None:
    # best_model.pth may hold only weights; the snapshot is the resumable state until an epoch commits.
    mgr = manager(store_url)
    mgr.save_interrupt_checkpoint(state(0))
    mgr.save_best_model({"model": state(0)["model"]}, metric=0.3)
    assert mgr.load_latest_checkpoint() is not None


def test_corrupt_candidates_are_skipped_with_a_warning(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = manager(store_url)
    for epoch in range(3):
        mgr.save_epoch_checkpoint(state(epoch), epoch)
    mgr.save_interrupt_checkpoint(state(2, batch=5))
    damage(mgr.store, "interrupt_checkpoint.pth")
    damage(mgr.store, "checkpoint_epoch_2.pth")
    with caplog.at_level(logging.WARNING):
        loaded = mgr.load_latest_checkpoint()
    assert loaded is not None and loaded["epoch"] == 1
    assert "interrupt_checkpoint.pth" in caplog.text and "checkpoint_epoch_2.pth" in caplog.text
    damage(mgr.store, "checkpoint_epoch_1.pth")
    damage(mgr.store, "checkpoint_epoch_0.pth")
    with caplog.at_level(logging.WARNING):
        assert mgr.load_latest_checkpoint() is None
    assert "no valid checkpoint" in caplog.text


def test_nothing_to_resume_is_none(store_url: StoreTarget) -> None:
    mgr = manager(store_url)
    assert mgr.load_latest_checkpoint() is None
    assert mgr.load_best_model() is None


def test_best_model_roundtrip_records_the_metric(
    store_url: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = manager(store_url)
    mgr.save_best_model(state(0, val_acc=0.5), metric=0.5)
    mgr.save_best_model(state(1, val_acc=0.7), metric=torch.tensor(0.7))
    loaded = mgr.load_best_model()
    assert loaded is not None and loaded["epoch"] == 1
    record = mgr.store.manifest().get("best_model.pth")
    assert record is not None and record.metric() == pytest.approx(0.7)
    assert record.metrics["val_acc"] == pytest.approx(0.7)
    damage(mgr.store, "best_model.pth")
    with caplog.at_level(logging.WARNING):
        assert mgr.load_best_model() is None
    assert "best_model.pth" in caplog.text


def test_loads_return_exactly_what_was_saved(store_url: StoreTarget) -> None:
    mgr = manager(store_url)
    saved = state(4, note="text", val_loss=0.25)
    before = dict(saved)
    mgr.save_epoch_checkpoint(saved, 4)
    assert saved == before
    loaded = mgr.load_latest_checkpoint()
    assert loaded is not None
    assert set(loaded) == set(saved), "no library keys added to the caller's state"
    for key in ("weight", "bias"):
        assert torch.equal(loaded["model"][key], saved["model"][key])
    assert (loaded["note"], loaded["val_loss"]) == ("text", 0.25)


def test_tensors_are_mapped_to_device(store_url: StoreTarget) -> None:
    manager(store_url).save_epoch_checkpoint(state(0), 0)
    loaded = manager(store_url, device="meta").load_latest_checkpoint()
    assert loaded is not None and loaded["model"]["weight"].device.type == "meta"


def test_same_store_as_the_callback(store_url: StoreTarget) -> None:
    mgr = manager(store_url)
    mgr.save_epoch_checkpoint(state(0, val_loss=0.4), 0)
    mgr.save_best_model(state(0), 0.4)
    store = store_url.store()
    roles = {r.name: r.role for r in store.records()}
    assert roles == {"checkpoint_epoch_0.pth": "epoch", "best_model.pth": "best"}
    record = store.verify("checkpoint_epoch_0.pth")
    assert (record.epoch, record.metrics["val_loss"]) == (0, 0.4)
    assert (
        genesis.load(store.url_for("checkpoint_epoch_0.pth"), storage_options=store_url.storage_options)[
            "epoch"
        ]
        == 0
    )


def test_lost_manifest_is_rebuilt_from_the_files(store_url: StoreTarget) -> None:
    mgr = manager(store_url)
    for epoch in range(2):
        mgr.save_epoch_checkpoint(state(epoch), epoch)
    mgr.store.fs.rm_file(mgr.store.manifest_path)
    loaded = manager(store_url).load_latest_checkpoint()
    assert loaded is not None and loaded["epoch"] == 1


def test_a_directory_of_the_original_utility_is_adopted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for epoch in (8, 9, 10):
        torch.save(state(epoch), tmp_path / f"checkpoint_epoch_{epoch}.pth")
    torch.save(state(7), tmp_path / "best_model.pth")
    torch.save({"unrelated": 1}, tmp_path / "notes.pth")
    with caplog.at_level(logging.WARNING):
        mgr = CheckpointManager(str(tmp_path), max_to_keep=2)
    assert "adopted 4 existing checkpoint file(s)" in caplog.text
    assert "notes.pth" not in mgr.store.manifest().records
    loaded = mgr.load_latest_checkpoint()
    assert loaded is not None and loaded["epoch"] == 10
    mgr.save_epoch_checkpoint(state(11), 11)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_10.pth",
        "checkpoint_epoch_11.pth",
    ]
    assert (tmp_path / "notes.pth").exists()


def test_unlisted_files_next_to_a_manifest_are_not_adopted(tmp_path: Path) -> None:
    # With a manifest, an unlisted file is an orphan (e.g. a retired snapshot whose removal failed):
    # resuming from it would go back in time.
    mgr = CheckpointManager(str(tmp_path))
    mgr.save_epoch_checkpoint(state(5), 5)
    torch.save(state(1), tmp_path / "interrupt_checkpoint.pth")
    loaded = CheckpointManager(str(tmp_path)).load_latest_checkpoint()
    assert loaded is not None and loaded["epoch"] == 5


class Config:
    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_custom_objects_need_trusted(store_url: StoreTarget) -> None:
    manager(store_url).save_epoch_checkpoint(state(0, config=Config(0.1)), 0)
    with pytest.raises(UnsafeCheckpointError, match="trusted=True"):
        manager(store_url).load_latest_checkpoint()
    loaded = manager(store_url, trusted=True).load_latest_checkpoint()
    assert loaded is not None and loaded["config"].lr == 0.1


def test_dill_serializer_for_lambdas(store_url: StoreTarget) -> None:
    manager(store_url, serializer="dill").save_epoch_checkpoint(state(0, sched=lambda e: 0.9**e), 0)
    loaded = manager(store_url, trusted=True).load_latest_checkpoint()
    assert loaded is not None and loaded["sched"](2) == pytest.approx(0.81)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


def test_a_failed_save_raises_and_keeps_what_was_committed(store_url: StoreTarget) -> None:
    mgr = manager(store_url, max_to_keep=1)
    mgr.save_epoch_checkpoint(state(0), 0)
    with pytest.raises(RuntimeError, match="on purpose"):
        mgr.save_epoch_checkpoint(state(1, bad=Unpicklable()), 1)
    assert [r.name for r in mgr.store.records()] == ["checkpoint_epoch_0.pth"]
    loaded = mgr.load_latest_checkpoint()
    assert loaded is not None and loaded["epoch"] == 0


def test_epoch_must_be_a_non_negative_int(store_url: StoreTarget) -> None:
    mgr = manager(store_url)
    with pytest.raises(ValueError, match="epoch"):
        mgr.save_epoch_checkpoint(state(0), -1)
    with pytest.raises(TypeError):
        mgr.save_epoch_checkpoint(state(0), 1.5)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_saved_state_loads_on_the_cpu_and_back(store_url: StoreTarget) -> None:
    gpu_state = {"epoch": 0, "model": {k: v.cuda() for k, v in state(0)["model"].items()}}
    manager(store_url, device="cuda").save_epoch_checkpoint(gpu_state, 0)
    on_cpu = manager(store_url).load_latest_checkpoint()
    assert on_cpu is not None and on_cpu["model"]["weight"].device.type == "cpu"
    loaded = genesis.load(
        store_url.store().url_for("checkpoint_epoch_0.pth"), storage_options=store_url.storage_options
    )
    assert loaded["model"]["weight"].is_cpu
    on_gpu = manager(store_url, device="cuda").load_latest_checkpoint()
    assert on_gpu is not None and on_gpu["model"]["weight"].is_cuda
