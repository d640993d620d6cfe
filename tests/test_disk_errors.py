"""Disk full and I/O errors partway through a write: on a filesystem that fails on cue and on a real full tmpfs.

What training does then: it stops with :class:`CheckpointSaveError` (an ``OSError`` with the disk's errno),
so a run never goes on believing it is protected; everything committed before stays intact and listed.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from faultyfs import FaultyFileSystem
from models import BigModel, loaders, make_trainer

from lightning_genesis_ckpt import CheckpointSaveError, CheckpointStore, GenesisCheckpoint
from lightning_genesis_ckpt.core.names import LOCK_NAME, MANIFEST_NAME, is_temp_name


@pytest.fixture
def faulty_url() -> Iterator[str]:
    FaultyFileSystem.reset()
    yield f"faulty://disk-errors/{uuid.uuid4().hex}"
    FaultyFileSystem.reset()


def blob(mib: float, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(int(mib * 2**18), generator=torch.Generator().manual_seed(seed))}


def names(store: CheckpointStore) -> list[str]:
    return store.list_names()


@pytest.mark.parametrize("replacing", [False, True], ids=["new-name", "replacing"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_write_failing_partway_keeps_everything_committed(
    faulty_url: str, code: int, replacing: bool
) -> None:
    store = CheckpointStore(faulty_url)
    store.save("checkpoint_epoch_0.pth", blob(1, 0), epoch=0, global_step=10)
    target = "checkpoint_epoch_0.pth" if replacing else "checkpoint_epoch_1.pth"
    before = store.fs.cat_file(store.path("checkpoint_epoch_0.pth"))
    if code == errno.ENOSPC:
        store.fs.capacity = store.fs.used() + 2**20  # room for half of the next file
    else:
        store.fs.fail_match, store.fs.fail_errno, store.fs.fail_after = target, code, 2**19
    with pytest.raises(CheckpointSaveError) as info:
        store.save(target, blob(2, 1), epoch=1, global_step=20)
    err = info.value
    assert err.errno == code and isinstance(err, OSError) and isinstance(err.__cause__, OSError)
    assert target in str(err) and "the newest is checkpoint_epoch_0.pth (epoch 0, step 10)" in str(err)
    # Nothing committed changed, nothing half-written is left, and a fresh reader agrees.
    assert store.fs.cat_file(store.path("checkpoint_epoch_0.pth")) == before
    assert names(store) == ["checkpoint_epoch_0.pth", MANIFEST_NAME]
    again = CheckpointStore(faulty_url)
    assert [r.name for r in again.records()] == ["checkpoint_epoch_0.pth"]
    again.verify("checkpoint_epoch_0.pth")
    # Once the disk works again, the same store saves normally.
    store.fs.capacity = store.fs.fail_match = None
    store.save(target, blob(2, 1), epoch=1, global_step=20)
    CheckpointStore(faulty_url).verify(target)


def test_manifest_write_failing_removes_the_uncommitted_file(faulty_url: str) -> None:
    store = CheckpointStore(faulty_url)
    store.save("a.pth", blob(0.1))
    store.fs.fail_match = MANIFEST_NAME
    with pytest.raises(CheckpointSaveError, match=r"b\.pth") as info:
        store.save("b.pth", blob(0.1, 1))
    assert info.value.errno == errno.EIO
    assert names(store) == ["a.pth", MANIFEST_NAME]
    assert [r.name for r in CheckpointStore(faulty_url).records()] == ["a.pth"]


def test_failed_removal_of_old_checkpoints_is_a_warning(
    faulty_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Cleaning up is not saving: a new checkpoint committed, the old ones can go at the next commit."""
    store = CheckpointStore(faulty_url)
    store.save("a.pth", blob(0.1))
    original = store.fs.rm

    def failing_rm(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    store.fs.rm = failing_rm  # type: ignore[method-assign]
    store.fs.rm_file = failing_rm  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        assert store.delete(["a.pth"]) == ["a.pth"]
    assert "could not remove" in caplog.text
    assert set(store.manifest().deleting) == {"a.pth"}
    store.fs.rm = original  # type: ignore[method-assign]
    del store.fs.rm_file
    # The next start finishes the job.
    assert CheckpointStore(faulty_url).finish_deletions() == ["a.pth"]
    assert names(store) == [MANIFEST_NAME]


def fit_big(dirpath: str, epochs: int, **kw: object) -> tuple[pl.Trainer, GenesisCheckpoint]:
    pl.seed_everything(0, verbose=False)
    cb = GenesisCheckpoint(dirpath, monitor="val_loss", **kw)  # type: ignore[arg-type]
    trainer = make_trainer([cb], epochs)
    train, val = loaders()
    trainer.fit(BigModel(ballast_mb=4), train, val)
    return trainer, cb


def test_training_stops_on_a_full_disk_and_resumes_once_there_is_space(
    faulty_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Room for three 4 MiB files: epoch 0, its copy to best_model.pth, epoch 1.
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointSaveError) as info:
        fit_big(faulty_url, 4, keep_last=5, storage_options={"capacity": 13 * 2**20})
    assert info.value.errno == errno.ENOSPC
    assert "checkpoint_epoch_2.pth" in str(info.value) and "checkpoint_epoch_1.pth" in str(info.value)
    assert "could not save the interrupt snapshot" in caplog.text  # tried, and failed for the same reason
    store = CheckpointStore(faulty_url)
    assert sorted(store.manifest().records) == [
        "best_model.pth",
        "checkpoint_epoch_0.pth",
        "checkpoint_epoch_1.pth",
    ]
    for rec in store.records():
        store.verify(rec.name)
    assert not [n for n in names(store) if is_temp_name(n) or n == LOCK_NAME]
    trainer, cb = fit_big(faulty_url, 4, keep_last=1, storage_options={"capacity": 30 * 2**20})
    assert cb.resumed_from is not None and cb.resumed_from.name == "checkpoint_epoch_1.pth"
    assert trainer.global_step == 4 * 12


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MiB filesystem (tmpfs), where the kernel itself answers ENOSPC."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_filesystem(small_tmpfs: Path) -> None:
    d = str(small_tmpfs / "ck")
    with pytest.raises(CheckpointSaveError) as info:
        fit_big(d, 6, keep_last=5)  # each checkpoint ~4.2 MiB: the fifth does not fit
    assert info.value.errno == errno.ENOSPC
    store = CheckpointStore(d)
    committed = sorted(store.manifest().records)
    assert "checkpoint_epoch_0.pth" in committed and "best_model.pth" in committed
    for rec in store.records():
        store.verify(rec.name)
    leftovers = [n for n in os.listdir(d) if is_temp_name(n) or n == LOCK_NAME]
    assert leftovers == [], "a temp file (or the lock) was left on the full disk"
    on_disk = sorted(n for n in os.listdir(d) if n.endswith(".pth"))
    assert on_disk == committed, "an uncommitted checkpoint was left on the full disk"
