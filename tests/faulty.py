"""Failure injection by filesystem subclass: an in-memory fsspec filesystem that fails on cue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

PROTOCOL = "faultymem"


class FaultyMemoryFileSystem(MemoryFileSystem):
    """``faultymem://``: memory:// with its own store, whose ``open`` and ``pipe_file`` raise ENOSPC when
    ``fail_on`` says so.

    ``fail_on(path, mode)`` is consulted on every open and every one-request write; None stops failing.
    """

    protocol = (PROTOCOL,)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    fail_on: ClassVar[Callable[[str, str], bool] | None] = None

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith(f"{PROTOCOL}://"):
            path = "memory://" + path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        fail_on = type(self).fail_on
        if fail_on is not None and fail_on(self._strip_protocol(path), mode):
            raise OSError(28, f"No space left on device (injected) writing {path}")
        return super()._open(path, mode, *args, **kwargs)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        # A payload sent in one request fails on cue too, like a PUT.
        fail_on = type(self).fail_on
        if fail_on is not None and fail_on(self._strip_protocol(path), "wb"):
            raise OSError(28, f"No space left on device (injected) writing {path}")
        super().pipe_file(path, value, *args, **kwargs)


fsspec.register_implementation(PROTOCOL, FaultyMemoryFileSystem, clobber=True)
