"""Run every benchmark and write benchmarks/results.{md,json,png}.

    make bench                      # full run (about 15 minutes on the 2-core dev machine)
    .venv/bin/python benchmarks/run_all.py --quick   # smaller sizes, fewer repeats, for a smoke test

Every measurement runs in a fresh process, methods are interleaved run by run (so drift in disk or CPU load
hits all of them alike), and the tables report medians. Ratios compare methods measured side by side in this
one run. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 2**20
GiB = 2**30


def run_worker(script: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run(
        [sys.executable, str(HERE / script), *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{out.stdout}\n{out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def scratch(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    return d


def bench_save(root: Path, nbytes: int, modes: list[str], repeats: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(repeats):
        for mode in modes:
            d = scratch(root, f"save-{mode}")
            r = run_worker("_worker.py", mode, str(d), "--bytes", str(nbytes))
            results[mode].append(r)
            shutil.rmtree(d, ignore_errors=True)
            print(
                f"  save {nbytes / MiB:.0f} MiB run {i + 1}/{repeats} {mode}: {r['seconds']:.2f}s", flush=True
            )
    return results


LOAD_MODES = ("load-plain", "load-genesis", "load-mmap", "load-genesis-mmap")


def bench_load(root: Path, nbytes: int, repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Each load mode cold (page cache dropped) and warm (``-warm``), interleaved run by run."""
    d = scratch(root, "load")
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(repeats):
        for mode in LOAD_MODES:
            for warm in ((), ("--warm",)):
                r = run_worker("_worker.py", mode, str(d), "--bytes", str(nbytes), *warm)
                key = mode + ("-warm" if warm else "")
                results[key].append(r)
                print(f"  load run {i + 1}/{repeats} {key}: {r['seconds']:.3f}s", flush=True)
    shutil.rmtree(d, ignore_errors=True)
    return results


def bench_e2e(root: Path, configs: list[str], repeats: int, epochs: int) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(repeats):
        for config in configs:
            d = scratch(root, f"e2e-{config}")
            r = run_worker("_e2e_worker.py", config, str(d), "--epochs", str(epochs))
            results[config].append(r)
            shutil.rmtree(d, ignore_errors=True)
            print(f"  e2e run {i + 1}/{repeats} {config}: {r['seconds']:.2f}s", flush=True)
    return results


def med(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}"


def write_report(data: dict[str, Any], out: Path) -> None:
    lines = [f"Machine: {data['machine']}. Scratch directory: `{data['scratch']}` ({data['fs']}).", ""]
    save = data["save"]
    size = data["save_bytes"]
    lines += [
        f"### Save, {size / GiB:g} GiB state (16 float32 tensors), median of {data['repeats']} fresh processes",
        "",
        "| method | seconds | throughput | extra peak RSS | vs torch.save+fsync |",
        "|---|---|---|---|---|",
    ]
    t_torch = med(save["torch"], "seconds")
    for mode, label in (
        ("raw", "raw write + fsync (disk limit)"),
        ("torch", "torch.save + fsync"),
        ("genesis", "genesis (atomic, fsync, crc32, manifest)"),
        ("lightning", "Lightning `_atomic_save`"),
    ):
        if mode not in save:
            continue
        s = med(save[mode], "seconds")
        rss = med(save[mode], "extra_rss")
        lines.append(
            f"| {label} | {s:.2f} | {size / s / MiB:.0f} MiB/s | {rss / MiB:.0f} MiB ({100 * rss / size:.0f}%) "
            f"| {s / t_torch:.2f}x |"
        )
    g = med(save["genesis"], "seconds")
    lines += [
        "",
        f"genesis / torch.save = **{g / t_torch:.2f}x**; Lightning / genesis = **{med(save['lightning'], 'seconds') / g:.2f}x**; "
        f"genesis throughput / raw = **{med(save['raw'], 'seconds') / g:.2f}**.",
        "",
    ]
    if "async" in data:
        a = data["async"]
        lines += [
            "### Async save: time the training loop is blocked per save",
            "",
            f"{a['blocked']:.3f}s blocked vs {a['sync']:.3f}s for a synchronous save (**{100 * a['blocked'] / a['sync']:.0f}%**), "
            f"median over {a['saves']} saves of {a['bytes'] / MiB:.0f} MiB.",
            "",
        ]
    load = data["load"]
    lines += [
        f"### Load, {size / GiB:g} GiB: cold (page cache dropped) and warm, median of {data['repeats']}",
        "",
        "| method | cold | warm | extra peak RSS | vs the same torch.load (cold / warm) |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "load-plain": "`torch.load` (no verification)",
        "load-genesis": "genesis `store.load` (crc32-verified)",
        "load-mmap": "`torch.load(mmap=True)` (no verification)",
        "load-genesis-mmap": "genesis `store.load(mmap=True)` (crc32-verified)",
    }
    for mode, label in labels.items():
        if mode not in load:
            continue
        plain = "load-mmap" if mode.endswith("mmap") else "load-plain"
        cold, warm = med(load[mode], "seconds"), med(load[mode + "-warm"], "seconds")
        lines.append(
            f"| {label} | {cold:.3f} s | {warm:.3f} s | {med(load[mode], 'extra_rss') / MiB:.0f} MiB | "
            f"{cold / med(load[plain], 'seconds'):.2f}x / {warm / med(load[plain + '-warm'], 'seconds'):.2f}x |"
        )
    e2e = data["e2e"]
    base = med(e2e["none"], "seconds")
    lines += [
        "",
        f"### End to end: {data['e2e_epochs']}-epoch Lightning fit, checkpoint (~{e2e['none'][0]['approx_ckpt_bytes'] / MiB:.0f} MiB) every epoch",
        "",
        "| configuration | seconds | overhead vs no checkpointing |",
        "|---|---|---|",
    ]
    for config in e2e:
        s = med(e2e[config], "seconds")
        lines.append(f"| {config} | {s:.2f} | {s - base:+.2f}s ({100 * (s - base) / base:+.0f}%) |")
    growth = data["growth"]
    lines += [
        "",
        "### Growth: save time and extra peak RSS by size",
        "",
        "| size | " + " | ".join(growth["modes"]) + " |",
        "|---|" + "---|" * len(growth["modes"]),
    ]
    for nbytes, per_mode in zip(growth["sizes"], growth["results"], strict=True):
        cells = [
            f"{med(per_mode[m], 'seconds'):.2f}s / {med(per_mode[m], 'extra_rss') / MiB:.0f} MiB"
            for m in growth["modes"]
        ]
        lines.append(f"| {nbytes / MiB:.0f} MiB | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n")


def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    growth = data["growth"]
    sizes = [s / MiB for s in growth["sizes"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in growth["modes"]:
        ax1.plot(sizes, [med(r[mode], "seconds") for r in growth["results"]], marker="o", label=mode)
        ax2.plot(sizes, [med(r[mode], "extra_rss") / MiB for r in growth["results"]], marker="o", label=mode)
    for ax, title, ylabel in ((ax1, "save time", "seconds"), (ax2, "extra peak RSS during save", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("checkpoint size (MiB)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and 2 repeats: a smoke test")
    p.add_argument(
        "--scratch", default=str(HERE.parent / ".bench-scratch"), help="directory on the disk to test"
    )
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()
    root = Path(args.scratch)
    root.mkdir(parents=True, exist_ok=True)
    repeats = 2 if args.quick else 5
    size = 64 * MiB if args.quick else GiB
    fs = (
        subprocess.run(["df", "-T", str(root)], capture_output=True, text=True)
        .stdout.splitlines()[-1]
        .split()[1]
    )
    data: dict[str, Any] = {
        "machine": machine(),
        "scratch": str(root),
        "fs": fs,
        "repeats": repeats,
        "save_bytes": size,
    }

    print("save:", flush=True)
    data["save"] = bench_save(root, size, ["raw", "torch", "genesis", "lightning"], repeats)
    print("load:", flush=True)
    data["load"] = bench_load(root, size, repeats)
    print("end to end:", flush=True)
    configs = ["none", "modelcheckpoint", "genesis", "genesis-async"]
    data["e2e_epochs"] = 4 if args.quick else 20
    data["e2e"] = bench_e2e(root, configs, 2 if args.quick else 3, data["e2e_epochs"])
    print("async:", flush=True)
    data["async"] = run_worker(
        "_async_worker.py",
        str(scratch(root, "async")),
        "--bytes",
        str(size // 2),
        "--saves",
        "3" if args.quick else "5",
    )
    print("growth:", flush=True)
    sizes = [16 * MiB, 64 * MiB] if args.quick else [64 * MiB, 256 * MiB, GiB, 4 * GiB]
    modes = ["torch", "genesis", "lightning"]
    data["growth"] = {
        "sizes": sizes,
        "modes": modes,
        "results": [bench_save(root, s, modes, 2 if args.quick else 3) for s in sizes],
    }
    shutil.rmtree(root, ignore_errors=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    write_report(data, out / "results.md")
    plot(data, out / "results.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
