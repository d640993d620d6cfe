"""The workloads the explorer records: real saves through the public API, each in a directory of its own.

``python tests/crash_states/driver.py --marks FILE NAME=DIR ...`` runs each named workload in its (empty)
directory, in one process, and is what strace records. A workload prepares its directory (a user's file,
earlier checkpoints), calls ``sync()`` -- a barrier in every persistence model, so the prepared state is the
durable starting point -- and writes a ``setup-done`` marker; then it makes its calls, writing a ``returned``
marker after each one returns. Markers are JSON lines written to FILE, outside every traced directory: strace
records them like any other write, so the explorer learns from the trace alone, and from the outside, where
each call returned. Nothing here is part of the library.

Workloads (all on local disk; the ``trainer`` ones drive :class:`GenesisCheckpoint` with a real tiny Trainer
and mark each epoch end from a callback of their own):

* ``first_save`` -- a Trainer whose ``dirpath`` (two levels) does not exist yet; three epochs.
* ``rolling`` -- ten epochs with ``keep_last=2``: saves and rolling deletions.
* ``best`` -- ``monitor="val_loss"`` with a scripted loss and ``every_n_epochs=2``, six epochs:
  ``best_model.pth`` is saved on its own, then replaced in turn by a hard-link copy of an epoch file and by
  a save of its own.
* ``async`` -- ``async_save=True``, seven epochs: the saves commit from a background thread.
* ``interrupt`` -- a fit that raises (interrupt snapshot), a resumed fit that raises again (the snapshot is
  replaced), a resumed fit that retires it and raises later (a new one), a resumed fit that finishes.
* ``directory`` -- ``CheckpointStore.save_directory`` twice, a replacement of the second (an exchange of two
  directories), a copy to ``best_model.pth`` (hard links), a deletion, a third save and a copy that
  replaces the first one.
* ``genesis`` -- ``genesis.save`` of a file over an earlier version, three times (the ``.genesis.bak``
  protocol).
* ``lock`` -- ``acquire_lock`` with a short lease (the heartbeat thread rewrites the lock), a save, a release,
  and a second store's acquire and release.
* ``rebuild`` -- three checkpoints whose manifest is gone: a store rebuilds it, saves (writing the rebuilt
  manifest) and deletes one.
* ``versions`` -- ``import_checkpoint`` of a file the user just wrote with ``torch.save`` (registered in
  place), ``save_version``, ``tag_version`` of an epoch checkpoint, and ``save_version`` over a committed one.

The ``broken-*`` workloads are the oracle's self-test (:mod:`.broken`): saves through a deliberately broken
commit. They are never run together with the others, because their patches are process-wide.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Mark = Callable[..., None]


@dataclass(frozen=True)
class Workload:
    """What the explorer needs to know about a workload to judge its crash states.

    ``dirpath`` is the checkpoint directory relative to the workload's root (``genesis``: the directory of
    ``file``). ``foreign`` are the user's files, relative to the root, that must survive every start.
    ``trainer`` holds the GenesisCheckpoint settings of a Trainer workload (the resume sample reuses them).
    ``user_files`` are files the user writes during the run, in the checkpoint directory.
    """

    name: str
    kind: str  # "trainer", "store" or "genesis"
    run: Callable[[Path, Mark], None]
    dirpath: str = "ckpt"
    foreign: tuple[str, ...] = ("ckpt/notes.txt",)
    trainer: dict[str, Any] = field(default_factory=dict)
    file: str = ""
    user_files: tuple[str, ...] = ()  # written by the user during the run: theirs, whatever becomes of them


def _prepare(root: Path, mark: Mark, *, dirpath: str | None = "ckpt") -> Path:
    """The checkpoint directory with a user's file in it (or in the root, for a directory not made yet)."""
    if dirpath is not None:
        (root / dirpath).mkdir(parents=True)
        (root / dirpath / "notes.txt").write_text("the user's own notes: never touched\n")
    else:
        (root / "notes.txt").write_text("the user's own notes: never touched\n")
    return root / (dirpath or "")


def _ready(mark: Mark) -> None:
    os.sync()
    mark("setup-done")


# ------------------------------------------------------------------------------------------ trainer
def _fit(dirpath: Path, mark: Mark, epochs: int, raise_at: tuple[int, int] | None = None, **kw: Any) -> None:
    """One real fit with GenesisCheckpoint; marks every epoch end it completes and its own return.

    With ``async_save`` an epoch's save commits in the background; the next epoch's end waits for it before
    saving again, so an epoch's commit is known to have returned only when the epoch after next starts.
    """
    import pytorch_lightning as pl
    import torch
    from models import RaiseAt, make_trainer

    from lightning_genesis_ckpt import GenesisCheckpoint

    from .trainer import ScriptedModel, crash_loaders

    lag = 2 if kw.get("async_save") else 1

    class EpochMarks(pl.Callback):
        # Lightning runs checkpoint callbacks last: an epoch's end (save, copy, retention) is complete when
        # the next epoch starts. The first start of a fit marks the end of its setup (lock, sweep, resume).
        first: int | None = None

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            epoch = trainer.current_epoch
            if self.first is None:
                self.first = epoch
                mark("returned", call="fit setup and resume")
            elif epoch - lag >= self.first:
                mark("returned", call=f"epoch {epoch - lag} end")

    torch.manual_seed(0)
    callbacks: list[Any] = [GenesisCheckpoint(str(dirpath), verbose=False, **kw), EpochMarks()]
    if raise_at is not None:
        callbacks.append(RaiseAt(*raise_at))
    trainer = make_trainer(callbacks, epochs, default_root_dir=str(dirpath.parent.parent / "lightning"))
    train, val = crash_loaders()
    try:
        trainer.fit(ScriptedModel(), train, val)
    except RuntimeError as e:
        if raise_at is None or "injected failure" not in str(e):
            raise
    mark("returned", call="fit")


def run_first_save(root: Path, mark: Mark) -> None:
    _prepare(root, mark, dirpath=None)
    _ready(mark)
    _fit(root / FIRST_SAVE_DIR, mark, 3, **TRAINER_SETTINGS["first_save"])


def run_rolling(root: Path, mark: Mark) -> None:
    dirpath = _prepare(root, mark)
    _ready(mark)
    _fit(dirpath, mark, 10, **TRAINER_SETTINGS["rolling"])


def run_best(root: Path, mark: Mark) -> None:
    dirpath = _prepare(root, mark)
    _ready(mark)
    _fit(dirpath, mark, 6, **TRAINER_SETTINGS["best"])


def run_async(root: Path, mark: Mark) -> None:
    dirpath = _prepare(root, mark)
    _ready(mark)
    _fit(dirpath, mark, 7, **TRAINER_SETTINGS["async"])


def run_interrupt(root: Path, mark: Mark) -> None:
    dirpath = _prepare(root, mark)
    _ready(mark)
    settings = TRAINER_SETTINGS["interrupt"]
    _fit(dirpath, mark, 4, raise_at=(1, 1), **settings)  # snapshot
    _fit(dirpath, mark, 4, raise_at=(1, 4), **settings)  # resumed from it; the snapshot is replaced
    _fit(
        dirpath, mark, 4, raise_at=(2, 3), **settings
    )  # resumed; epoch 1 ends, the snapshot is retired; another
    _fit(dirpath, mark, 4, **settings)  # resumed; epochs 2 and 3 end, the snapshot is retired again


FIRST_SAVE_DIR = "runs/exp1"
TRAINER_SETTINGS: dict[str, dict[str, Any]] = {
    "first_save": {"keep_last": 5},
    "rolling": {"keep_last": 2},
    "best": {"monitor": "val_loss", "keep_last": 1, "every_n_epochs": 2},
    "interrupt": {"keep_last": 2},
    "async": {"keep_last": 2, "async_save": True},
}


# -------------------------------------------------------------------------------------------- store
def shards(seed: int) -> Callable[[str], None]:
    """A directory checkpoint's writer: a few files of seeded bytes, one of them over 4 KiB, in a subdirectory."""

    def write(path: str) -> None:
        rng = random.Random(seed)
        os.makedirs(os.path.join(path, "model"))
        for rel, size in (("model/shard_0.bin", 6000), ("model/shard_1.bin", 1500), (".metadata", 300)):
            with open(os.path.join(path, *rel.split("/")), "wb") as f:
                f.write(rng.randbytes(size))

    return write


def state(step: int) -> dict[str, Any]:
    """A small training-like state whose bytes identify ``step``."""
    import torch

    return {"global_step": step, "weights": torch.full((1200,), float(step)), "optimizer": {"lr": 0.1}}


def run_directory(root: Path, mark: Mark) -> None:
    from lightning_genesis_ckpt import CheckpointStore

    store = CheckpointStore(str(_prepare(root, mark)), verbose=False)
    _ready(mark)
    for epoch, step, seed in ((0, 10, 0), (1, 20, 1), (1, 25, 2)):  # the last one replaces epoch 1
        store.save_directory(
            f"checkpoint_epoch_{epoch}.pth", shards(seed), role="epoch", epoch=epoch, global_step=step
        )
        mark("returned", call=f"save_directory epoch {epoch} step {step}")
    store.copy("checkpoint_epoch_1.pth", "best_model.pth", role="best")
    mark("returned", call="copy epoch 1 to best_model.pth")
    store.delete(["checkpoint_epoch_0.pth"])
    mark("returned", call="delete epoch 0")
    store.save_directory("checkpoint_epoch_2.pth", shards(3), role="epoch", epoch=2, global_step=30)
    mark("returned", call="save_directory epoch 2 step 30")
    store.copy("checkpoint_epoch_2.pth", "best_model.pth", role="best")  # replaces the copy: an exchange
    mark("returned", call="copy epoch 2 to best_model.pth")


def run_lock(root: Path, mark: Mark) -> None:
    from lightning_genesis_ckpt import CheckpointStore

    dirpath = _prepare(root, mark)
    store = CheckpointStore(str(dirpath), verbose=False)
    _ready(mark)
    store.acquire_lock(lease_s=0.4)  # the heartbeat thread rewrites the lock every 0.1 s
    mark("returned", call="acquire_lock")
    time.sleep(0.35)
    store.save("checkpoint_epoch_0.pth", state(5), role="epoch", epoch=0, global_step=5)
    mark("returned", call="save epoch 0")
    store.release_lock()
    mark("returned", call="release_lock")
    other = CheckpointStore(str(dirpath), verbose=False)
    other.acquire_lock()
    mark("returned", call="second store: acquire_lock")
    other.release_lock()
    mark("returned", call="second store: release_lock")


def run_rebuild(root: Path, mark: Mark) -> None:
    import torch

    from lightning_genesis_ckpt import CheckpointStore

    dirpath = _prepare(root, mark)
    first = CheckpointStore(str(dirpath), verbose=False)
    for epoch in range(3):
        first.save(
            f"checkpoint_epoch_{epoch}.pth",
            state(10 * (epoch + 1)),
            epoch=epoch,
            global_step=10 * (epoch + 1),
        )
    os.remove(dirpath / "genesis_manifest.json")  # lost, as if deleted by hand
    torch.save(torch.ones(3), dirpath / "user_weights.pt")  # a file of the user's, without our metadata
    _ready(mark)
    store = CheckpointStore(str(dirpath), verbose=False)
    store.acquire_lock()
    store.records()  # rebuilt from the files, in memory
    mark("returned", call="rebuild")
    store.save("checkpoint_epoch_3.pth", state(40), epoch=3, global_step=40)
    mark("returned", call="save epoch 3 (writes the rebuilt manifest)")
    store.delete(["checkpoint_epoch_0.pth"])
    mark("returned", call="delete epoch 0")
    store.release_lock()
    mark("returned", call="release_lock")


def run_versions(root: Path, mark: Mark) -> None:
    import torch

    import lightning_genesis_ckpt as genesis
    from lightning_genesis_ckpt import CheckpointStore

    dirpath = _prepare(root, mark)
    _ready(mark)
    torch.save({"weights": torch.full((2000,), 7.0)}, dirpath / "pretrained.pt")  # the user's, not fsync'd
    mark("returned", call="the user's torch.save")
    genesis.import_checkpoint(dirpath / "pretrained.pt", str(dirpath))  # registered where it is
    mark("returned", call="import_checkpoint in place")
    genesis.save_version(str(dirpath), state(10), "v1")
    mark("returned", call="save_version v1")
    CheckpointStore(str(dirpath), verbose=False).save(
        "checkpoint_epoch_0.pth", state(20), epoch=0, global_step=20
    )
    mark("returned", call="save epoch 0")
    genesis.tag_version(str(dirpath), "v2", "checkpoint_epoch_0.pth")  # a hard-link copy
    mark("returned", call="tag_version v2")
    genesis.save_version(str(dirpath), state(30), "v1", overwrite=True)  # replaces a committed version
    mark("returned", call="save_version v1 again")


# ------------------------------------------------------------------------------------------ genesis
GENESIS_FILE = "model.pth"


def version_payload(version: int) -> dict[str, Any]:
    import torch

    return {"version": version, "weights": torch.full((1500,), float(version))}


def run_genesis(root: Path, mark: Mark) -> None:
    import lightning_genesis_ckpt as genesis

    _prepare(root, mark, dirpath=None)
    genesis.save(version_payload(1), root / GENESIS_FILE)
    _ready(mark)
    for version in (2, 3, 4):
        genesis.save(version_payload(version), root / GENESIS_FILE)
        mark("returned", call=f"genesis.save version {version}")


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "first_save",
            "trainer",
            run_first_save,
            FIRST_SAVE_DIR,
            ("notes.txt",),
            TRAINER_SETTINGS["first_save"],
        ),
        Workload("rolling", "trainer", run_rolling, trainer=TRAINER_SETTINGS["rolling"]),
        Workload("best", "trainer", run_best, trainer=TRAINER_SETTINGS["best"]),
        Workload("interrupt", "trainer", run_interrupt, trainer=TRAINER_SETTINGS["interrupt"]),
        Workload("async", "trainer", run_async, trainer=TRAINER_SETTINGS["async"]),
        Workload("directory", "store", run_directory),
        Workload("genesis", "genesis", run_genesis, ".", ("notes.txt",), file=GENESIS_FILE),
        Workload("lock", "store", run_lock),
        Workload("rebuild", "store", run_rebuild, foreign=("ckpt/notes.txt", "ckpt/user_weights.pt")),
        Workload("versions", "store", run_versions, user_files=("ckpt/pretrained.pt",)),
    )
}


def all_workloads() -> dict[str, Workload]:
    """The workloads above and the self-test's broken ones."""
    from .broken import BROKEN

    return {**WORKLOADS, **BROKEN}


def main(argv: list[str]) -> None:
    """``--marks FILE NAME=DIR ...``: run each workload in its directory, markers to FILE."""
    if argv[:1] != ["--marks"] or len(argv) < 3:
        raise SystemExit("usage: driver.py --marks FILE NAME=DIR ...")
    marks_path, pairs = argv[1], argv[2:]
    fd = os.open(marks_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    workloads = all_workloads()
    for pair in pairs:
        name, _, root = pair.partition("=")

        def mark(event: str, _w: str = name, **info: Any) -> None:
            os.write(fd, (json.dumps({"w": _w, "event": event, **info}) + "\n").encode())

        workloads[name].run(Path(root), mark)
        mark("end")
    os.close(fd)
