"""How sizes and transfer speeds are shown in log lines and the CLI."""

from __future__ import annotations


def human_size(n: float) -> str:
    """A byte count for log lines: ``46.8 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def transfer_summary(size: int | None, elapsed: float) -> str:
    """``"46.8 MiB in 0.31s, 151 MiB/s"`` for log lines; without a size, just the time."""
    if size is None:
        return f"in {elapsed:.2f}s"
    speed = f"{size / elapsed / 2**20:.0f} MiB/s" if elapsed > 0 else "-"
    return f"{human_size(size)} in {elapsed:.2f}s, {speed}"
