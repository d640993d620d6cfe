"""The lock on a local POSIX disk: ``flock`` on the open lock file for the lifetime of the run (see
:mod:`.lock` for the rules and why they are sound)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

from ..core.errors import StoreLockedError
from ..core.names import LOCK_NAME
from ._faults import fault_point
from .lock import LockInfo, StoreLock, parse

log = logging.getLogger(__name__)


class FlockLock(StoreLock):
    """The lock on a local POSIX disk: ``flock`` on the open lock file for the lifetime of the run."""

    _fd: int | None = None
    #: A check is a stat and a read of the held file: no reason not to do it at every transaction's start.
    cheap_check = True

    def acquire(self) -> None:
        import fcntl

        mine = LockInfo.mine(self.lease_s)
        with self._mutex:
            for _ in range(5):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    other = parse(_read_fd(fd))
                    os.close(fd)
                    if isinstance(other, LockInfo):
                        raise self._refused(other) from None
                    raise StoreLockedError(
                        f"checkpoint directory {self.directory!r} is in use by another run (lock file "
                        f"{self.display}, which {other}). Stop the other run or give this one another dirpath."
                    ) from None
                except BaseException:
                    os.close(fd)
                    raise
                try:
                    if not self._still_named(fd):
                        os.close(fd)  # the holder removed it as we opened it: take the new one
                        continue
                    self._take(fd, mine)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
                break
            else:
                raise StoreLockedError(f"could not lock {self.directory!r}: other runs keep taking the lock")
        self._started()

    def _still_named(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int, mine: LockInfo) -> None:
        old = _read_fd(fd)
        if old.strip():
            other = parse(old)
            if (
                isinstance(other, LockInfo)
                and not other.on_this_machine()
                and other.lease_expired(time.time()) is None
            ):
                # Another host refreshed it within its lease: its flock may simply not reach us (a mount
                # with host-local locks), so its heartbeat is what counts.
                raise self._refused(other)
            fault_point("lock-found-stale")
            if isinstance(other, str):
                reason = other
            elif other.on_this_machine():
                reason = f"process {other.pid} on this host has ended"
            else:
                reason = other.lease_expired(time.time()) or "its holder is gone"
            log.warning("replacing the stale lock %s: %s", self.display, reason)
            self.took_over = True
        # Not fsync'd: what the lock says matters only while its holder lives, and a power cut ends every
        # holder on this host; a lock file whose content was lost is judged stale like one naming a dead pid.
        _write_fd(fd, mine.encode())
        self.info = mine
        log.debug("locked %s", self.display)

    def _check(self) -> None:
        assert self._fd is not None and self.info is not None
        if not self._still_named(self._fd):
            raise self._lose(None)
        current = parse(_read_fd(self._fd))
        if not isinstance(current, LockInfo) or current.token != self.info.token:
            raise self._lose(current)

    def _heartbeat(self) -> None:
        assert self._fd is not None and self.info is not None
        self._check()
        self.info = self.info.beat()
        _write_fd(self._fd, self.info.encode())

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(StoreLockedError):
                self._fd = fd
                self._check()
                os.remove(self.path)  # while still locked: nobody can take a name we are removing
        finally:
            self._fd = None
            os.close(fd)


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 64 * 1024, 0)


def _write_fd(fd: int, data: bytes) -> None:
    # Padded to a fixed length and written in one call at offset 0: a reader never sees the end of an
    # older, longer content after a shorter one.
    padded = data.ljust(1024)
    os.pwrite(fd, padded, 0)
    os.ftruncate(fd, len(padded))


def flock_works(directory: str) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    probe = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        pass  # held by someone: flock works
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            log.warning("%s does not support flock: locking it with a lease instead", directory)
            return False
        raise
    finally:
        os.close(fd)
    return True
