"""What one epoch's checkpointing costs in storage operations: manifest and lock writes, fsyncs, S3 requests.

    .venv/bin/python benchmarks/request_counts.py            # prints a table and one JSON line

A real Trainer fits a tiny model for four epochs with ``GenesisCheckpoint(monitor=..., keep_last=1)``, twice:
its metric improves every epoch ("improved": a new rolling checkpoint, the ``best_model.pth`` copy, and the
deletion of the previous rolling checkpoint), or only in the first ("plain": no best copy). The counts are taken between
the starts of two consecutive epochs (the third epoch's end: steady state, nothing left from the first run),
on a local disk and on the moto S3 server on loopback (every request the server receives is recorded).

Locally the process's own ``os.fsync``, ``os.replace`` / ``os.rename`` / ``os.link`` and ``os.pwrite`` calls
are counted by wrapping them for the duration of the fit: a measurement, not a test. It only uses the public
callback API, so the same script measures any version of the library.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import fsspec  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from models import TinyModel, loaders, make_trainer  # noqa: E402
from s3server import S3Server  # noqa: E402

from lightning_genesis_ckpt import GenesisCheckpoint  # noqa: E402

MANIFEST = "genesis_manifest.json"
LOCK = "genesis.lock"
EPOCHS = 4
MEASURED = 2  # the end of this epoch is measured


class Improving(TinyModel):
    def on_train_epoch_end(self) -> None:
        self.log("score", 10.0 - self.current_epoch)


class Plateau(TinyModel):
    def on_train_epoch_end(self) -> None:
        self.log("score", 10.0 if self.current_epoch == 0 else 0.0)


MODELS = {"improved": Improving, "plain": Plateau}


class LocalCounter:
    """Counts fsyncs and the renames/links/writes that land on the manifest and the lock."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock_fds: set[int] = set()
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        for name in ("fsync", "replace", "rename", "link", "pwrite", "open", "write"):
            self._saved[name] = getattr(os, name)
        saved = self._saved

        def fsync(fd: int) -> None:
            self.counts["fsync"] += 1
            saved["fsync"](fd)

        def moved(kind: str) -> Any:
            def call(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                target = os.path.basename(os.fspath(dst))
                if target == MANIFEST:
                    self.counts["manifest writes"] += 1
                elif target == LOCK:
                    self.counts["lock writes"] += 1
                return saved[kind](src, dst, *args, **kwargs)

            return call

        def opened(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            fd = int(saved["open"](path, flags, *args, **kwargs))
            if os.path.basename(os.fspath(path)) == LOCK and flags & (os.O_WRONLY | os.O_RDWR):
                self._lock_fds.add(fd)
            return fd

        def pwrite(fd: int, data: Any, offset: int) -> int:
            if fd in self._lock_fds:
                self.counts["lock writes"] += 1
            return int(saved["pwrite"](fd, data, offset))

        def write(fd: int, data: Any) -> int:
            if fd in self._lock_fds:
                self.counts["lock writes"] += 1
            return int(saved["write"](fd, data))

        os.fsync = fsync
        os.replace = moved("replace")
        os.rename = moved("rename")
        os.link = moved("link")
        os.open = opened
        os.pwrite = pwrite
        os.write = write

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(os, name, fn)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class S3Counter:
    def __init__(self, server: S3Server, root: str) -> None:
        self.server, self.root = server, root

    def snapshot(self) -> list[Any]:
        return self.server.requests_since(0)


class Meter(pl.Callback):
    """Takes a snapshot of the counter at every epoch start and at the end of fit."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.marks: list[Any] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.marks.append(self.counter.snapshot())

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.marks.append(self.counter.snapshot())


def fit(dirpath: str, counter: Any, model: str, storage_options: dict[str, Any] | None = None) -> Meter:
    pl.seed_everything(0, verbose=False)
    meter = Meter(counter)
    ckpt = GenesisCheckpoint(
        dirpath, monitor="score", keep_last=1, storage_options=storage_options, verbose=False
    )
    train, val = loaders()
    make_trainer([ckpt, meter], EPOCHS).fit(MODELS[model](), train, val)
    return meter


def local(model: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="genesis-requests-") as tmp:
        counter = LocalCounter()
        counter.install()
        try:
            meter = fit(os.path.join(tmp, "ck"), counter, model)
        finally:
            counter.uninstall()
    before, after = meter.marks[MEASURED], meter.marks[MEASURED + 1]
    keys = ("manifest writes", "lock writes", "fsync")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def s3(model: str) -> dict[str, int]:
    server = S3Server().start()
    try:
        options = server.storage_options()
        bucket = f"genesis-requests-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3", skip_instance_cache=True, **options).mkdir(bucket)
        root = f"{bucket}/{uuid.uuid4().hex}"
        meter = fit(f"s3://{root}", S3Counter(server, root), model, options)
    finally:
        server.stop()
    before, after = meter.marks[MEASURED], meter.marks[MEASURED + 1]
    sent = after[len(before) :]
    out: collections.Counter[str] = collections.Counter()
    for r in sent:
        name = r.path.rsplit("/", 1)[-1]
        what = "manifest" if name == MANIFEST else "lock" if name == LOCK else "other"
        method = "LIST" if r.is_listing else "COPY" if r.copy_source else r.method
        out[f"{method} {what}"] += 1
        out[method] += 1
        out["total"] += 1
    return dict(out)


def main() -> None:
    results = {
        f"{model} {backend}": run(model)
        for model in MODELS
        for backend, run in (("local", local), ("s3", s3))
    }
    print(
        f"one epoch end (epoch {MEASURED}); improved: rolling checkpoint, best_model.pth copy, one deletion;"
    )
    print("plain: rolling checkpoint, one deletion")
    for case, counts in results.items():
        print(f"  {case}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
