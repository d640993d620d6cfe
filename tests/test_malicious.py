"""A checkpoint whose unpickling would run a command is refused everywhere this library loads files.

The exploit is real (``test_the_exploit_is_real`` runs it on purpose); everywhere else its marker file must
never appear.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import StoreTarget
from models import TinyModel, loaders, make_trainer

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint, UnsafeCheckpointError
from lightning_genesis_ckpt.core.names import LOCK_NAME, MANIFEST_NAME
from lightning_genesis_ckpt.storage.resume import resolve


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def evil_bytes(marker: Path, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {"state_dict": {"w": torch.ones(2)}, "x": Exploit(marker)},
        buf,
        _use_new_zipfile_serialization=not legacy,
    )
    return buf.getvalue()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def test_the_exploit_is_real(tmp_path: Path, marker: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ck"))
    store.save("evil.pth", {"x": Exploit(marker)})
    store.load("evil.pth", trusted=True)  # the user said they trust it: it runs
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_load_refuses_and_says_how_to_trust(store_url: StoreTarget, marker: Path, legacy: bool) -> None:
    store = store_url.store()
    store.save("best_model.pth", {"x": Exploit(marker)}, role="best", global_step=5)
    store.fs.pipe_file(store.path("unlisted.pth"), evil_bytes(marker, legacy))
    for name, verify in [("best_model.pth", True), ("best_model.pth", False), ("unlisted.pth", True)]:
        with pytest.raises(UnsafeCheckpointError, match=rf"{name}.*trusted=True") as info:
            store.load(name, verify=verify)
        assert "posix.system" in str(info.value) or "GLOBAL" in str(info.value)
    with pytest.raises(UnsafeCheckpointError, match="saved with dill"):
        store.load("best_model.pth", serializer="dill")
    assert not marker.exists()


def test_resume_refuses_instead_of_skipping(store_url: StoreTarget, marker: Path) -> None:
    store = store_url.store()
    store.save("checkpoint_epoch_0.pth", {"w": torch.ones(3)}, global_step=1)
    store.save("checkpoint_epoch_1.pth", {"x": Exploit(marker)}, global_step=2)
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint_epoch_1\.pth"):
        resolve(store_url.store())
    assert not marker.exists()


def test_recovery_paths_never_unpickle_code(
    store_url: StoreTarget, marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_url.store()
    store.save("checkpoint_epoch_0.pth", {"w": torch.ones(3)}, epoch=0, global_step=1)
    store.save("best_model.pth", {"w": torch.ones(3)}, global_step=1)
    store.save("checkpoint_epoch_1.pth", {"x": Exploit(marker)}, epoch=1, global_step=2)
    # An interrupted replacement of best_model.pth, whose "new content" is the exploit, as an earlier
    # version's manifest records one: settling it reads the file's embedded record, weights-only.
    doc = json.loads(store.fs.cat_file(store.manifest_path))
    store.fs.pipe_file(
        store.manifest_path, json.dumps({**doc, "version": 2, "replacing": ["best_model.pth"]}).encode()
    )
    store.fs.pipe_file(store.path("best_model.pth"), evil_bytes(marker))
    with caplog.at_level(logging.WARNING):
        settled = store_url.store().manifest()
    assert "best_model.pth changed during an interrupted commit and cannot be recovered" in caplog.text
    assert settled.get("best_model.pth") == store.manifest().get("best_model.pth")  # the old record
    # A lost manifest: rebuilding reads every file, and must leave the exploit out.
    store.fs.rm_file(store.manifest_path)
    with caplog.at_level(logging.WARNING):
        rebuilt = store_url.store().manifest()
    assert list(rebuilt.records) == ["checkpoint_epoch_0.pth"]
    assert "checkpoint_epoch_1.pth" in caplog.text and "trusted=True" in caplog.text
    assert not marker.exists()


def test_auto_resume_refuses_before_training(tmp_path: Path, marker: Path) -> None:
    d = str(tmp_path / "ck")
    store = CheckpointStore(d)
    store.save("checkpoint_epoch_0.pth", {"x": Exploit(marker)}, role="epoch", epoch=0, global_step=12)

    class Count(pl.Callback):
        batches = 0

        def on_train_batch_start(self, *args: Any) -> None:
            Count.batches += 1

    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    with pytest.raises(
        UnsafeCheckpointError, match=r"checkpoint_epoch_0\.pth.*GenesisCheckpoint\(\.\.\., trusted=True\)"
    ):
        make_trainer([GenesisCheckpoint(d), Count()], 2).fit(TinyModel(), train, val)
    assert Count.batches == 0 and not marker.exists()
    assert sorted(os.listdir(d)) == ["checkpoint_epoch_0.pth", MANIFEST_NAME]
    assert LOCK_NAME not in os.listdir(d)
