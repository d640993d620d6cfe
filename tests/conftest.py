from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

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


@pytest.fixture(params=["local", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty checkpoint directory URL on each backend of the conformance suite."""
    if request.param == "local":
        yield str(tmp_path / "ckpts")
    else:
        url = f"memory://genesis-tests/{uuid.uuid4().hex}"
        yield url
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)


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


def train(dirpath: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_script(str(SCRIPTS / "train.py"), dirpath, *extra, check=check)


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT:"):
            return dict(json.loads(line[len("RESULT:") :]))
    raise AssertionError(f"no RESULT line\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
