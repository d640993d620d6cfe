"""How a file becomes durable and visible: the two commit strategies, chosen by what the filesystem can do.

* :class:`RenameCommit` -- a POSIX filesystem (rename(2) replaces atomically, fsync exists). Data goes to a
  temporary name in the *same directory* as its target (never the system temp dir: a cross-device rename
  is a copy, and a copy is not atomic), is flushed and fsync'd, renamed over the target, and the directory
  is fsync'd so the rename itself survives a power cut.
* :class:`DeferredCommit` -- object stores and in-memory filesystems have no atomic rename, but an object
  becomes visible only once its upload is committed, and an aborted upload is discarded (an fsspec
  transaction). The data is written under its final name and the manifest write is the commit point; a file that is
  complete but not yet listed is an orphan that readers ignore. Limitation: re-using a name (the interrupt
  snapshot, ``best_model.pth``) replaces the old object before the manifest names the new one, so a crash
  in that window leaves a record whose checksum no longer matches; resume detects that and skips it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO, Protocol

from fsspec import AbstractFileSystem

TMP_PREFIX = ".genesis-tmp-"


def temp_name(final_name: str) -> str:
    """A unique temporary file name for ``final_name``, recognisable by :func:`is_temp_name`."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{final_name}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary names (the only files the sweep may remove)."""
    return name.startswith(TMP_PREFIX)


def is_posix_local(fs: AbstractFileSystem) -> bool:
    """True for the local POSIX filesystem, where rename replaces atomically and fsync exists."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols and os.name == "posix"


class CommitStrategy(Protocol):
    """Writes one file so that readers see either the old content or the complete new content."""

    def open_write(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Context manager yielding a binary file; the data commits when the block exits cleanly."""
        ...

    def copy(self, src: str, dst: str) -> None:
        """Commit a byte-identical copy of ``src`` under ``dst`` without re-serializing it."""
        ...


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RenameCommit:
    """Temp file in the target's directory + fsync + rename + directory fsync (local POSIX disks)."""

    def __init__(self, buffer_size: int = 8 * 1024 * 1024) -> None:
        self.buffer_size = buffer_size

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, temp_name(name))
        f = open(tmp, "xb", buffering=self.buffer_size)  # noqa: SIM115 - closed on every path below
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._before_rename(tmp, path)
            os.replace(tmp, path)
        except BaseException:
            # On a full disk closing fails too (it flushes the buffer): the temp file must go regardless.
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        _fsync_dir(directory)

    def copy(self, src: str, dst: str) -> None:
        directory, name = os.path.split(dst)
        tmp = os.path.join(directory, temp_name(name))
        try:
            # A hard link shares the already-durable bytes: no data is read or written again.
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, self.open_write(dst) as fout:
                while chunk := fin.read(self.buffer_size):
                    fout.write(chunk)
            return
        try:
            self._before_rename(tmp, dst)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        _fsync_dir(directory)

    def _before_rename(self, tmp: str, final: str) -> None:
        """Hook for failure-injection tests: called after the data is durable, before it is renamed."""


class DeferredCommit:
    """Write under the final name inside an fsspec transaction: published on success, discarded on error.

    In a transaction fsspec opens files with ``autocommit=False``: s3fs (and gcsfs, adlfs) complete the
    upload only on ``commit()`` and abort it on ``discard()``; ``memory://`` stores the file only on
    ``commit()``. Without it, ``memory://`` shows a file from the moment it is opened and a buffered remote
    file that is closed on an error path (or garbage-collected) publishes whatever it held.
    The store gives this strategy a filesystem instance of its own, so no other writer's files are swept
    into (and committed or discarded with) our transaction.
    """

    def __init__(self, fs: AbstractFileSystem) -> None:
        self.fs = fs

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        with self.fs.transaction:
            f = self.fs.open(path, "wb")
            yield f
            f.close()

    def copy(self, src: str, dst: str) -> None:
        self.fs.copy(src, dst)


def strategy_for(fs: AbstractFileSystem) -> CommitStrategy:
    """The commit strategy the filesystem's capabilities allow."""
    if is_posix_local(fs):
        return RenameCommit()
    return DeferredCommit(fs)
