"""The oracle's self-test: workloads that save through a deliberately broken commit.

An explorer that can never fail proves nothing. Each workload here makes three saves and a deletion through a
store whose commit is broken on purpose -- in the traced process only: no library code is edited, the trace
of the broken run is what the explorer judges, and it must report violations for every one of them.

* ``broken-rename-before-fsync`` -- ``os.fsync`` skips regular files: data is renamed into place (and the
  manifest committed) before the bytes are durable.
* ``broken-no-dir-fsync`` -- ``os.fsync`` skips directories: a rename, the manifest's included, is not durable
  when the save returns.
* ``broken-manifest-first`` -- a store subclass writes the record to the manifest first, then the data.
* ``broken-overwrite-in-place`` -- every save overwrites one committed file in place with a plain
  ``torch.save`` (no temp file), then ``register()`` commits the new bytes: the classic way to lose the only
  checkpoint.

``ManifestFirstStore`` is the one place in the explorer that uses the library's internals (the store's
``commit_strategy``, ``serialization.dump``): a refactor that renames them breaks only this self-test.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .workloads import Mark, Workload, _prepare, _ready, state


@contextlib.contextmanager
def fsync_skipping(directories: bool) -> Iterator[None]:
    """``os.fsync`` that does nothing for directories (``directories``) or for regular files (otherwise)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) != directories:
            real(fd)

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real


def _saves(store: Any, mark: Mark, save: Any = None) -> None:
    for epoch in range(3):
        name, step = f"checkpoint_epoch_{epoch}.pth", 10 * (epoch + 1)
        (save or store.save)(name, state(step), role="epoch", epoch=epoch, global_step=step)
        mark("returned", call=f"save epoch {epoch}")
    store.delete(["checkpoint_epoch_0.pth"])
    mark("returned", call="delete epoch 0")


def _store(root: Path, mark: Mark, cls: Any = None) -> Any:
    from lightning_genesis_ckpt import CheckpointStore

    store = (cls or CheckpointStore)(str(_prepare(root, mark)), verbose=False)
    _ready(mark)
    return store


def run_rename_before_fsync(root: Path, mark: Mark) -> None:
    store = _store(root, mark)
    with fsync_skipping(directories=False):
        _saves(store, mark)


def run_no_dir_fsync(root: Path, mark: Mark) -> None:
    store = _store(root, mark)
    with fsync_skipping(directories=True):
        _saves(store, mark)


def run_manifest_first(root: Path, mark: Mark) -> None:
    from lightning_genesis_ckpt import CheckpointRecord, CheckpointStore
    from lightning_genesis_ckpt.core.names import MANIFEST_NAME
    from lightning_genesis_ckpt.storage import serialization

    class ManifestFirstStore(CheckpointStore):
        def save(self, name: str, obj: Any, **fields: Any) -> Any:  # type: ignore[override]
            buffer = io.BytesIO()
            size, checksum = serialization.dump(obj, buffer, "torch")
            manifest = self.manifest()
            record = CheckpointRecord(
                name=name,
                role=fields["role"],
                size=size,
                checksum=checksum,
                created=time.time(),
                seq=manifest.next_seq,
                epoch=fields["epoch"],
                global_step=fields["global_step"],
            )
            # The commit point, before the data exists.
            self.commit_strategy.write_small(self.path(MANIFEST_NAME), manifest.with_record(record).encode())
            with self.commit_strategy.open_write(self.path(name)) as f:
                f.write(buffer.getvalue())
            return record

    _saves(_store(root, mark, ManifestFirstStore), mark)


def run_overwrite_in_place(root: Path, mark: Mark) -> None:
    import torch

    store = _store(root, mark)

    def save(name: str, obj: Any, **fields: Any) -> Any:
        torch.save(obj, store.path("last.pth"))  # over the committed file, no temp file
        return store.register("last.pth", **fields)

    _saves(store, mark, save)


BROKEN: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("broken-rename-before-fsync", "store", run_rename_before_fsync),
        Workload("broken-no-dir-fsync", "store", run_no_dir_fsync),
        Workload("broken-manifest-first", "store", run_manifest_first),
        Workload("broken-overwrite-in-place", "store", run_overwrite_in_place),
    )
}
