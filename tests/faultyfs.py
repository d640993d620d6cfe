"""An fsspec filesystem that fails on cue: a size-limited in-memory disk, and I/O errors for chosen files.

``faulty://`` behaves like ``memory://`` (an object store without rename: the store commits through fsspec
transactions) with its own contents, plus, set through ``storage_options`` or later on the instance:

* ``capacity``: bytes the whole filesystem holds; a write past it fails with ``ENOSPC`` partway, like a full
  disk (deleting files frees space again);
* ``fail_match`` / ``fail_errno`` / ``fail_after``: writes to paths containing ``fail_match`` fail with that
  errno once ``fail_after`` bytes of the file are written;
* ``fail_read_match``: reads of paths containing it fail with ``fail_errno`` once ``fail_after`` bytes of the
  file were read (a disk whose sectors went bad, an NFS server gone away);
* ``write_rate`` / ``read_rate``: bytes per second writes / reads are throttled to (a slow disk or link, for
  the progress display).

Nothing of the library is mocked: the failures come from the filesystem the store writes to.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

PROTOCOL = "faulty"


class FaultyFile(MemoryFile):
    def __init__(self, fs: FaultyFileSystem, path: str, data: bytes | None = None) -> None:
        super().__init__(fs, path, data)
        self.faulty = fs

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        fs = self.faulty
        if fs.fail_match is not None and fs.fail_match in self.path and self.tell() + n > fs.fail_after:
            raise OSError(fs.fail_errno, os.strerror(fs.fail_errno), self.path)
        if fs.capacity is not None and fs.used() + self.tell() + n > fs.capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        if fs.write_rate:
            time.sleep(n / fs.write_rate)
        return super().write(data)


class FaultyReadFile(MemoryFile):
    def __init__(self, fs: FaultyFileSystem, path: str, data: bytes) -> None:
        super().__init__(fs, path, data)
        self.faulty = fs

    def read(self, size: int | None = -1) -> bytes:
        fs = self.faulty
        n = len(self.getbuffer()) - self.tell() if size is None or size < 0 else size
        if (
            fs.fail_read_match is not None
            and fs.fail_read_match in self.path
            and self.tell() + n > fs.fail_after
        ):
            raise OSError(fs.fail_errno, os.strerror(fs.fail_errno), self.path)
        data = super().read(size)
        if fs.read_rate:
            time.sleep(len(data) / fs.read_rate)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(memoryview(b)))
        memoryview(b)[: len(data)] = data
        return len(data)


class FaultyFileSystem(MemoryFileSystem):
    protocol = PROTOCOL
    store: ClassVar[dict[str, Any]] = {}  # separate from memory://
    pseudo_dirs: ClassVar[list[str]] = [""]

    def __init__(
        self,
        *args: Any,
        capacity: int | None = None,
        fail_match: str | None = None,
        fail_errno: int = errno.EIO,
        fail_after: int = 0,
        fail_read_match: str | None = None,
        write_rate: float | None = None,
        read_rate: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = capacity
        self.fail_match = fail_match
        self.fail_errno = fail_errno
        self.fail_after = fail_after
        self.fail_read_match = fail_read_match
        self.write_rate = write_rate
        self.read_rate = read_rate

    def used(self) -> int:
        return sum(f.size for f in self.store.values())

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode or "x" in mode:
            path = self._strip_protocol(path)
            if "x" in mode and self.exists(path):
                raise FileExistsError(path)
            f = FaultyFile(self, path, kwargs.get("data"))
            if not self._intrans:
                f.commit()
            return f
        f = super()._open(path, mode, **kwargs)
        if (self.fail_read_match is not None or self.read_rate) and isinstance(f, MemoryFile):
            return FaultyReadFile(self, f.path, f.getvalue())
        return f

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        # memory:// stores a piped payload without opening a file; route it through FaultyFile so that
        # small one-request writes (the manifest, markers, the lock) fail on cue too.
        path = self._strip_protocol(path)
        if mode == "create" and self.exists(path):
            raise FileExistsError(path)
        f = FaultyFile(self, path)
        f.write(value)
        if self._intrans:
            self.transaction.files.append(f)
        else:
            f.commit()

    @classmethod
    def reset(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]


fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)
