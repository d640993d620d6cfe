"""Progress for long transfers: a save, load, upload or download that runs past a couple of seconds says so.

The store declares a transfer where it knows the name (``with progress.transfer("saving", url):``); the two
loops every byte passes through, :class:`.checksums.ChecksumWriter` (saves and uploads) and
:func:`.serialization.checksum_stream` (verified loads and downloads), count bytes into it. Nothing is shown
for a transfer that ends within :data:`SHOW_AFTER_S`: until then a write costs one addition and a compare
(the clock is read once per :data:`_CLOCK_STRIDE` bytes), so the fast path pays nothing measurable.

Past that point:

* on an interactive terminal (``stderr`` is a tty), a tqdm bar (the one Lightning and pip use) with bytes,
  rate and, where the size is known, the ETA; it is cleared when the transfer ends, and the usual one-line
  summary (``saved ... (1.0 GiB in 6.2s, 165.0 MiB/s)``) follows;
* anywhere else (a log file, CI, a pipe), a single log line, so logs do not fill with bars.

The threshold can be lowered through the environment variable ``_GENESIS_PROGRESS_AFTER_S`` (for the tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..core.display import human_rate, human_size

log = logging.getLogger(__name__)

#: Seconds a transfer runs before it shows progress.
SHOW_AFTER_S = float(os.environ.get("_GENESIS_PROGRESS_AFTER_S", "2.0"))
_CLOCK_STRIDE = 1 << 20  # bytes between two reads of the clock while nothing is shown yet

_current: contextvars.ContextVar[Transfer | None] = contextvars.ContextVar("genesis_transfer", default=None)


class Transfer:
    """Bytes moved so far in one transfer; shows progress once it has run for :data:`SHOW_AFTER_S`.

    Args:
        verb: ``"saving"``, ``"loading"``...
        target: the file's URL or path, as log lines show it.
        total: the size in bytes, or a function computing it (called only if progress is shown), or None.
    """

    def __init__(self, verb: str, target: str, total: int | Callable[[], int | None] | None) -> None:
        self.verb = verb
        self.target = target
        self._total = total
        self.done = 0
        self._start = time.monotonic()
        self._check_at = _CLOCK_STRIDE
        self._bar: Any = None
        self._shown = False

    def add(self, n: int) -> None:
        """Count ``n`` more bytes (called by the I/O loops for every chunk)."""
        self.done += n
        if self.done >= self._check_at:
            self._update()

    def _update(self) -> None:
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
            return
        self._check_at = self.done + _CLOCK_STRIDE
        elapsed = time.monotonic() - self._start
        if self._shown or elapsed < SHOW_AFTER_S:
            return
        self._shown = True
        total = self._total() if callable(self._total) else self._total
        if _interactive():
            from tqdm.auto import tqdm

            self._check_at = 0  # from now on every chunk moves the bar (tqdm itself limits redraws)
            self._bar = tqdm(
                total=total,
                initial=self.done,
                desc=f"{self.verb} {os.path.basename(self.target.rstrip('/'))}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                leave=False,
                file=sys.stderr,
                # A terminal that reports no size (a fresh pty, ``docker -t``) would get an empty bar.
                ncols=shutil.get_terminal_size((100, 24)).columns,
            )
        else:
            rate = self.done / elapsed
            left = f", about {(total - self.done) / rate:.0f}s left" if total and rate > 0 else ""
            of = f" of {human_size(total)}" if total else ""
            log.info(
                "%s %s: %s%s so far, %s%s",
                self.verb,
                self.target,
                human_size(self.done),
                of,
                human_rate(self.done, elapsed),
                left,
            )

    def close(self) -> None:
        """Clear the bar, if one was shown."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _interactive() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except ValueError:  # a closed stream
        return False


def current() -> Transfer | None:
    """The transfer the calling thread is inside, if any (read once per loop, not per chunk)."""
    return _current.get()


@contextlib.contextmanager
def transfer(
    verb: str, target: str, *, total: int | Callable[[], int | None] | None = None, enabled: bool = True
) -> Iterator[None]:
    """Count the bytes the store's I/O loops move inside this block as one transfer of ``target``.

    ``enabled=False`` (a store made with ``verbose=False``) shows nothing. A transfer inside another (a
    load that downloads) counts into the outer one.
    """
    if not enabled or _current.get() is not None:
        yield
        return
    meter = Transfer(verb, target, total)
    token = _current.set(meter)
    try:
        yield
    finally:
        _current.reset(token)
        meter.close()


def tensor_bytes(obj: Any) -> int | None:
    """The bytes of the tensors in a nested state (dicts, lists, tuples), each storage once: a save's size
    to within its pickle. Walked only when a slow save starts to show progress."""
    import torch

    seen: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total or None
