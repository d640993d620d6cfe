"""Object-store transfers on the loopback S3 server: ours against s3fs and boto3 with their default concurrency.

    .venv/bin/python benchmarks/transfers.py            # 256 MiB, medians of 5 (a few minutes)
    .venv/bin/python benchmarks/transfers.py --quick    # 64 MiB, medians of 3

It starts moto's S3 server (``tests/s3server.py``) in a process of its own on ``127.0.0.1``, and stops it by
its PID at the end. Every measurement runs in a fresh process, the methods are interleaved run by run, and
the table reports medians. Connections are warmed up (one small request) outside the timed region. Methods:

* up ``ours``: ``CheckpointStore.save`` of a state of that size: torch serialization, crc32 and the upload
  (parts in flight: s3fs's ``max_concurrency``, 10), then the manifest write that commits it.
* up ``ours-raw``: the uploader alone: the same bytes as s3fs and boto3 send, already in memory, written in
  32 MiB pieces into the object-store write of a save (no serialization, no checksum, no manifest).
* up ``ours-c1``: ``ours`` with ``max_concurrency=1`` (one part at a time, as s3fs's buffered files send them).
* up ``s3fs``: ``S3FileSystem.put_file`` of the same bytes from a local file (50 MiB parts, 10 in flight).
* up ``boto3``: ``upload_file`` of that local file (boto3's TransferConfig: 8 MiB parts, 10 threads).
* down ``ours``: the verified download of a load: ranged GETs in flight, crc32 checked, into a local file.
* down ``ours-load``: ``StoreReader.load``: the same download into its spool, then ``torch.load``.
* down ``ours-c1``: the verified download with one range at a time.
* down ``s3fs`` / ``boto3``: ``get_file`` / ``download_file`` into a local file.

Extra peak RSS is the process's peak resident memory during the transfer (``VmHWM``, reset right before it)
minus its resident memory right before it (the state to save is already in memory then). Server CPU is the
moto process's user + system CPU time over the worker's whole run (its warm-up requests are tiny): on loopback
it is close to the transfer's wall time, i.e. the Python server, not the client, bounds every method's
throughput here, and the methods differ mostly in how much server work their requests cause. Nothing here is a
pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
BUCKET = "genesis-bench"
UP = ("ours", "ours-raw", "ours-c1", "s3fs", "boto3")
DOWN = ("ours", "ours-load", "ours-c1", "s3fs", "boto3")
#: What the moto server process runs: the tests' server, printing its endpoint, serving until killed.
_SERVER = (
    "import sys, threading; sys.path.insert(0, sys.argv[1]); from s3server import S3Server; "
    "s = S3Server().start(); print(s.endpoint_url, flush=True); threading.Event().wait()"
)


# ------------------------------------------------------------------------------------------ one run
def _rss() -> int:
    """Resident memory now; also resets the peak that :func:`_peak` reads (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _peak() -> int:
    """Peak resident memory since the last :func:`_rss`."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _credentials() -> dict[str, str]:
    """The test server's credentials: from the driver's environment in a worker (importing the server
    module there would import moto, and its memory would blur the measurement)."""
    if "_GENESIS_BENCH_S3" not in os.environ:
        sys.path.insert(0, str(ROOT / "tests"))
        from s3server import ACCESS_KEY, REGION, SECRET_KEY

        os.environ["_GENESIS_BENCH_S3"] = json.dumps([ACCESS_KEY, SECRET_KEY, REGION])
    key, secret, region = json.loads(os.environ["_GENESIS_BENCH_S3"])
    return {"key": key, "secret": secret, "region": region}


def _options(endpoint: str, **extra: Any) -> dict[str, Any]:
    c = _credentials()
    return {
        "endpoint_url": endpoint,
        "key": c["key"],
        "secret": c["secret"],
        "client_kwargs": {"region_name": c["region"]},
        **extra,
    }


def _boto3(endpoint: str) -> Any:
    import boto3

    o = _options(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=o["key"],
        aws_secret_access_key=o["secret"],
        region_name=o["client_kwargs"]["region_name"],
    )


def make_state(nbytes: int, tensors: int = 8) -> dict[str, Any]:
    import torch

    per = nbytes // 4 // tensors
    return {f"layer{i}.weight": torch.full((per,), float(i)) for i in range(tensors)}


def worker(direction: str, mode: str, endpoint: str, key: str, local: str, size: int) -> dict[str, Any]:
    """One timed transfer in this (fresh) process; returns seconds, bytes and extra peak RSS."""
    import fsspec

    url = f"s3://{BUCKET}/{key}"
    extra = {"max_concurrency": 1} if mode == "ours-c1" else {}
    options = _options(endpoint, **extra)
    if direction == "up" and mode.startswith("ours"):
        from lightning_genesis_ckpt import CheckpointStore

        store = CheckpointStore(url, options, verbose=False)
        store.save("warmup.pth", {"x": 1})  # the lock, the manifest and the connection: not timed
        state = make_state(size)
        start_rss, start = _rss(), time.perf_counter()
        rec = store.save("state.pth", state)
        elapsed, nbytes = time.perf_counter() - start, rec.size
        store.release_lock()
    elif direction == "up" and mode == "ours-raw":
        from lightning_genesis_ckpt.storage.atomicity import DeferredCommit

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.pipe_file(f"{BUCKET}/{key}/warmup", b"x")
        with open(local, "rb") as f:
            data = memoryview(f.read())  # the bytes in memory, as a state is: not timed
        start_rss, start = _rss(), time.perf_counter()
        with DeferredCommit(fs).open_write(f"{BUCKET}/{key}/state.pth") as out:
            for i in range(0, len(data), 32 * MiB):  # in pieces the size of a large tensor's
                out.write(data[i : i + 32 * MiB])
        elapsed, nbytes = time.perf_counter() - start, len(data)
    elif direction == "up" and mode == "s3fs":
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.pipe_file(f"{BUCKET}/{key}/warmup", b"x")
        start_rss, start = _rss(), time.perf_counter()
        fs.put_file(local, f"{BUCKET}/{key}/state.pth")
        elapsed, nbytes = time.perf_counter() - start, os.path.getsize(local)
    elif direction == "up":
        client = _boto3(endpoint)
        client.put_object(Bucket=BUCKET, Key=f"{key}/warmup", Body=b"x")
        start_rss, start = _rss(), time.perf_counter()
        client.upload_file(local, BUCKET, f"{key}/state.pth")
        elapsed, nbytes = time.perf_counter() - start, os.path.getsize(local)
    elif mode == "ours-load":
        from lightning_genesis_ckpt.storage import StoreReader

        reader = StoreReader(url, options, verbose=False)
        reader.manifest()  # the connection and the manifest: not timed
        start_rss, start = _rss(), time.perf_counter()
        obj = reader.load("state.pth")
        elapsed = time.perf_counter() - start
        nbytes = reader.manifest().records["state.pth"].size
        del obj
    elif mode.startswith("ours"):
        from lightning_genesis_ckpt.storage import StoreReader, loading, serialization

        reader = StoreReader(url, options, verbose=False)
        record = reader.manifest().records["state.pth"]

        def refuse(found: int, checksum: str | None) -> None:
            serialization.check(url, found, checksum, record.size, record.checksum)

        start_rss, start = _rss(), time.perf_counter()
        with open(local, "wb") as sink:
            loading.fetch(reader.loc, record, sink, refuse)
        elapsed, nbytes = time.perf_counter() - start, record.size
    elif mode == "s3fs":
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.info(f"{BUCKET}/{key}/state.pth")
        start_rss, start = _rss(), time.perf_counter()
        fs.get_file(f"{BUCKET}/{key}/state.pth", local)
        elapsed, nbytes = time.perf_counter() - start, os.path.getsize(local)
    else:
        client = _boto3(endpoint)
        client.head_object(Bucket=BUCKET, Key=f"{key}/state.pth")
        start_rss, start = _rss(), time.perf_counter()
        client.download_file(BUCKET, f"{key}/state.pth", local)
        elapsed, nbytes = time.perf_counter() - start, os.path.getsize(local)
    return {"seconds": elapsed, "bytes": nbytes, "extra_rss": max(0, _peak() - start_rss)}


# ------------------------------------------------------------------------------------------ driver
def _run_worker(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"transfers.py --worker {args} failed:\n{out.stdout}\n{out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux: ``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_measured(server: subprocess.Popen[str], *args: str) -> dict[str, Any]:
    """:func:`_run_worker`, with the server's CPU seconds over that run added as ``server_cpu``."""
    before = _cpu_seconds(server.pid)
    result = _run_worker(*args)
    result["server_cpu"] = _cpu_seconds(server.pid) - before
    return result


def _start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(ROOT / "tests")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("http://127.0.0.1:"):
        _stop_server(proc)
        raise RuntimeError(f"the moto server did not start (it printed {endpoint!r})")
    return proc, endpoint


def _stop_server(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _remove(endpoint: str, prefix: str) -> None:
    """Delete everything under ``prefix``: the server holds every object in memory or its temp files."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **_options(endpoint))
    paths = fs.find(f"{BUCKET}/{prefix}")
    if paths:
        fs.rm(paths)


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    seconds = statistics.median(r["seconds"] for r in runs)
    nbytes = statistics.median(r["bytes"] for r in runs)
    return {
        "seconds": seconds,
        "MiB_per_s": nbytes / MiB / seconds,
        "extra_rss_MiB": statistics.median(r["extra_rss"] for r in runs) / MiB,
        # Results written before the server's CPU time was recorded have none: NaN, shown as "-".
        "server_cpu": statistics.median(r.get("server_cpu", math.nan) for r in runs),
    }


def run(size_bytes: int, repeats: int) -> dict[str, Any]:
    """Upload and download ``size_bytes`` with each method, ``repeats`` times interleaved.

    Returns ``{"size", "repeats", "runs": {"up ours": [{"seconds", "bytes", "extra_rss"}, ...], ...},
    "medians": {"up ours": {"seconds", "MiB_per_s", "extra_rss_MiB"}, ...}}``.
    """
    import fsspec
    import torch

    server, endpoint = _start_server()
    runs: dict[str, list[dict[str, Any]]] = {f"up {m}": [] for m in UP}
    runs.update({f"down {m}": [] for m in DOWN})
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **_options(endpoint))
        fs.mkdir(BUCKET)
        with tempfile.TemporaryDirectory(prefix="genesis-transfers-") as tmp:
            source = os.path.join(tmp, "state.pth")
            torch.save(make_state(size_bytes), source)  # what s3fs and boto3 upload: the same bytes
            sink = os.path.join(tmp, "download.pth")
            # The object every download reads, written by ours (a committed checkpoint, with its manifest).
            _run_worker("up", "ours", endpoint, "ref", source, str(size_bytes))
            for i in range(repeats):
                for m in UP:
                    key = f"up-{uuid.uuid4().hex[:8]}"
                    r = _run_measured(server, "up", m, endpoint, key, source, str(size_bytes))
                    _remove(endpoint, key)
                    runs[f"up {m}"].append(r)
                    print(f"  run {i + 1}/{repeats} up {m}: {r['seconds']:.2f}s", flush=True)
                for m in DOWN:
                    r = _run_measured(server, "down", m, endpoint, "ref", sink, str(size_bytes))
                    if os.path.exists(sink):
                        os.remove(sink)
                    runs[f"down {m}"].append(r)
                    print(f"  run {i + 1}/{repeats} down {m}: {r['seconds']:.2f}s", flush=True)
    finally:
        _stop_server(server)
    return {
        "size": size_bytes,
        "repeats": repeats,
        "runs": runs,
        "medians": {k: _summary(v) for k, v in runs.items()},
    }


def table(result: dict[str, Any]) -> str:
    """The medians as a markdown table, with each method's throughput against boto3's."""
    med = result["medians"]
    lines = [
        f"{result['size'] / MiB:.0f} MiB, medians of {result['repeats']}:",
        "",
        "| transfer | method | seconds | MiB/s | vs boto3 | extra peak RSS | server CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for direction, modes in (("up", UP), ("down", DOWN)):
        boto = med[f"{direction} boto3"]["MiB_per_s"]
        for m in modes:
            s = med[f"{direction} {m}"]
            server = s.get("server_cpu", math.nan)
            lines.append(
                f"| {direction} | {m} | {s['seconds']:.2f} | {s['MiB_per_s']:.0f} | "
                f"{s['MiB_per_s'] / boto:.2f}x | {s['extra_rss_MiB']:.0f} MiB | "
                f"{'-' if math.isnan(server) else f'{server:.2f}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Command line: ``--quick``, ``--size-mib``, ``--repeats``, ``--json PATH``; prints the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 MiB, 3 repeats")
    p.add_argument("--size-mib", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the raw runs and medians here")
    p.add_argument("--worker", nargs=6, metavar="ARG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        direction, mode, endpoint, key, local, size = args.worker
        print(json.dumps(worker(direction, mode, endpoint, key, local, int(size))))
        return
    size = (args.size_mib or (64 if args.quick else 256)) * MiB
    repeats = args.repeats or (3 if args.quick else 5)
    result = run(size, repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
