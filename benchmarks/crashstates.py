"""Power-loss crash states: every state a power cut can leave in each workload, under both persistence models.

    .venv/bin/python benchmarks/crashstates.py                 # the full run of docs/crash-states.md
    .venv/bin/python benchmarks/crashstates.py --cap 8 --points 30 --workloads rolling,genesis   # a quick look
    .venv/bin/python benchmarks/crashstates.py --self-test     # the broken commits: each must be reported

The workloads run once, in one process recorded by strace; the explorer (tests/crash_states/) then rebuilds
each crash state from the record alone, writes it out as a real directory and opens it through the library's
public surface as the next run would. It prints one table row per workload and model (crash points, states
judged, states with a violation, by kind) and the first findings, each reproducible from its crash point and
lost ops with the printed seed. Exit status 1 when a workload has a violation, or (``--self-test``) when a
broken variant has none.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from crash_states import explore, strace  # noqa: E402
from crash_states.broken import BROKEN  # noqa: E402
from crash_states.workloads import WORKLOADS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--cap", type=int, default=1024, help="states per crash point before sampling")
    p.add_argument("--points", type=int, default=None, help="a seeded sample of crash points per cell")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    p.add_argument("--resume-samples", type=int, default=3, help="real Trainer resumes per Trainer cell")
    p.add_argument("--cli-samples", type=int, default=2, help="genesis-ckpt verify subprocesses per cell")
    p.add_argument("--self-test", action="store_true", help="explore the deliberately broken commits instead")
    p.add_argument("--findings", type=int, default=3, help="findings printed per cell")
    args = p.parse_args()
    reason = strace.unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    names = list(BROKEN) if args.self_test else args.workloads.split(",")
    command = " ".join(["benchmarks/crashstates.py", *sys.argv[1:]])
    print(f"{command}: seed {args.seed}, cap {args.cap}, crash points {args.points or 'all'}", flush=True)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="genesis-crashstates-trace-"))
    scratch = explore.scratch_dir()
    try:
        studies = explore.studies(names, work, scratch)
        recorded = time.perf_counter() - start
        cells = [
            explore.explore(
                studies[name], model, seed=args.seed, cap=args.cap, points=args.points,
                resume_samples=args.resume_samples, cli_samples=args.cli_samples,
            )
            for name in names
            for model in explore.MODELS
        ]  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("| workload | model | crash points (sampled) | states explored | violations | kinds |")
    print("|---|---|---|---|---|---|")
    for c in cells:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(c.kinds.items())) or "-"
        points = f"{c.crash_points} ({c.sampled_points})"
        print(f"| {c.workload} | {c.model} | {points} | {c.states} | {c.bad_states} | {kinds} |")
    states, bad = sum(c.states for c in cells), sum(c.bad_states for c in cells)
    points = f"{sum(c.crash_points for c in cells)} ({sum(c.sampled_points for c in cells)})"
    print(f"| **all** | both | {points} | **{states}** | **{bad}** | |")
    notes = {k: sum(c.notes[k] for c in cells) for c in cells for k in c.notes}
    if notes:
        print("\nnotes (not violations): " + ", ".join(f"{k}: {n}" for k, n in sorted(notes.items())))
    for c in cells:
        for f in c.findings[: args.findings]:
            print(f"\n{c.workload} / {c.model}: {f.where}")
            for v in f.violations[:4]:
                print(f"    {v}")
    elapsed = time.perf_counter() - start
    resumes, clis = sum(c.resumes for c in cells), sum(c.cli_runs for c in cells)
    print(
        f"\n{states} crash states ({resumes} resumed by a real Trainer, {clis} checked by genesis-ckpt verify "
        f"as a subprocess), {bad} with a violation; traced in {recorded:.0f} s, {elapsed:.0f} s in all on "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"Linux {platform.release()}"
    )
    if args.self_test:
        quiet = sorted({c.workload for c in cells} - {c.workload for c in cells if c.bad_states})
        if quiet:
            print(f"self-test FAILED: no violation reported for {', '.join(quiet)}")
        return 1 if quiet else 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
