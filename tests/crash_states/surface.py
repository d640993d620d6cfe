"""The library as the explorer's checks see it: only its public surface, imported in this one place.

The checks open a crashed directory the way users and the next run do -- :class:`CheckpointStore` /
:class:`StoreReader`, :func:`resolve`, ``genesis.load``/``genesis.save``, the ``genesis-ckpt verify``
command, and a real Trainer with :class:`GenesisCheckpoint` -- and never import the write path's internals.
A refactor that moves modules should only need to change the imports below. (The workloads, the traced
program, use the public API as any user would; only the self-test's broken store in :mod:`.broken` reaches
into internals, on purpose.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpointError
from lightning_genesis_ckpt import load as genesis_load
from lightning_genesis_ckpt import save as genesis_save
from lightning_genesis_ckpt.cli import main as cli_main
from lightning_genesis_ckpt.core.names import (
    BACKUP_SUFFIX,
    LOCK_NAME,
    MANIFEST_NAME,
    RESUMABLE_ROLES,
    is_temp_name,
)
from lightning_genesis_ckpt.storage.reader import StoreReader
from lightning_genesis_ckpt.storage.resume import resolve

__all__ = [
    "BACKUP_SUFFIX",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "RESUMABLE_ROLES",
    "CheckpointStore",
    "GenesisCheckpointError",
    "StoreReader",
    "captured_logs",
    "cli_verify",
    "cli_verify_subprocess",
    "genesis_checkpoint_class",
    "genesis_load",
    "genesis_save",
    "is_temp_name",
    "load_payload",
    "open_next_run",
    "resolve",
]

LOGGER = "lightning_genesis_ckpt"


def genesis_checkpoint_class() -> type:
    """:class:`GenesisCheckpoint` (imports Lightning: only the resume sample needs it)."""
    from lightning_genesis_ckpt import GenesisCheckpoint

    return GenesisCheckpoint


def open_next_run(dirpath: str) -> CheckpointStore:
    """The store as the next run opens it before its first step; the caller releases its lock.

    The sequence of :meth:`GenesisCheckpoint.setup` on rank 0: prove the directory writable and take the
    lock, which -- as the lock holder, who alone may -- settles what a killed writer left, sweeps its files and
    finishes its deletions. The resume sample runs the real callback on a copy of the same state, so this copy
    cannot drift unnoticed.
    """
    store = CheckpointStore(dirpath, verbose=False)
    store.ensure_writable()
    store.acquire_lock()
    return store


@contextlib.contextmanager
def captured_logs() -> Iterator[list[logging.LogRecord]]:
    """The library's log records (warnings included) while the block runs, kept off the console."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(LOGGER)
    handler, old = Keep(logging.INFO), (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.handlers[:], logger.propagate, _ = old
        logger.setLevel(old[2])


def cli_verify(path: str) -> tuple[int, str]:
    """``genesis-ckpt verify PATH`` in this process: exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), captured_logs():
        code = cli_main(["verify", path])
    return code, out.getvalue() + err.getvalue()


def cli_verify_subprocess(path: str) -> tuple[int, str]:
    """``genesis-ckpt verify PATH`` as a real command (``python -m lightning_genesis_ckpt``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_genesis_ckpt", "verify", path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def load_payload(store: StoreReader, name: str, is_directory: bool) -> Any:
    """Load a listed checkpoint as its reader would: a verified local tree, or the file's object."""
    if is_directory:
        with store.local_copy(name) as path:
            return path
    return store.load(name)
