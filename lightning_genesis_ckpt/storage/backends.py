"""What each kind of filesystem can do for the commit protocol, chosen by capability rather than class name.

The manifest and the lock are small objects that must be replaced *conditionally*: a write that succeeds only
if the object is still the one the writer read. That is what fences a writer that lost its lock (a paused
process, a VM frozen past its lease): its next manifest write fails instead of overwriting the new holder's.

* **S3** (any filesystem with s3fs's ``call_s3``): ``PutObject`` with ``If-Match: <ETag read>``, or
  ``If-None-Match: *`` to create; the server refuses with 412 when the object changed. s3fs passes these
  through as request parameters; the body and the ETag come from one ``GetObject``. Deletions are one
  ``DeleteObjects`` per 1000 keys.
* **Local POSIX disks**: the object is written to a temporary file, fsync'd and renamed over the target; right
  before the rename its identity (inode, size, mtime) is compared with what was read. That check and the
  rename are two steps, so on its own it would not fence another process; on a local disk the lock itself
  is held for the whole run (``flock``, see :mod:`.lock`), so no other process can be a writer there, and the
  check catches what an outside hand did (a manifest restored from a backup, a lock file deleted).
* **Everything else** (``memory://``, and backends without conditional writes): compare and write under a
  process-wide mutex. Exact for ``memory://``, which lives in one process; elsewhere it fences the writers
  of this process only, as documented in the design notes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec.asyn
from fsspec import AbstractFileSystem

from ..core.errors import store_answered
from ._faults import fault_point
from .atomicity import RenameCommit, fsync_directory, is_posix_local, is_s3, temp_name


class Conflict(Exception):
    """The object changed since it was read (or exists already, for a create)."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the tag that identifies this version of it (an ETag, an inode and mtime...)."""

    data: bytes
    tag: Any


class ObjectIO(Protocol):
    """Conditional access to small objects (the manifest, the lock)."""

    def read(self, path: str) -> Versioned | None:
        """The object and its tag, or None if there is none."""
        ...

    def tag(self, path: str) -> Any:
        """The object's current tag (one cheap request: a HEAD, a stat), None if there is none."""
        ...

    def create(self, path: str, data: bytes) -> Any:
        """Write ``data`` if there is no object yet; returns the new tag. Raises :class:`Conflict` otherwise."""
        ...

    def replace(self, path: str, data: bytes, tag: Any, *, fault: str | None = None) -> Any:
        """Write ``data`` if the object still has ``tag``; returns the new tag. Raises :class:`Conflict`.

        ``fault`` names the test-only kill point hit while the write is in flight.
        """
        ...


# -------------------------------------------------------------------------------------------------- S3
def _precondition_failed(error: BaseException) -> bool:
    return store_answered(error, ("PreconditionFailed", "ConditionalRequestConflict"), (409, 412))


class S3ObjectIO:
    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _key(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def read(self, path: str) -> Versioned | None:
        bucket, key = self._key(path)
        try:
            response = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        body = response["Body"]
        try:
            data = fsspec.asyn.sync(self.fs.loop, body.read)
        finally:
            body.close()
        return Versioned(bytes(data), response["ETag"])

    def tag(self, path: str) -> Any:
        bucket, key = self._key(path)
        try:
            return self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        except FileNotFoundError:
            return None

    def _put(self, path: str, data: bytes, **condition: str) -> Any:
        bucket, key = self._key(path)
        try:
            response = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except FileExistsError as e:  # s3fs's translation of a failed If-None-Match
            raise Conflict(path) from e
        except OSError as e:
            # If-Match on an object that is gone fails with 404: it changed too.
            if _precondition_failed(e) or (isinstance(e, FileNotFoundError) and "IfMatch" in condition):
                raise Conflict(path) from e
            raise
        finally:
            self.fs.invalidate_cache(path)
        return response["ETag"]

    def create(self, path: str, data: bytes) -> Any:
        return self._put(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, tag: Any, *, fault: str | None = None) -> Any:
        if fault is not None:
            fault_point(fault)  # one request: a kill can only come before it or after it
        return self._put(path, data, IfMatch=tag)


# ------------------------------------------------------------------------------------------ local disks
class LocalObjectIO:
    def read(self, path: str) -> Versioned | None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                return Versioned(f.read(), (st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            return None

    def tag(self, path: str) -> Any:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def create(self, path: str, data: bytes) -> Any:
        # A complete temporary file hard-linked to the name: link(2) fails if the name exists, so readers
        # never see a half-written object. The directory is fsync'd so that the new name (the commit point
        # of a first manifest) survives a power cut once this returns.
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, temp_name(os.path.basename(path)))
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise Conflict(path) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        fsync_directory(directory)
        return self.tag(path)

    def replace(self, path: str, data: bytes, tag: Any, *, fault: str | None = None) -> Any:
        commit = _CheckedRename(path, tag)
        with commit.open_write(path) as f:
            f.write(data[: len(data) // 2])
            if fault is not None:
                fault_point(fault)  # half the bytes are in the temp file: the target must stay whole
            f.write(data[len(data) // 2 :])
        return self.tag(path)


class _CheckedRename(RenameCommit):
    """A rename commit that refuses to replace ``path`` once it is no longer the version ``tag`` names."""

    def __init__(self, path: str, tag: Any) -> None:
        super().__init__()
        self.path, self.tag = path, tag
        self.data_fault = None  # the manifest is not a checkpoint's data: "mid-manifest" is its kill point

    def _before_rename(self, tmp: str, final: str) -> None:
        if LocalObjectIO().tag(self.path) != self.tag:
            raise Conflict(self.path)


# --------------------------------------------------------------------------------------- everything else
_MUTEX = threading.Lock()


def _content_tag(data: bytes) -> tuple[int, int]:
    return len(data), zlib.crc32(data)


class LockedObjectIO:
    def __init__(self, fs: AbstractFileSystem) -> None:
        self.fs = fs

    def read(self, path: str) -> Versioned | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return Versioned(data, _content_tag(data))

    def tag(self, path: str) -> Any:
        found = self.read(path)
        return None if found is None else found.tag

    def create(self, path: str, data: bytes) -> Any:
        with _MUTEX:
            if self.fs.exists(path):
                raise Conflict(path)
            self.fs.pipe_file(path, data)
        return _content_tag(data)

    def replace(self, path: str, data: bytes, tag: Any, *, fault: str | None = None) -> Any:
        with _MUTEX:
            if self.tag(path) != tag:
                raise Conflict(path)
            if fault is not None:
                fault_point(fault)
            self.fs.pipe_file(path, data)
        return _content_tag(data)


def object_io_for(fs: AbstractFileSystem) -> ObjectIO:
    """The conditional object access the filesystem's capabilities allow."""
    if is_posix_local(fs):
        return LocalObjectIO()
    if is_s3(fs):
        return S3ObjectIO(fs)
    return LockedObjectIO(fs)


# ------------------------------------------------------------------------------------------- deletions
def remove_files(fs: AbstractFileSystem, paths: Iterable[str]) -> None:
    """Remove files, in as few requests as the store allows (S3: one DeleteObjects per 1000 keys).

    A file already gone is not an error. Raises ``OSError`` if the store refused.
    """
    paths = list(paths)
    if not paths:
        return
    s3: Any = fs
    if is_s3(fs):
        bucket = s3.split_path(paths[0])[0]
        for i in range(0, len(paths), 1000):
            chunk = paths[i : i + 1000]
            objects = [{"Key": s3.split_path(p)[1]} for p in chunk]
            try:
                out = s3.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            finally:
                for p in chunk:
                    fs.invalidate_cache(p)
            errors = out.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"could not delete {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)
