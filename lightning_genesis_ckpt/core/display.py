"""How sizes and transfer speeds are shown in log lines and the CLI."""

from __future__ import annotations


def human_size(n: float) -> str:
    """A byte count for log lines: ``46.8 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(n_bytes: float, elapsed: float) -> str:
    """A transfer speed in the unit that suits it: ``151.0 MiB/s``, ``640.0 KiB/s`` (never ``0 MiB/s``)."""
    return f"{human_size(n_bytes / elapsed)}/s" if elapsed > 0 else "-"


def transfer_summary(size: int | None, elapsed: float) -> str:
    """``"46.8 MiB in 0.31s, 151.0 MiB/s"`` for log lines; without a size, just the time.

    A transfer too quick to time (a small file) shows no speed: a rate over a few microseconds is noise.
    """
    if size is None:
        return f"in {elapsed:.2f}s"
    if elapsed < 0.01:
        return f"{human_size(size)} in {elapsed:.2f}s"
    return f"{human_size(size)} in {elapsed:.2f}s, {human_rate(size, elapsed)}"
