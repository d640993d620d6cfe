"""How a file becomes durable and visible: the two commit strategies, chosen by what the filesystem can do.

* :class:`RenameCommit` -- a POSIX filesystem (rename(2) replaces atomically, fsync exists). Data goes to a
  temporary name in the *same directory* as its target (never the system temp dir: a cross-device rename
  is a copy, and a copy is not atomic), is flushed and fsync'd, renamed over the target, and the directory
  is fsync'd so the rename itself survives a power cut.
* :class:`DeferredCommit` -- object stores and in-memory filesystems have no atomic rename, but an object
  becomes visible only once its upload is committed, and an aborted upload is discarded (an fsspec
  transaction). The data is written under its final name and the manifest write is the commit point; a file
  that is complete but not yet listed is an orphan that readers ignore and the next start sweeps (the
  store's intent marker proves it ours). On S3 a checkpoint goes up as a
  multipart upload that only a final CompleteMultipartUpload makes visible (a failed one is aborted, its
  parts deleted); the manifest, small and known up front, is one PUT.

  Limitation: re-using a name (the interrupt snapshot, ``best_model.pth``) replaces the old object before
  the manifest names the new one. The window is the time between the request that publishes the new
  object (the PUT / CompleteMultipartUpload / CopyObject, which replace atomically: during the upload
  itself the old object stays whole) and the manifest PUT that follows it. A crash exactly there leaves
  the old record over the new bytes: their checksum no longer matches, so resume skips that file with a
  warning and uses the next candidate; nothing half-written is ever loaded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from typing import IO, Protocol

from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile

from ._faults import fault_point

TMP_PREFIX = ".genesis-tmp-"


def temp_name(final_name: str) -> str:
    """A unique temporary file name for ``final_name``, recognisable by :func:`is_temp_name`."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{final_name}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary names (the only files the sweep may remove)."""
    return name.startswith(TMP_PREFIX)


_INTENT_PREFIX = f"{TMP_PREFIX}intent-"


def intent_name(final_name: str) -> str:
    """The marker that announces a write of ``final_name`` until the manifest has committed it."""
    return f"{_INTENT_PREFIX}{final_name}"


def intent_target(name: str) -> str | None:
    """The file an intent marker announces, or None if ``name`` is not an intent marker."""
    return name[len(_INTENT_PREFIX) :] if name.startswith(_INTENT_PREFIX) else None


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

    def write_bytes(self, path: str, data: bytes, *, fault: str | None = None) -> None:
        """Commit a small payload that is known up front (the manifest): as few requests as possible.

        ``fault`` names the test-only kill point (see :mod:`._faults`) hit while the payload is in flight.
        """
        ...


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush a local file that someone else wrote (maybe without fsync) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` on a local disk, whose new directories survive a power cut.

    A new directory is an entry of its parent, on disk only once the parent is fsync'd; until then a power cut
    can take it, and every checkpoint committed inside it, away (filesystems that do not order metadata, or
    ext4 when nothing else forces a journal commit). So each directory created here is fsync'd into its
    parent, from the deepest existing ancestor down. A directory that already exists costs one ``stat``.
    """
    missing: list[str] = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for i, directory in enumerate(reversed(missing)):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):  # a file in the way: the error os.makedirs gives
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from None
        # The existing ancestor may be writable but not readable (then it cannot be opened to fsync): as
        # durable as that directory's owner allows. The ones created here are always ours to fsync.
        with contextlib.suppress(PermissionError) if i == 0 else contextlib.nullcontext():
            _fsync_dir(os.path.dirname(directory))


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

    def write_bytes(self, path: str, data: bytes, *, fault: str | None = None) -> None:
        with self.open_write(path) as f:
            f.write(data[: len(data) // 2])
            if fault is not None:
                fault_point(fault)  # half the bytes are in the temp file: the target must stay whole
            f.write(data[len(data) // 2 :])

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
            try:
                yield f
            except BaseException:
                _abandon(f)
                raise  # the transaction discards the file: an upload in progress is aborted
            f.close()

    def copy(self, src: str, dst: str) -> None:
        # The single-file primitive: a server-side copy on object stores (S3: one CopyObject, which
        # publishes atomically), without the glob and existence checks of ``fs.copy``.
        with self.fs.transaction:
            self.fs.cp_file(src, dst)

    def write_bytes(self, path: str, data: bytes, *, fault: str | None = None) -> None:
        if fault is not None:
            fault_point(fault)  # one request: a kill can only come before it or after it
        # ``pipe_file`` sends a payload known up front as one request where the store has one (S3: a
        # single PUT, visible whole or not at all), instead of the three a deferred multipart upload
        # needs; filesystems without such a primitive fall back to a deferred file in the transaction.
        with self.fs.transaction:
            self.fs.pipe_file(path, data)


def _abandon(f: IO[bytes]) -> None:
    """Make sure an abandoned deferred file can never publish anything after the transaction discards it.

    fsspec's buffered files (s3fs, gcsfs, adlfs) finalize their upload in ``close()``, which their
    ``__del__`` calls. ``discard()`` aborts the upload but leaves the file open, so garbage collection
    would later call ``close()`` and start a *new* multipart upload that nothing ever completes or aborts
    (a dangling upload, billed as storage). Marking the file closed first makes that impossible.
    """
    if isinstance(f, AbstractBufferedFile):
        f.closed = True


def strategy_for(fs: AbstractFileSystem) -> CommitStrategy:
    """The commit strategy the filesystem's capabilities allow."""
    if is_posix_local(fs):
        return RenameCommit()
    return DeferredCommit(fs)
