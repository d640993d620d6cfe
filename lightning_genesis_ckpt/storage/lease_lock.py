"""The lock on an object store, or any filesystem without ``flock``: a lease kept alive by conditional
writes (see :mod:`.lock` for the rules)."""

from __future__ import annotations

import logging
import time
from typing import Any

from fsspec import AbstractFileSystem

from ..core.errors import StoreLockedError
from ._faults import fault_point
from .atomicity import is_posix_local, is_s3
from .backends import Conflict, object_io_for
from .lock import DEFAULT_LEASE_S, LockInfo, StoreLock, parse

log = logging.getLogger(__name__)


class LeaseLock(StoreLock):
    """The lock on an object store (or any filesystem without ``flock``): a lease kept by conditional writes."""

    #: A check is a request (S3: HEAD): done before every manifest write, and at a transaction's start only
    #: when the manifest changed since this run last wrote it (a run that takes a stale lock over writes it).
    cheap_check = False

    def __init__(
        self, fs: AbstractFileSystem, directory: str, display: str, lease_s: float = DEFAULT_LEASE_S
    ):
        super().__init__(fs, directory, display, lease_s)
        # S3 requests go to the client directly, never into an fsspec transaction the writer has open, so the
        # heartbeat thread can share the store's instance (and its connections). Other backends write through
        # ``pipe_file``, which joins such a transaction: they get an instance of their own.
        shared = is_posix_local(fs) or is_s3(fs)
        self.fs = fs if shared else type(fs)(skip_instance_cache=True, **fs.storage_options)
        self.objects = object_io_for(self.fs)
        self._tag: Any = None
        self._renewed = 0.0

    def acquire(self) -> None:
        mine = LockInfo.mine(self.lease_s)
        with self._mutex:
            for _ in range(5):
                try:
                    self._tag = self.objects.create(self.path, mine.encode())
                    break
                except Conflict:
                    pass
                found = self.objects.read(self.path)
                if found is None:
                    continue  # released meanwhile: try again
                other = parse(found.data)
                reason = other if isinstance(other, str) else other.stale_reason(time.time())
                if reason is None:
                    assert isinstance(other, LockInfo)
                    raise self._refused(other)
                fault_point("lock-found-stale")
                try:
                    # Conditional on the stale version: of two runs breaking it, exactly one succeeds.
                    self._tag = self.objects.replace(self.path, mine.encode(), found.tag)
                except Conflict:
                    continue  # another run took it first: look again (it is live now)
                log.warning("replacing the stale lock %s: %s", self.display, reason)
                self.took_over = True
                break
            else:
                raise StoreLockedError(f"could not lock {self.directory!r}: other runs keep taking the lock")
            self.info = mine
            self._renewed = time.monotonic()
        self._started()
        log.debug("locked %s", self.display)

    def _check(self) -> None:
        if self.objects.tag(self.path) != self._tag:
            found = self.objects.read(self.path)
            raise self._lose(None if found is None else parse(found.data))

    def _heartbeat(self) -> None:
        assert self.info is not None
        info = self.info.beat()
        try:
            self._tag = self.objects.replace(self.path, info.encode(), self._tag)
        except Conflict:
            found = self.objects.read(self.path)
            raise self._lose(None if found is None else parse(found.data)) from None
        self.info = info
        self._renewed = time.monotonic()

    def _release(self) -> None:
        if self.objects.tag(self.path) == self._tag:
            self.fs.rm_file(self.path)
