"""Frozen exclusion against a full save, on a LoRA-like model: checkpoint bytes and epoch-save time.

    .venv/bin/python benchmarks/frozen.py            # base sizes 256 MiB and 1 GiB, 5 repeats
    .venv/bin/python benchmarks/frozen.py --quick    # 64 MiB and 256 MiB, 3 repeats

Every run is a fresh process; ``full`` and ``slim`` alternate run by run; the table holds medians. Also a
section of ``make bench`` (benchmarks/run_all.py); run alone it writes benchmarks/frozen.json and prints the
markdown table of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from run_all import HERE, MiB, run_worker, scratch


def run(root: Path, sizes: list[int], repeats: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per base size in MiB (as a string key): the ``full`` and ``slim`` runs."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for size in sizes:
        runs: dict[str, list[dict[str, Any]]] = {"full": [], "slim": []}
        for i in range(repeats):
            for mode in runs:
                d = scratch(root, f"frozen-{mode}")
                r = run_worker("_frozen_worker.py", mode, str(d), "--base-mib", str(size))
                runs[mode].append(r)
                shutil.rmtree(d, ignore_errors=True)
                print(f"  base {size} MiB run {i + 1}/{repeats} {mode}: {r['save_seconds']:.3f}s", flush=True)
        results[str(size)] = runs
    return results


def table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    lines = [
        "| frozen base | trainable + AdamW state | full checkpoint | slim checkpoint | slim / (trainable + "
        "optimizer) | full save | slim save | slim first save (writes the base copy) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, runs in results.items():

        def med(mode: str, key: str, runs: dict[str, list[dict[str, Any]]] = runs) -> float:
            return statistics.median(r[key] for r in runs[mode])

        yardstick = runs["slim"][0]["trainable_plus_optimizer"]
        lines.append(
            f"| {size} MiB | {yardstick / MiB:.2f} MiB | {med('full', 'checkpoint_bytes') / MiB:.1f} MiB | "
            f"{med('slim', 'checkpoint_bytes') / MiB:.2f} MiB | {med('slim', 'checkpoint_bytes') / yardstick:.3f}x | "
            f"{med('full', 'save_seconds'):.3f} s | {med('slim', 'save_seconds'):.3f} s | "
            f"{med('slim', 'first_save_seconds'):.3f} s |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scratch", default=str(HERE.parent / ".bench-scratch"))
    args = p.parse_args()
    root = Path(args.scratch)
    root.mkdir(parents=True, exist_ok=True)
    repeats = 3 if args.quick else 5
    results = run(root, [64, 256] if args.quick else [256, 1024], repeats)
    (HERE / "frozen.json").write_text(json.dumps({"repeats": repeats, "results": results}, indent=1))
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
