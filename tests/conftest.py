from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
from s3server import S3Server

from lightning_genesis_ckpt import CheckpointStore

BUCKET = "genesis-tests"

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.fixture(autouse=True)
def _propagate_library_logs() -> Iterator[None]:
    # The package mirrors Lightning's logging setup (propagate=False when the root has no handler at import);
    # tests read our warnings through caplog, which listens on the root logger.
    logger = logging.getLogger("lightning_genesis_ckpt")
    old = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = old


@pytest.fixture(autouse=True)
def _no_lock_outlives_its_test() -> Iterator[None]:
    """Every lock a test takes is released by the end of that test (a leaked one would block the next)."""
    from lightning_genesis_ckpt.storage import writers

    yield
    gc.collect()  # a CheckpointManager releases its lock when it is collected
    held = writers.held_directories()
    for writer in held:
        writer.drop_lock()
        writers.forget(writer)
    assert not held, f"locks still held after the test: {[w.key for w in held]}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3-protocol server on a free loopback port, with one bucket; stopped when the session ends."""
    server = S3Server().start()
    try:
        fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options()).mkdir(BUCKET)
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class StoreTarget:
    """A checkpoint directory as a user names it: a URL plus the ``storage_options`` fsspec needs for it."""

    backend: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    server: S3Server | None = None

    def __str__(self) -> str:
        return self.url

    def store(self, **kwargs: Any) -> CheckpointStore:
        """A new store over this directory (as a new process would open it)."""
        return CheckpointStore(self.url, self.storage_options, **kwargs)

    def fs(self) -> fsspec.AbstractFileSystem:
        """A filesystem of its own for the test to look at (or damage) the directory behind the store's back."""
        fs, _ = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.storage_options)
        return fs

    def names(self) -> list[str]:
        """Sorted names of every file in the directory, listed fresh."""
        fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.storage_options)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        except FileNotFoundError:
            return []


def pending_uploads(target: StoreTarget) -> list[str]:
    """Keys under an S3 target's prefix with a multipart upload that was neither completed nor aborted."""
    from s3fs import S3FileSystem

    prefix = target.url.removeprefix(f"s3://{BUCKET}/")
    fs = target.fs()
    assert isinstance(fs, S3FileSystem)
    return [u["Key"] for u in fs.list_multipart_uploads(BUCKET) if u["Key"].startswith(prefix)]


def make_target(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> StoreTarget:
    """A fresh, empty checkpoint directory on ``backend`` (``local``, ``memory`` or ``s3``).

    ``s3`` is ``s3://genesis-tests/<unique prefix>/ckpts`` on the loopback moto server, reached through s3fs
    with the storage options a user would pass.
    """
    if backend == "local":
        return StoreTarget("local", str(tmp_path / "ckpts"))
    if backend == "memory":
        url = f"memory://genesis-tests/{uuid.uuid4().hex}"

        def cleanup() -> None:
            fs = fsspec.filesystem("memory")
            if fs.exists(url):
                fs.rm(url, recursive=True)

        request.addfinalizer(cleanup)
        return StoreTarget("memory", url)
    if backend == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        return StoreTarget("s3", f"s3://{BUCKET}/{uuid.uuid4().hex}/ckpts", server.storage_options(), server)
    raise ValueError(f"unknown backend {backend!r}")


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
    """A fresh, empty checkpoint directory on each backend of the conformance suite."""
    return make_target(request, tmp_path, request.param)


def run_script(*args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a script from tests/scripts in a fresh Python process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT)
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def train(dirpath: str | StoreTarget, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run tests/scripts/train.py on ``dirpath``; a StoreTarget's storage options go along as JSON."""
    if isinstance(dirpath, StoreTarget):
        extra = ("--storage-options", json.dumps(dirpath.storage_options), *extra)
        dirpath = dirpath.url
    return run_script(str(SCRIPTS / "train.py"), dirpath, *extra, check=check)


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT:"):
            return dict(json.loads(line[len("RESULT:") :]))
    raise AssertionError(f"no RESULT line\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
