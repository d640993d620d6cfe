"""Background saving: at most one save in flight, a consistent snapshot, errors never lost."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class SnapshotBuffers:
    """Copies a checkpoint's tensors into CPU buffers that are reused from one save to the next.

    Fresh allocations of hundreds of MB cost more in page faults than the copy itself; reusing the previous
    save's buffers (safe once that save has finished, which ``BackgroundSaver`` guarantees) makes the copy
    run at memcpy speed. The price is one checkpoint-sized set of buffers kept between saves.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def snapshot(self, obj: Any) -> Any:
        """A copy of ``obj`` whose tensors are private CPU copies, so training can mutate the originals.

        Containers (dict, list, tuple) are rebuilt; other values in a Lightning checkpoint dict (numbers,
        strings) are immutable and shared. Call only when no earlier snapshot is still being written.
        """
        fresh: dict[tuple[Any, ...], torch.Tensor] = {}
        copied = self._copy(obj, (), fresh)
        self._buffers = fresh
        return copied

    def _copy(self, obj: Any, path: tuple[Any, ...], fresh: dict[tuple[Any, ...], torch.Tensor]) -> Any:
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            buf = self._buffers.get(path)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype or not src.is_contiguous():
                buf = src.to("cpu", copy=True)  # also the device-to-host copy for CUDA tensors
            else:
                buf.copy_(src)
            fresh[path] = buf
            return buf
        if isinstance(obj, dict):
            items = {k: self._copy(v, (*path, k), fresh) for k, v in obj.items()}
            return items if type(obj) is dict else type(obj)(items)  # keeps OrderedDict and friends
        if isinstance(obj, (list, tuple)):
            values = [self._copy(v, (*path, i), fresh) for i, v in enumerate(obj)]
            if isinstance(obj, list):
                return values
            return type(obj)(*values) if hasattr(obj, "_fields") else tuple(values)
        return obj


class BackgroundSaver:
    """Runs one save job at a time on a worker thread.

    ``submit`` first waits for the previous job (so at most one save is in flight and the next one queues
    behind it). A job's exception is kept and re-raised by the next ``wait``/``submit``/``raise_if_failed``,
    so a failed background save always reaches the training loop.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a save is still running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        """Wait for the previous save (re-raising its error), then start ``job`` in the background."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # handed to the training thread, never swallowed
                self._error = e

        # daemon: a process that is exiting anyway (Ctrl+C, kill) must not hang on us; an unfinished write
        # never commits, so nothing committed is at risk.
        self._thread = threading.Thread(target=run, name="genesis-ckpt-save", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight is done; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_if_failed()

    def wait_logging_errors(self) -> None:
        """Like ``wait``, but log an error instead of raising it: for paths where another exception (the one
        that interrupted ``fit``) is what the user must see."""
        try:
            self.wait()
        except Exception as e:
            log.error("background checkpoint save failed: %s", e)

    def raise_if_failed(self) -> None:
        """Re-raise the error of a finished save without waiting for one still running."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
