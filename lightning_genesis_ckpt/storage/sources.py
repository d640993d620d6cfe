"""A file outside any store, given by path or URL: what ``import_checkpoint`` reads and copies in."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import IO, Any

import fsspec

from . import loading
from .reader import StoreReader


class SourceFile:
    """A file on any fsspec filesystem, read through the storage layer like a store's own files.

    Args:
        url: its path or URL.
        storage_options: passed to fsspec.
    """

    def __init__(self, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> None:
        self.display = os.fspath(url)
        self.fs, self.path = fsspec.core.url_to_fs(self.display, **dict(storage_options or {}))

    @property
    def name(self) -> str:
        """Its file name."""
        return str(posixpath.basename(self.path.rstrip("/")))

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def open(self) -> IO[bytes]:
        """The file, opened for reading."""
        f: IO[bytes] = self.fs.open(self.path, "rb")
        return f

    def is_in(self, store: StoreReader, name: str) -> bool:
        """Whether this is the file ``name`` of ``store`` (then there is nothing to copy)."""
        same_protocol = self.fs.protocol == store.loc.fs.protocol
        return same_protocol and posixpath.normpath(self.path) == posixpath.normpath(store.loc.path(name))

    def load_structure(self, *, trusted: bool) -> Any:
        """Load it with every tensor on the ``meta`` device: the structure is parsed and checked without
        reading the weights. Raises as :meth:`.StoreReader.load` does."""
        with self.open() as f:
            return loading.load(
                f, self.display, map_location="meta", trusted=trusted, serializer=None, mmap=False
            )
