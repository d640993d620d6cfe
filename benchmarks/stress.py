"""Reliability stress runs: the numbers of docs/reliability.md's stress table, measured, never typed in.

    .venv/bin/python benchmarks/stress.py                    # 200 trials of each scenario (about 10 min)
    .venv/bin/python benchmarks/stress.py --trials 20        # a quick look

Scenarios (each trial checks what the default test suite checks, many more times and with random choices):

* kill -9 -- a real training process (32 MiB checkpoints) SIGKILLed at a random moment, or at a random hit of
  a random kill point inside the commit path; then the next run resumes (see tests/crash_harness.py);
* disk errors -- a save, a best_model.pth copy or a replacement fails with ENOSPC or EIO at a random byte of
  the data or of the manifest (tests/faultyfs.py); every earlier checkpoint must stay intact and listed,
  nothing half-written may stay, and the error must be a CheckpointSaveError;
* bad files -- the newest checkpoint (or the manifest) is truncated, bit-flipped, emptied, replaced by random
  bytes or by a zip that is not a checkpoint, or deleted; resume must skip it and load the previous one,
  never damaged data, never a raw error.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import random
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from crash_harness import KillExperiment  # noqa: E402
from faultyfs import FaultyFileSystem  # noqa: E402

from lightning_genesis_ckpt import CheckpointSaveError, CheckpointStore  # noqa: E402
from lightning_genesis_ckpt.adapter.ckpt_paths import validate_training_checkpoint  # noqa: E402
from lightning_genesis_ckpt.core.names import MANIFEST_NAME, epoch_name, is_temp_name  # noqa: E402
from lightning_genesis_ckpt.storage._faults import POINTS  # noqa: E402
from lightning_genesis_ckpt.storage.resume import resolve  # noqa: E402


@dataclass
class Row:
    scenario: str
    trials: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def fail(self, what: str, detail: str) -> None:
        self.bad[what] = self.bad.get(what, 0) + 1
        self.problems.append(f"{self.scenario}: {what}: {detail}")

    def outcome(self, *labels: str) -> str:
        return ", ".join(f"{self.bad.get(label, 0)} {label}" for label in labels)


# ----------------------------------------------------------------------------------------------- kill -9
def kill_rows(trials: int, seed: int, workdir: Path) -> list[Row]:
    # Ten epochs, so that most runs are killed before they finish: long chains of crash, resume, crash.
    exp = KillExperiment(workdir, seed=seed, epochs=10)
    try:
        start = time.monotonic()
        tally = exp.run(exp.random_plans(), trials=trials, max_runs=20 * trials)
    finally:
        exp.close()
    rows = []
    for kind in ["random moment", *POINTS]:
        row = Row(f"kill -9 at {'a random moment' if kind == 'random moment' else kind}")
        row.trials = tally.kills[kind]
        row.bad = {"damaged": tally.damaged_by[kind], "failed resumes": tally.failed_by[kind]}
        rows.append(row)
    total = Row("kill -9, all of the above", tally.trials, {"damaged": tally.damaged})
    total.bad["failed resumes"] = tally.failed_resumes
    total.seconds = time.monotonic() - start
    total.problems = tally.problems
    print(tally.summary(), flush=True)
    return [*rows, total]


# ------------------------------------------------------------------------------------------ disk errors
def blob(rng: random.Random, step: int) -> dict[str, object]:
    n = rng.randint(1, 2**18)  # up to 1 MiB
    return {"w": torch.full((n,), float(step)), "step": step}


def disk_row(trials: int, seed: int) -> Row:
    row = Row("ENOSPC / EIO partway through a save, copy or replacement")
    rng = random.Random(seed)
    start = time.monotonic()
    i = 0
    while row.trials < trials:
        i += 1
        FaultyFileSystem.reset()
        store = CheckpointStore(f"faulty://stress/{i}", verbose=False)
        k = rng.randint(1, 4)
        for epoch in range(k):
            store.save(epoch_name(epoch), blob(rng, epoch), epoch=epoch, global_step=epoch)
            if rng.random() < 0.5:
                store.copy(epoch_name(epoch), "best_model.pth")
        before = {name: store.fs.cat_file(store.path(name)) for name in store.manifest().records}
        records = dict(store.manifest().records)
        op = rng.choice(["new", "replace", "copy"])
        target = {"new": epoch_name(k), "replace": epoch_name(k - 1), "copy": "best_model.pth"}[op]
        obj = blob(rng, k)
        size = len(obj["w"].numpy().tobytes())  # type: ignore[union-attr]
        failure = rng.choice(["ENOSPC", "EIO data", "EIO manifest"])
        if failure == "ENOSPC":
            store.fs.capacity = store.fs.used() + rng.randint(0, size // 2)
        elif failure == "EIO data":
            store.fs.fail_match, store.fs.fail_after = target, rng.randint(0, size)
        else:
            store.fs.fail_match, store.fs.fail_after = MANIFEST_NAME, rng.randint(0, 2000)
        try:
            if op == "copy":
                store.copy(epoch_name(k - 1), target)
            else:
                store.save(target, obj, epoch=k, global_step=k)
            continue  # the failure came too late to hit this operation (a copy writes no data here): redraw
        except CheckpointSaveError:
            row.trials += 1
        except Exception as e:
            row.trials += 1
            row.fail("errors not reported as CheckpointSaveError", f"trial {i} {op} {failure}: {e!r}")
        store.fs.capacity = store.fs.fail_match = None
        _check_disk_trial(row, i, CheckpointStore(store.url, verbose=False), records, before, target)
    row.seconds = time.monotonic() - start
    FaultyFileSystem.reset()
    return row


def _check_disk_trial(
    row: Row,
    i: int,
    store: CheckpointStore,
    records: dict[str, object],
    before: dict[str, bytes],
    target: str,
) -> None:
    now = store.manifest().records
    for name in records:
        data = store.fs.cat_file(store.path(name)) if store.fs.exists(store.path(name)) else None
        if name not in now:
            row.fail("committed checkpoints lost", f"trial {i}: {name} no longer listed")
            continue
        try:
            store.verify(name)
            store.load(name)
        except Exception as e:
            row.fail("committed checkpoints lost", f"trial {i}: {name}: {e!r}")
            continue
        # A replaced file may hold the complete new content (the failure hit after it landed): then the
        # record must describe the new content, which verify() just checked.
        if data != before[name] and name != target:
            row.fail("committed checkpoints lost", f"trial {i}: {name} changed")
    listed = {*now, MANIFEST_NAME}
    left = sorted(n for n in store.list_names() if n not in listed or is_temp_name(n))
    if left:
        row.fail("files left behind", f"trial {i}: {left}")


# -------------------------------------------------------------------------------------------- bad files
def fake_training_checkpoint(step: int) -> dict[str, object]:
    return {
        "state_dict": {"w": torch.full((1000,), float(step))},
        "loops": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        "global_step": step,
    }


def not_a_checkpoint_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "a perfectly good zip file")
    return buf.getvalue()


DAMAGE = ["truncate", "flip", "empty", "random bytes", "foreign zip", "delete", "manifest garbage"]


def rot_row(trials: int, seed: int, workdir: Path) -> Row:
    row = Row("damaged newest checkpoint or manifest, then resume")
    rng = random.Random(seed)
    start = time.monotonic()
    for i in range(trials):
        url = str(workdir / f"rot{i}") if i % 2 else f"memory://stress-rot/{uuid.uuid4().hex}"
        store = CheckpointStore(url, verbose=False)
        n = rng.randint(2, 4)
        for step in range(1, n + 1):
            store.save(epoch_name(step), fake_training_checkpoint(step), global_step=step, epoch=step)
        newest = epoch_name(n)
        data = store.fs.cat_file(store.path(newest))
        damage = rng.choice(DAMAGE)
        bad: bytes | None
        if damage == "truncate":
            bad = data[: rng.randrange(len(data))]
        elif damage == "flip":
            pos = rng.randrange(len(data))
            bad = data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
        elif damage == "empty":
            bad = b""
        elif damage == "random bytes":
            bad = os.urandom(rng.randint(1, len(data)))
        elif damage == "foreign zip":
            bad = not_a_checkpoint_zip()
        else:
            bad = None
        if damage == "delete":
            store.fs.rm_file(store.path(newest))
        elif damage == "manifest garbage":
            manifest = store.fs.cat_file(store.manifest_path)
            store.fs.pipe_file(store.manifest_path, manifest[: rng.randrange(len(manifest))] + b"\x00}")
        else:
            store.fs.pipe_file(store.path(newest), bad)
        row.trials += 1
        expected = n if damage == "manifest garbage" else n - 1
        try:
            found = resolve(CheckpointStore(url, verbose=False), validate=validate_training_checkpoint)
        except Exception as e:
            row.fail("raw errors", f"trial {i} {damage}: {e!r}")
            continue
        got = found.checkpoint
        if found.record is None or found.record.global_step != expected:
            row.fail("wrong checkpoint chosen", f"trial {i} {damage}: {found.record}")
        elif not torch.equal(got["state_dict"]["w"], torch.full((1000,), float(expected))):
            row.fail("damaged data loaded", f"trial {i} {damage}")
        if damage != "manifest garbage" and newest not in dict(found.skipped):
            row.fail("wrong checkpoint chosen", f"trial {i} {damage}: {newest} was not reported as skipped")
    row.seconds = time.monotonic() - start
    return row


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200, help="trials per scenario (kill -9: kills in all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["kill", "disk", "rot"], action="append", help="run only these")
    args = p.parse_args()
    logging.getLogger("lightning_genesis_ckpt").setLevel(logging.ERROR)  # the expected warnings, by thousands
    only = set(args.only or ["kill", "disk", "rot"])
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="genesis-stress-") as tmp:
        if "disk" in only:
            rows.append(disk_row(args.trials, args.seed))
            print(f"disk errors: {rows[-1].trials} trials in {rows[-1].seconds:.0f} s", flush=True)
        if "rot" in only:
            rows.append(rot_row(args.trials, args.seed, Path(tmp)))
            print(f"bad files: {rows[-1].trials} trials in {rows[-1].seconds:.0f} s", flush=True)
        if "kill" in only:
            rows[:0] = kill_rows(args.trials, args.seed, Path(tmp))
    labels = {
        "kill": ("damaged", "failed resumes"),
        "ENOSPC": (
            "committed checkpoints lost",
            "files left behind",
            "errors not reported as CheckpointSaveError",
        ),
        "damaged": ("damaged data loaded", "wrong checkpoint chosen", "raw errors"),
    }
    print("\n| scenario | trials | outcome |\n|---|---|---|")
    for row in rows:
        key = next(k for k in labels if row.scenario.startswith(k))
        print(f"| {row.scenario} | {row.trials} | {row.outcome(*labels[key])} |")
    cmd = " ".join(["benchmarks/stress.py", *sys.argv[1:]])
    print(
        f"\n{cmd}: {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}"
    )
    problems = [p for row in rows for p in row.problems]
    if problems:
        print(f"\n{len(problems)} problems:", *problems[:50], sep="\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
