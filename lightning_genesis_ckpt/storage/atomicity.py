"""How bytes become durable and visible under their name: two publish strategies, chosen by capability.

Publishing puts a file's complete bytes under its final name; *committing* is the manifest listing it (see
:mod:`.transaction`). A strategy never commits anything.

* :class:`RenameCommit` -- a POSIX filesystem (rename(2) replaces atomically, fsync exists). Data goes to a
  temporary name in the *same directory* as its target (never the system temp dir: a cross-device rename
  is a copy, and a copy is not atomic), is flushed and fsync'd, and renamed over the target. The directory is
  fsync'd so the rename itself survives a power cut: by the transaction, once for all it published, before
  the manifest write that commits them.
* :class:`DeferredCommit` -- object stores and in-memory filesystems have no atomic rename, but an object
  becomes visible only once its upload completes, and an aborted upload is discarded (an fsspec transaction).
  The data is written under its final name and the manifest write is the commit point; a file that is
  complete but not yet listed is an orphan that readers ignore and the next holder of the lock sweeps (its
  intent marker proves it ours). A payload up to :data:`SINGLE_PUT_LIMIT` goes up as one PUT, visible whole
  or not at all; a larger one as a multipart upload that only a final CompleteMultipartUpload makes visible
  (a failed one is aborted, its parts deleted). On S3 its parts go up several at a time (:mod:`.transfers`).

  Limitation: re-using a name (the interrupt snapshot, ``best_model.pth``) replaces the old object before
  the manifest names the new one. The transaction first writes the name's intent marker holding the new
  record, so after a crash the name holds either the old bytes (its record is right) or the complete new
  bytes (the marker's record is right): the holder settles it, a reader that finds the old record wrong
  checks the marker. Nothing half-written is ever loaded.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any, Protocol

from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile

from ..core.errors import is_storage_client_error
from ..core.names import TMP_PREFIX, intent_name, intent_target, is_temp_name
from ._faults import fault_point
from .transfers import ConcurrentUpload

log = logging.getLogger(__name__)

__all__ = [
    "TMP_PREFIX",
    "CommitStrategy",
    "DeferredCommit",
    "RenameCommit",
    "fsync_directory",
    "intent_name",
    "intent_target",
    "is_posix_local",
    "is_s3",
    "is_temp_name",
    "server_side_copy",
    "strategy_for",
    "temp_name",
]

#: A deferred write up to this size is buffered in memory and sent as one request (S3: a single PUT instead
#: of the three requests of a one-part multipart upload); 5 MiB is also S3's smallest multipart part.
SINGLE_PUT_LIMIT = 5 * 2**20


def temp_name(final_name: str) -> str:
    """A unique temporary file name for ``final_name``, recognisable by :func:`is_temp_name`."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{final_name}"


def is_posix_local(fs: AbstractFileSystem) -> bool:
    """True for the local POSIX filesystem, where rename replaces atomically and fsync exists."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols and os.name == "posix"


def is_s3(fs: AbstractFileSystem) -> bool:
    """Whether ``fs`` speaks the S3 API (s3fs, or a subclass of it)."""
    return callable(getattr(fs, "call_s3", None)) and callable(getattr(fs, "split_path", None))


#: The largest object one S3 CopyObject can copy; larger ones need a multipart copy.
_S3_SINGLE_COPY = 5 * 2**30


def server_side_copy(fs: AbstractFileSystem, src: str, dst: str, size: int | None = None) -> None:
    """Copy ``src`` to ``dst`` on the store itself (S3: one CopyObject, atomic), never through this machine."""
    s3: Any = fs
    if is_s3(fs) and size is not None and size < _S3_SINGLE_COPY:
        bucket, key, _ = s3.split_path(dst)
        src_bucket, src_key, _ = s3.split_path(src)
        try:
            s3.call_s3(
                "copy_object", Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key}
            )
        finally:
            fs.invalidate_cache(dst)
        return
    fs.cp_file(src, dst)


def fsync_directory(directory: str) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` on a local disk, whose new directories survive a power cut.

    A new directory is an entry of its parent, on disk only once the parent is fsync'd; until then a power cut
    can take it, and every checkpoint committed inside it, away. So each directory created here is fsync'd
    into its parent, from the deepest existing ancestor down. A directory that already exists costs one
    ``stat``.
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
            fsync_directory(os.path.dirname(directory))


class CommitStrategy(Protocol):
    """Publishes one file so that readers see either the old content or the complete new content."""

    #: Whether a name can be published under a temporary name first and renamed (local disks).
    renames: bool

    def open_write(self, path: str, *, sync: bool = True) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Context manager yielding a binary file; the bytes are published when the block exits cleanly.

        ``sync=False`` leaves the directory entry to the caller's :meth:`sync` (one for several files).
        """
        ...

    def copy(self, src: str, dst: str, *, sync: bool = True, size: int | None = None) -> None:
        """Publish a byte-identical copy of ``src`` (of ``size`` bytes, if known) under ``dst`` without
        re-serializing it."""
        ...

    def write_small(self, path: str, data: bytes, *, durable: bool = True, content: bool = True) -> None:
        """Publish a small payload known up front (a marker): as few requests or syscalls as possible.

        ``durable``: on a local disk, the name survives a power cut once this returns (its directory is
        fsync'd); ``content``: so do its bytes (the file is fsync'd too).
        """
        ...

    def sync(self, directory: str) -> None:
        """Make what was published in ``directory`` with ``sync=False`` durable."""
        ...


class RenameCommit:
    """Temp file in the target's directory + fsync + rename (+ directory fsync) on local POSIX disks."""

    renames = True

    def __init__(self, buffer_size: int = 8 * 1024 * 1024, write_buffer: int = 256 * 1024) -> None:
        self.buffer_size = buffer_size
        # Small: torch hands every tensor's bytes over in one write, and a write larger than the buffer goes
        # straight to the file. An 8 MiB buffer copied every tensor under 8 MiB once more (the profile: a
        # tenth of a 16 MiB save); the headers and descriptors between them still coalesce.
        self.write_buffer = write_buffer
        #: The test-only kill point hit once the data is durable, before the rename (see :mod:`._faults`).
        self.data_fault: str | None = "after-data-before-rename"

    @contextlib.contextmanager
    def open_write(self, path: str, *, sync: bool = True) -> Iterator[IO[bytes]]:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, temp_name(name))
        f = open(tmp, "xb", buffering=self.write_buffer)  # noqa: SIM115 - closed on every path below
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            if self.data_fault is not None:
                fault_point(self.data_fault)
            self._before_rename(tmp, path)
            os.replace(tmp, path)
        except BaseException:
            # On a full disk closing fails too (it flushes the buffer): the temp file must go regardless.
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        if sync:
            fsync_directory(directory)

    def copy(self, src: str, dst: str, *, sync: bool = True, size: int | None = None) -> None:
        directory, name = os.path.split(dst)
        tmp = os.path.join(directory, temp_name(name))
        try:
            # A hard link shares the already-durable bytes: no data is read or written again.
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, self.open_write(dst, sync=sync) as fout:
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
        if sync:
            fsync_directory(directory)

    def write_small(self, path: str, data: bytes, *, durable: bool = True, content: bool = True) -> None:
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, temp_name(name))
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                if durable and content:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        if durable:
            fsync_directory(directory)

    def sync(self, directory: str) -> None:
        fsync_directory(directory)

    def _before_rename(self, tmp: str, final: str) -> None:
        """Hook for failure-injection tests: called after the data is durable, before it is renamed."""


class _DeferredFile(io.RawIOBase):
    """Buffers a deferred write in memory until it outgrows :data:`SINGLE_PUT_LIMIT`, then becomes an
    upload (S3: a :class:`~.transfers.ConcurrentUpload`; elsewhere a file in an fsspec transaction);
    :meth:`finish` publishes it, :meth:`abandon` discards it."""

    def __init__(self, fs: AbstractFileSystem, path: str, limit: int) -> None:
        super().__init__()
        self.fs, self.path, self.limit = fs, path, limit
        self._buffer: io.BytesIO | None = io.BytesIO()
        self._file: Any = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._buffer is not None and self._buffer.tell() + len(view) <= self.limit:
            return self._buffer.write(view)
        if self._file is None:
            assert self._buffer is not None
            if is_s3(self.fs):
                # Parts go up several at a time, and only CompleteMultipartUpload publishes (see .transfers).
                self._file = ConcurrentUpload(self.fs, self.path)
                self._file.write(self._buffer.getbuffer())
                self._buffer = None
                return self._file.write(view)
            # In a transaction fsspec opens files with autocommit=False: s3fs (and gcsfs, adlfs) complete
            # the upload only on commit and abort it on discard; memory:// stores the file only on commit.
            self.fs.start_transaction()
            self._file = self.fs.open(self.path, "wb")
            self._file.write(self._buffer.getbuffer())
            self._buffer = None
        self._file.write(view)
        return len(view)

    def finish(self) -> None:
        fault_point("after-data-before-rename")
        if self._buffer is not None:
            # One request: visible whole or not at all (S3: a single PUT).
            self.fs.pipe_file(self.path, self._buffer.getvalue())
            return
        if isinstance(self._file, ConcurrentUpload):
            self._file.complete()  # the object appears
            return
        self._file.close()
        self.fs.end_transaction()  # the upload completes: the object appears

    def abandon(self) -> None:
        if self._file is None:
            return
        if isinstance(self._file, ConcurrentUpload):
            self._file.abort()  # waits for the parts in flight: none can land after the abort
            return
        _abandon(self._file)
        try:
            self.fs.transaction.complete(commit=False)  # an upload in progress is aborted
        finally:
            self.fs._transaction = None  # what fsspec's own transaction context does on exit


class DeferredCommit:
    """Write under the final name, published on success and discarded on error (see the module doc).

    The store gives this strategy a filesystem instance of its own, so no other writer's files are swept
    into (and committed or discarded with) our transactions.
    """

    renames = False

    def __init__(self, fs: AbstractFileSystem, single_put_limit: int = SINGLE_PUT_LIMIT) -> None:
        self.fs = fs
        self.single_put_limit = single_put_limit

    @contextlib.contextmanager
    def open_write(self, path: str, *, sync: bool = True) -> Iterator[IO[bytes]]:
        f = _DeferredFile(self.fs, path, self.single_put_limit)
        try:
            yield f  # type: ignore[misc]
        except BaseException:
            _abandon_keeping_the_error(f, path)
            raise
        try:
            f.finish()
        except BaseException:
            _abandon_keeping_the_error(f, path)
            raise

    def copy(self, src: str, dst: str, *, sync: bool = True, size: int | None = None) -> None:
        # The single-file primitive: a server-side copy on object stores (S3: one CopyObject, which
        # publishes atomically), without the glob and existence checks of ``fs.copy``.
        server_side_copy(self.fs, src, dst, size)

    def write_small(self, path: str, data: bytes, *, durable: bool = True, content: bool = True) -> None:
        # ``pipe_file`` sends a payload known up front as one request where the store has one (S3: a single
        # PUT, durable once acknowledged).
        self.fs.pipe_file(path, data)

    def sync(self, directory: str) -> None:
        """Nothing to do: an object is durable once its upload is acknowledged."""


def _abandon_keeping_the_error(f: _DeferredFile, path: str) -> None:
    """Abandon ``f`` after the error being raised; a failure to abort (often the same outage) is a warning,
    never the error the caller sees: the upload stays invisible either way."""
    try:
        f.abandon()
    except Exception as e:
        if not (isinstance(e, OSError) or is_storage_client_error(e)):
            raise
        log.warning(
            "could not abort the upload of %s (%s): its parts stay until the bucket's lifecycle rule for "
            "incomplete multipart uploads removes them",
            path,
            e,
        )


def _abandon(f: Any) -> None:
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
