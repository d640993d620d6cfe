"""The tables (benchmarks/results.md) and the plot (benchmarks/results.png) of a ``make bench`` run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30

#: Bumped when results.json changes shape: an ``--only`` run then starts from nothing.
VERSION = 2

SAVE_LABELS = {
    "floor-manifest": "floor + one small manifest write",
    "torch": "torch.save + fsync (not atomic)",
    "genesis": "`genesis.save`",
    "manager": "`CheckpointManager` epoch save",
    "callback": "callback epoch save (vs the floor of its dict)",
    "lightning": "Lightning `_atomic_save`",
}


def med(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def size_label(nbytes: int) -> str:
    return f"{nbytes / GiB:g} GiB" if nbytes >= GiB else f"{nbytes / MiB:g} MiB"


def floor_of(mode: str) -> str:
    # The callback saves the trainer's checkpoint dict, a little more than the raw weights: its floor is
    # that same dict saved at the floor in the same kind of process.
    return "callback-floor" if mode == "callback" else "floor"


def measured(save: dict[str, Any], modes: Any) -> list[str]:
    """The ``modes`` that every size of ``save`` has: runs from before a mode existed render without it."""
    return [m for m in modes if all(m in runs for runs in save["results"])]


def save_tables(save: dict[str, Any]) -> list[str]:
    sizes, results = save["sizes"], save["results"]
    modes = measured(save, ("floor", *SAVE_LABELS))

    def table(title: str, cell: Any) -> list[str]:
        """``title``, then one row per size with ``cell(runs, mode, nbytes)`` for every method."""
        lines = [
            title,
            "",
            "| size | durable floor | " + " | ".join(SAVE_LABELS[m] for m in modes[1:]) + " |",
        ]
        lines.append("|---|" + "---|" * len(modes))
        for nbytes, runs in zip(sizes, results, strict=True):
            cells = [cell(runs, mode, nbytes) for mode in modes]
            lines.append(f"| {size_label(nbytes)} | " + " | ".join(cells) + " |")
        return lines

    def timed(key: str, fmt: str) -> Any:
        def cell(runs: dict[str, list[dict[str, Any]]], mode: str, nbytes: int) -> str:
            t = med(runs[mode], key)
            if mode == "floor":
                return f"{t:.3f} s"
            return f"{t:.3f} s ({fmt.format(t / max(med(runs[floor_of(mode)], key), 1e-9))})"

        return cell

    def rss(runs: dict[str, list[dict[str, Any]]], mode: str, nbytes: int) -> str:
        extra = med(runs[mode], "extra_rss")
        return f"{extra / MiB:.1f} ({100 * extra / nbytes:.0f}%)"

    callback_floors = ", ".join(
        f"{size_label(n)} {med(r['callback-floor'], 'seconds'):.3f} s"
        for n, r in zip(sizes, results, strict=True)
    )
    against_manifest = ""
    if "floor-manifest" in modes:
        # The reference for small saves: the floor plus one small fsync'd manifest write.
        def vs_manifest(runs: dict[str, list[dict[str, Any]]], mode: str) -> float:
            return med(runs[mode], "seconds") / med(runs["floor-manifest"], "seconds")

        per_size = "; ".join(
            f"{size_label(n)} genesis.save {vs_manifest(r, 'genesis'):.2f}x, manager {vs_manifest(r, 'manager'):.2f}x"
            for n, r in zip(sizes, results, strict=True)
        )
        against_manifest = f" Against the floor + one manifest write: {per_size}."
    return [
        *table(
            f"### Save: wall seconds and ratio to the durable floor, median of {save['repeats']} fresh processes",
            timed("seconds", "**{:.2f}x**"),
        ),
        "",
        "The callback's floor is the trainer's own checkpoint dict saved at the floor in the same one-epoch fit "
        f"(`callback-floor`): {callback_floors}.{against_manifest}",
        "",
        *table(
            "### Save: CPU seconds of the saving process (what the device's speed does not decide), ratio to the floor",
            timed("cpu", "{:.2f}x"),
        ),
        "",
        *table("### Save: extra peak RSS (MiB, and % of the state)", rss),
    ]


def load_table(load: dict[str, Any]) -> list[str]:
    results = load["results"]
    lines = [
        f"### Load, {size_label(load['bytes'])}: cold (page cache dropped) and warm, median of {load['repeats']}",
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
        plain = "load-mmap" if mode.endswith("mmap") else "load-plain"
        cold, warm = med(results[mode], "seconds"), med(results[mode + "-warm"], "seconds")
        lines.append(
            f"| {label} | {cold:.3f} s | {warm:.3f} s | {med(results[mode], 'extra_rss') / MiB:.0f} MiB | "
            f"{cold / med(results[plain], 'seconds'):.2f}x / {warm / med(results[plain + '-warm'], 'seconds'):.2f}x |"
        )
    return lines


def e2e_table(e2e: dict[str, Any]) -> list[str]:
    results = e2e["results"]
    base = med(results["none"], "seconds")
    lines = [
        f"### End to end: {e2e['epochs']}-epoch Lightning fit, checkpoint "
        f"(~{results['none'][0]['approx_ckpt_bytes'] / MiB:.0f} MiB) every epoch, median of {e2e['repeats']}",
        "",
        "| configuration | seconds | overhead vs no checkpointing |",
        "|---|---|---|",
    ]
    for config, rows in results.items():
        s = med(rows, "seconds")
        lines.append(f"| {config} | {s:.2f} | {s - base:+.2f}s ({100 * (s - base) / base:+.0f}%) |")
    return lines


def dip_table(dip: dict[str, Any]) -> list[str]:
    lines = [
        f"### Background saves: step time while a save is in flight, median of {dip['repeats']} fits",
        "",
        "| checkpoint | idle step | step during a background save | dip |",
        "|---|---|---|---|",
    ]
    for nbytes in dip["sizes"]:
        rows = [r for r in dip["results"][str(nbytes)] if r["busy_step"] is not None]
        idle, busy = med(rows, "idle_step"), med(rows, "busy_step")
        lines.append(
            f"| {size_label(nbytes)} | {1000 * idle:.1f} ms | {1000 * busy:.1f} ms | {busy / idle - 1:+.0%} |"
        )
    return lines


def write(data: dict[str, Any], out: Path) -> None:
    lines = [
        f"Machine: {data['machine']}. Scratch directory: `{data['scratch']}` ({data['fs']})"
        + (" -- a `--quick` run." if data.get("quick") else "."),
        "Minutes per section: " + ", ".join(f"{k} {v}" for k, v in data.get("minutes", {}).items()) + ".",
        "",
    ]
    if "save" in data:
        lines += [*save_tables(data["save"]), ""]
    if "async" in data:
        a = data["async"]
        lines += [
            "### Async save: time the training loop is blocked per save",
            "",
            f"{a['blocked']:.3f}s blocked vs {a['sync']:.3f}s for a synchronous save "
            f"(**{100 * a['blocked'] / a['sync']:.0f}%**), median over {a['saves']} saves of {size_label(a['bytes'])}.",
            "",
        ]
    if "dip" in data:
        lines += [*dip_table(data["dip"]), ""]
    if "load" in data:
        lines += [*load_table(data["load"]), ""]
    if "e2e" in data:
        lines += [*e2e_table(data["e2e"]), ""]
    if "frozen" in data:
        import frozen

        lines += [
            f"### Fine-tuning checkpoints (`exclude_frozen=True`), median of {data['frozen']['repeats']}",
            "",
        ]
        lines += [*frozen.table(data["frozen"]["results"]), ""]
    if "transfers" in data:
        import transfers

        lines += [
            "### S3 transfers on the loopback moto server (benchmarks/transfers.py)",
            "",
            transfers.table(data["transfers"]),
            "",
        ]
    out.write_text("\n".join(lines))


def embed(text: str, page: Path, marker: str) -> None:
    """Put ``text`` between ``<!-- {marker}:begin ...-->`` and ``<!-- {marker}:end -->`` in ``page``."""
    content = page.read_text()
    start = content.index("\n", content.index(f"<!-- {marker}:begin")) + 1
    stop = content.index(f"<!-- {marker}:end -->")
    page.write_text(content[:start] + "\n" + text.strip() + "\n\n" + content[stop:])


def for_docs(results_md: str) -> str:
    """results.md with its headings one level down, under the benchmarks page's "The last run"."""
    return "\n".join(("#" + line if line.startswith("### ") else line) for line in results_md.splitlines())


def readme_table(data: dict[str, Any]) -> str:
    """The save comparison for the README: wall seconds and the ratio to the durable floor."""
    save = data["save"]
    labels = {
        "floor-manifest": "floor + manifest write",
        "genesis": "`genesis.save`",
        "manager": "`CheckpointManager`",
        "callback": "callback epoch save",
        "torch": "torch.save + fsync (not atomic)",
        "lightning": "Lightning `_atomic_save`",
    }
    modes = measured(save, labels)
    lines = [
        "| size | durable floor | " + " | ".join(labels[m] for m in modes) + " |",
        "|---|" + "---|" * (len(modes) + 1),
    ]
    for nbytes, runs in zip(save["sizes"], save["results"], strict=True):
        cells = [f"{med(runs['floor'], 'seconds'):.3f} s"]
        for mode in modes:
            s = med(runs[mode], "seconds")
            cells.append(f"{s / med(runs[floor_of(mode)], 'seconds'):.2f}x")
        lines.append(f"| {size_label(nbytes)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(data: dict[str, Any], out: Path) -> None:
    if "save" not in data:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save = data["save"]
    sizes = [s / MiB for s in save["sizes"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, mode in enumerate(measured(save, ("floor", *SAVE_LABELS))):
        style = {"marker": "o", "label": mode, "color": f"C{i}"}  # one colour per method in both plots
        ax1.plot(sizes, [med(r[mode], "seconds") for r in save["results"]], **style)
        if mode != "floor":
            ratios = [med(r[mode], "seconds") / med(r[floor_of(mode)], "seconds") for r in save["results"]]
            ax2.plot(sizes, ratios, **style)
    ax2.axhline(1.10, color="grey", linestyle="--", linewidth=1, label="1.10x goal")
    for ax, title, ylabel in ((ax1, "save time", "seconds"), (ax2, "save time / durable floor", "ratio")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("checkpoint size (MiB)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
