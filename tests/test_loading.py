"""Loads are one verified pass, and only positive evidence of damage is "corrupt"; storage errors are clear.

* what is loaded is what was checksummed: a remote file is read once;
* a legacy-format (non-zip) torch file loads, also where loads memory-map;
* MemoryError, EIO, CUDA out-of-memory propagate as themselves, so resume never skips a healthy checkpoint;
* an object-store outage is a ``CheckpointSaveError`` on save and an ``OSError`` naming the URL elsewhere, and
  never replaces the exception that stopped a fit;
* non-finite metrics are written as valid JSON.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import botocore.exceptions
import fsspec
import pytest
import pytorch_lightning as pl
import torch
from conftest import StoreTarget, make_target
from faultyfs import FaultyFileSystem
from fsspec.asyn import sync_wrapper
from models import RaiseAt, TinyModel, loaders, make_trainer
from s3fs import S3FileSystem
from s3server import S3Server

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointSaveError,
    CheckpointStore,
    GenesisCheckpoint,
    cli,
)
from lightning_genesis_ckpt.core.names import BEST_NAME, MANIFEST_NAME, epoch_name
from lightning_genesis_ckpt.storage.resume import resolve


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
    return make_target(request, tmp_path, "s3")


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(20_000), "b": torch.randn(10)}


# ---------------------------------------------------------------------------------- one verified pass
def test_a_remote_file_is_read_once_and_what_is_loaded_was_verified(
    s3: StoreTarget, s3_server: S3Server
) -> None:
    path = f"{s3.url}/model.pth"
    genesis.save(weights(0), path, storage_options=s3.storage_options)
    key = f"{s3.store().root}/model.pth"
    for load in (
        lambda: genesis.load(path, storage_options=s3.storage_options),
        lambda: genesis.validate_checkpoint(path, storage_options=s3.storage_options),
        lambda: s3.store().load("model.pth"),
    ):
        mark = s3_server.mark()
        assert load()
        gets = [r for r in s3_server.requests_since(mark) if r.method == "GET" and r.path.endswith(key)]
        assert len(gets) == 1, [str(r) for r in gets]


def legacy_file(path: Path, obj: Any) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def test_legacy_format_files_load_where_loads_memory_map(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    legacy_file(d / "old.pth", weights(1))
    assert torch.equal(genesis.load(str(d / "old.pth"), mmap=True)["w"], weights(1)["w"])
    # A directory of the original utility, in the legacy format its torch wrote: adopted, then loaded (mmap).
    legacy_file(d / BEST_NAME, {"model": weights(2), "epoch": 3})
    legacy_file(d / epoch_name(3), {"model": weights(3), "epoch": 3})
    manager = CheckpointManager(str(d))
    assert torch.equal(manager.load_best_model()["model"]["w"], weights(2)["w"])
    assert manager.load_latest_checkpoint()["epoch"] == 3
    store = CheckpointStore(str(d))
    store.save("new.pth", weights(4), embed_metadata=False)
    assert torch.equal(store.load("new.pth", mmap=True)["w"], weights(4)["w"])


# ------------------------------------------------------------------------------------- not damage
class Unavailable(Exception):
    """Stands for whatever the caller's map_location raises: the load must not call it damage."""


def raising(error: BaseException) -> Any:
    def map_location(storage: Any, location: str) -> Any:
        raise error

    return map_location


@pytest.mark.parametrize(
    "error",
    [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), Unavailable()],
    ids=["MemoryError", "cuda-oom", "other"],
)
def test_failures_that_are_not_damage_propagate_and_resume_does_not_skip(
    store_url: StoreTarget, error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_url.store(verbose=False)
    for epoch in range(2):
        store.save(epoch_name(epoch), weights(epoch), role="epoch", epoch=epoch, global_step=epoch + 1)
    with pytest.raises(type(error)):
        store.load(epoch_name(1), map_location=raising(error))
    with pytest.raises(type(error)), caplog.at_level(logging.WARNING):
        resolve(store_url.store(), map_location=raising(error))
    assert "skipping" not in caplog.text, "a healthy checkpoint was skipped"


@pytest.fixture
def faulty_url() -> Iterator[str]:
    FaultyFileSystem.reset()
    yield f"faulty://loading/{uuid.uuid4().hex}"
    FaultyFileSystem.reset()


def test_a_read_error_is_an_os_error_not_damage(faulty_url: str) -> None:
    CheckpointStore(faulty_url).save(epoch_name(0), weights(0), role="epoch", epoch=0, global_step=1)
    genesis.save(weights(1), f"{faulty_url}/plain.pth")
    fs, root = fsspec.core.url_to_fs(faulty_url)
    fs.pipe_file(f"{root}/unlisted.pth", fs.cat_file(f"{root}/plain.pth"))
    failing = {"fail_read_match": ".pth", "fail_after": 100}
    store = CheckpointStore(faulty_url, failing)
    for load in (
        lambda: store.load(epoch_name(0)),
        lambda: store.load("unlisted.pth"),
        lambda: genesis.load(f"{faulty_url}/unlisted.pth", storage_options=failing),
        lambda: resolve(store),
    ):
        with pytest.raises(OSError) as info:
            load()
        assert info.value.errno == errno.EIO and not isinstance(info.value, CheckpointCorruptError)


# ------------------------------------------------------------------------------------------ outages
class OutageS3(S3FileSystem):
    """s3fs whose every request fails once ``down`` is set, the way a lost endpoint fails."""

    protocol = ("s3outage",)
    down: ClassVar[bool] = False

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if type(self).down:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return await super()._call_s3(method, *args, **kwargs)

    call_s3 = sync_wrapper(_call_s3)


@pytest.fixture
def outage(s3: StoreTarget) -> Iterator[StoreTarget]:
    fsspec.register_implementation("s3outage", OutageS3, clobber=True)
    OutageS3.down = False
    yield StoreTarget("s3outage", s3.url.replace("s3://", "s3outage://"), s3.storage_options, s3.server)
    OutageS3.down = False


def test_an_object_store_outage_is_a_clear_error(outage: StoreTarget) -> None:
    store = outage.store(verbose=False)
    store.save(epoch_name(0), weights(0), role="epoch", epoch=0, global_step=1)
    OutageS3.down = True
    with pytest.raises(CheckpointSaveError, match=r"s3outage://.*checkpoint_epoch_1\.pth"):
        store.save(epoch_name(1), weights(1), role="epoch", epoch=1, global_step=2)
    for call in (
        lambda: outage.store().load(epoch_name(0)),
        lambda: outage.store().delete([epoch_name(0)]),
        lambda: outage.store().records(),
    ):
        with pytest.raises(OSError, match=r"s3outage://"):
            call()


class GoesDown(pl.Callback):
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 1 and batch_idx == 1:
            OutageS3.down = True


def test_a_failing_cleanup_never_replaces_the_error_that_stopped_the_fit(
    outage: StoreTarget, caplog: pytest.LogCaptureFixture
) -> None:
    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    ckpt = GenesisCheckpoint(outage.url, monitor="val_loss", storage_options=outage.storage_options)
    with pytest.raises(RuntimeError, match="injected failure"), caplog.at_level(logging.WARNING):
        make_trainer([ckpt, GoesDown(), RaiseAt(epoch=1, batch=2)], 3).fit(TinyModel(), train, val)
    assert "interrupt snapshot" in caplog.text and "lock" in caplog.text


# ------------------------------------------------------------------------------------------- metrics
def strict_json(data: str | bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data, parse_constant=refuse)


def test_non_finite_metrics_are_valid_json(
    store_url: StoreTarget, capsys: pytest.CaptureFixture[str]
) -> None:
    store = store_url.store(verbose=False)
    metrics = {"val_loss": math.nan, "grad_norm": math.inf, "margin": -math.inf, "acc": 0.5}
    store.save(
        epoch_name(0), weights(0), role="epoch", epoch=0, global_step=1, metrics=metrics, monitor="val_loss"
    )
    doc = strict_json(store_url.fs().cat_file(store.path(MANIFEST_NAME)))
    assert doc["checkpoints"][0]["metrics"]["acc"] == 0.5
    record = store_url.store().manifest().get(epoch_name(0))
    assert math.isnan(record.metrics["val_loss"]) and record.metrics["grad_norm"] == math.inf
    assert record.metrics["margin"] == -math.inf
    options = [
        arg
        for k, v in store_url.storage_options.items()
        for arg in ("-o", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")
    ]
    capsys.readouterr()
    assert cli.main(["ls", store_url.url, "--json", *options]) == 0
    listed = strict_json(capsys.readouterr().out)
    assert listed[0]["metrics"]["acc"] == 0.5
