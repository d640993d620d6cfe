"""A checkpoint directory on one fsspec filesystem: its names and the primitive operations on its files.

The other storage modules work on a :class:`Location`; :class:`~.reader.StoreReader` and
:class:`~.store.CheckpointStore` are built on one. Nothing here knows the manifest, the lock or a commit
protocol: that keeps the layer free of call cycles (the transaction, recovery and the reader all call
down to here, never back up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from ..core.errors import is_storage_client_error
from ..core.names import DIRECTORY_RECORD, MANIFEST_NAME, is_temp_name
from ..core.records import Stamp
from . import backends, serialization
from .atomicity import CommitStrategy, fsync_directory, is_posix_local, makedirs, strategy_for, temp_name
from .backends import ObjectIO, object_io_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conduct:
    """How a kind of directory is treated.

    Attributes:
        rebuilds: a missing manifest next to checkpoint-like files means "rebuild it from them" (a
            checkpoint directory), rather than "no records yet" (any directory of the user's).
        sweeps: the holder of the lock lists the directory and removes what stopped writers left.
        adopts_standard_names: a rebuild also adopts files of the original Genesis utility under our
            standard names (files with no record of their own), as ``CheckpointManager`` does.
    """

    rebuilds: bool = True
    sweeps: bool = True
    adopts_standard_names: bool = False


class Location:
    """One directory on one filesystem (see the module doc).

    Args:
        url: the directory, a local path or an fsspec URL.
        storage_options: passed unchanged to fsspec (credentials, endpoint). Never written anywhere.
        conduct: how this kind of directory is treated.
        verbose: log one info line per save and per load.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        conduct: Conduct = Conduct(),
        *,
        verbose: bool = True,
    ) -> None:
        url = str(url)
        if not url.strip():
            raise ValueError("checkpoint directory must be a non-empty path or URL")
        self.fs: AbstractFileSystem
        # A filesystem instance of our own: fsspec transactions (how remote writes commit) are per instance.
        self.fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **dict(storage_options or {}))
        self.root: str = root.rstrip("/") or "/"
        self.url = url.rstrip("/") or url
        self.conduct = conduct
        self.verbose = verbose
        self.local = is_posix_local(self.fs)
        self.objects: ObjectIO = object_io_for(self.fs)
        self.commit_strategy: CommitStrategy = strategy_for(self.fs)
        self._dir_ready = False

    @property
    def identity(self) -> tuple[Any, ...]:
        """What names this directory for the writers of this process (see :mod:`.writers`)."""
        if self.local:
            return ("file", os.path.realpath(self.root))
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        options = self.fs.storage_options
        endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
        return (protocol, self.root, endpoint)

    # ----------------------------------------------------------------------------------------- names
    def path(self, name: str) -> str:
        """The filesystem path of ``name``; refuses any name that could leave the directory."""
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
            raise ValueError(
                f"invalid checkpoint file name {name!r}: it must be a plain file name inside {self.url!r}"
            )
        return f"{self.root}/{name}" if self.root != "/" else f"/{name}"

    def url_for(self, name: str) -> str:
        """The path or URL of ``name`` as a user would pass it back (protocol kept, local paths plain)."""
        path = self.path(name)
        return path if self.local else self.fs.unstrip_protocol(path)

    def name_of(self, path: str) -> str | None:
        """The name in this directory that ``path`` (a local path or a URL, as Lightning passes it) names."""
        name = path.rstrip("/").rsplit("/", 1)[-1]
        try:
            mine = self.path(name)
        except ValueError:
            return None
        if self.local and "://" not in path:
            return name if os.path.realpath(path) == os.path.realpath(mine) else None
        stripped: str = self.fs._strip_protocol(path)  # fsspec's own normalisation of its URLs
        return name if stripped.rstrip("/") == mine else None

    @property
    def manifest_path(self) -> str:
        return self.path(MANIFEST_NAME)

    @contextlib.contextmanager
    def storage_errors(self, what: str, name: str | None = None) -> Iterator[None]:
        """Turn an object-store client's own exception (botocore...) into an ``OSError`` naming the URL."""
        try:
            yield
        except Exception as e:
            if isinstance(e, OSError) or not is_storage_client_error(e):
                raise
            where = self.url if name is None else self.url_for(name)
            raise OSError(f"could not {what} {where}: {type(e).__name__}: {e}") from e

    # -------------------------------------------------------------------------------- what is there
    def list_entries(self) -> dict[str, bool]:
        """Every name in the directory and whether it is a directory, from one fresh listing (none cached:
        s3fs would otherwise answer later existence and size questions from this snapshot)."""
        with self.storage_errors("list"):
            try:
                entries = self.fs.ls(self.root, detail=True, refresh=True)
            except FileNotFoundError:
                return {}
            finally:
                self.fs.invalidate_cache(self.root)
        out = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e.get("type") == "directory" for e in entries}
        return dict(sorted(out.items()))

    def list_names(self) -> list[str]:
        """Every name in the directory, sorted, from a fresh listing."""
        return list(self.list_entries())

    def exists(self, name: str) -> bool:
        """Whether anything (file or directory) is there under ``name``."""
        with self.storage_errors("look up", name):
            return bool(self.fs.exists(self.path(name)))

    def is_tree(self, name: str) -> bool:
        """Whether ``name`` is a directory."""
        with self.storage_errors("look up", name):
            return bool(self.fs.isdir(self.path(name)))

    def is_directory(self) -> bool:
        """Whether the directory itself exists (an object store: whether any key is under it)."""
        with self.storage_errors("look up"):
            return bool(self.fs.isdir(self.root))

    def size(self, name: str) -> int:
        """The size in bytes of the file ``name``."""
        with self.storage_errors("look up", name):
            return int(self.fs.size(self.path(name)))

    def checksum(self, name: str) -> Stamp:
        """Size and crc32 of the file ``name`` as it is now (reads it)."""
        with self.storage_errors("read", name), self.fs.open(self.path(name), "rb") as f:
            return Stamp(*serialization.checksum_stream(f))

    def read_small(self, name: str) -> bytes | None:
        """The bytes of a small file (a marker, a directory's record), or None if it is not there."""
        with self.storage_errors("read", name):
            try:
                return bytes(self.fs.cat_file(self.path(name)))
            except FileNotFoundError:
                return None

    # ------------------------------------------------------------------------------------ changes
    def make_durable(self, name: str) -> None:
        """On a local disk, fsync the file ``name`` (its directory entry is the caller's: a directory fsync).
        Object stores: nothing to do, an object is durable once its upload was acknowledged."""
        if self.local:
            fd = os.open(self.path(name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def ensure_directory(self) -> None:
        """Create the directory if it is missing; a new local directory is made durable in its parent."""
        if self.local:
            makedirs(self.root)
            return
        # On object stores a directory is only a key prefix: "creating" it is a request (s3fs: HEAD bucket)
        # that proves nothing, so it is done once.
        if not self._dir_ready:
            with self.storage_errors("create"):
                self.fs.makedirs(self.root, exist_ok=True)
            self._dir_ready = True

    def ensure_writable(self) -> None:
        """Create the directory and prove a file can be written there; raise naming the path if not."""
        try:
            with self.storage_errors("write"):
                self.ensure_directory()
                probe = self.path(temp_name("write-probe"))
                self.commit_strategy.write_small(probe, b"ok", durable=False)
                self.fs.rm_file(probe)
        except OSError as e:
            client = e.__cause__ if e.__cause__ is not None and is_storage_client_error(e.__cause__) else None
            if client is not None:
                raise PermissionError(
                    f"checkpoint directory {self.url!r} cannot be reached ({type(client).__name__}: {client}); "
                    "check the URL and the credentials or endpoint in storage_options"
                ) from client
            raise type(e)(
                f"checkpoint directory {self.url!r} is not writable ({e.strerror or e}); "
                "choose a directory you can write to or fix its permissions"
            ) from e

    def discard(self, names: Iterable[str], what: str) -> list[str]:
        """Remove files after a commit or a failure (missing ones count as removed); returns those gone.

        Never raises: a file that cannot be removed is a warning naming ``what``, left for the next holder.
        """
        names = list(names)
        try:
            backends.remove_files(self.fs, [self.path(n) for n in names])
            return names
        except Exception as e:
            if not (isinstance(e, OSError) or is_storage_client_error(e)):
                raise
            log.warning("could not remove %s %s: %s", what, ", ".join(self.url_for(n) for n in names), str(e))
            return []

    def discard_tree(self, name: str) -> bool:
        """Remove the directory ``name`` and everything in it (a missing one counts); False on failure.

        Never half a tree under its name where that can be avoided: on a local disk the tree is first renamed
        to a temporary name (one atomic step; a crash leaves it whole, or swept as a temp). An object store
        removes its objects one batch at a time, so the tree's own record (``.genesis_record.json``) goes
        last: whatever a crash leaves still carries it and is recognised as the remains of the tree.
        """
        path = self.path(name)
        try:
            if self.local:
                if not is_temp_name(name):
                    aside = self.path(temp_name(name))
                    os.rename(path, aside)
                    # The rename must be durable before anything inside goes: a power cut could otherwise
                    # keep the unlinks and lose the rename, leaving a half-emptied tree under its own name
                    # that no longer carries the record proving it ours.
                    fsync_directory(os.path.dirname(aside))
                    path = aside
                shutil.rmtree(path)
            else:
                record = f"{path.rstrip('/')}/{DIRECTORY_RECORD}"
                found = [str(p) for p in self.fs.find(path, withdirs=False)]
                rest = [p for p in found if p != record]
                if rest:
                    self.fs.rm(rest)
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            if not (isinstance(e, OSError) or is_storage_client_error(e)):
                raise
            log.warning("could not remove %s: %s", self.url_for(name), str(e))
            return False
        finally:
            self.fs.invalidate_cache(self.path(name))
        return True

    @staticmethod
    def discard_local_tree(path: str) -> None:
        """Remove a local temporary tree; a failure is a warning (its temp name gets it swept later)."""
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", path, str(e))
