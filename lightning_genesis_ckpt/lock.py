"""One writer per checkpoint directory: the lock file ``genesis.lock``, held for as long as a run writes.

Two runs rotating checkpoints in one directory would delete each other's files, so every writer (the callback,
``CheckpointManager``, versions, import, ``genesis.save``, ``genesis-ckpt prune``) takes this lock first; see
:mod:`.writers` for how writers of one process share it. The file holds a random token, the holder's host,
PID namespace, PID, process start time and a heartbeat time, so that a refusal can name the holder.

**Local POSIX disks** (:class:`FlockLock`). The holder keeps the lock file open with ``flock(LOCK_EX)`` for
the whole run. The kernel decides who holds it: a live holder keeps it, even while it is stopped (SIGSTOP, a
VM freeze, a debugger), and a dead one loses it at once; of two runs racing for it exactly one gets it.
Nothing has to be judged from heartbeats or PIDs. The file is removed (while still locked) when the run ends;
a run that obtains the lock checks that the name still leads to the file it locked. Because a directory on a
network filesystem may be mounted with host-local ``flock`` (NFS ``local_lock``), the holder also writes
its heartbeat into the file, and a lock that another host's run refreshed within its lease is respected even
when ``flock`` succeeds.

**Object stores and everything else** (:class:`LeaseLock`). The lock is created with a conditional write
(S3: ``If-None-Match: *``) and kept alive by a heartbeat every ``lease_s / 4``, each one a conditional
replace of the version written last (S3: ``If-Match``): if another run took the lock over, the heartbeat
fails and this run knows. A lock is **stale** (and replaced with a warning) when

1. it was written on this machine (same host name and PID namespace) by a process that no longer runs, or
   whose PID now belongs to a process started at another time;
2. it was written on another machine and its heartbeat is older than the lease it records (60 s by default);
   the clocks must agree to well within the lease;
3. it cannot be parsed (our writes are atomic, so such a file was damaged from outside).

Breaking a stale lock is itself a conditional replace of the stale version, so of two runs that found it
stale exactly one takes it over; the other finds a live lock and is refused. The new holder then writes the
manifest once before anything else (:mod:`.writers`), so that the manifest write a paused former holder
still has in flight is refused by the store (it is conditional on the version that writer read).

Every commit calls :meth:`StoreLock.check` immediately before its manifest write: it re-reads the lock (a
stat and a read of the held file locally, a HEAD on S3) and raises :class:`StoreLockedError` if the lock is
no longer this run's.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

from fsspec import AbstractFileSystem

from ._faults import fault_point
from .atomicity import is_posix_local, is_s3
from .backends import Conflict, object_io_for
from .errors import StoreLockedError, is_storage_client_error
from .names import LOCK_NAME

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 60.0


def _pid_namespace() -> int | None:
    # Containers on one host may share a host name but not PIDs: a PID means something only in its namespace.
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """Process start time in clock ticks since boot (Linux), to tell a live holder from a reused PID."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now_start = _start_time(pid)
    return start is None or now_start is None or now_start == start


@dataclass(frozen=True)
class LockInfo:
    """The content of a lock file."""

    token: str
    host: str
    pidns: int | None
    pid: int
    start: int | None
    acquired: float
    heartbeat: float
    lease_s: float

    @classmethod
    def mine(cls, lease_s: float) -> LockInfo:
        now = time.time()
        pid = os.getpid()
        return cls(
            uuid.uuid4().hex, socket.gethostname(), _pid_namespace(), pid, _start_time(pid), now, now, lease_s
        )

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> LockInfo:
        """Raises ``ValueError``/``TypeError``/``KeyError`` for anything that is not a lock file of ours."""
        d: dict[str, Any] = json.loads(data.decode())
        return cls(
            token=str(d["token"]),
            host=str(d["host"]),
            pidns=None if d["pidns"] is None else int(d["pidns"]),
            pid=int(d["pid"]),
            start=None if d["start"] is None else int(d["start"]),
            acquired=float(d["acquired"]),
            heartbeat=float(d["heartbeat"]),
            lease_s=float(d["lease_s"]),
        )

    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.pidns == _pid_namespace()

    def lease_expired(self, now: float) -> str | None:
        age = now - self.heartbeat
        if age > self.lease_s:
            return f"its last heartbeat was {age:.0f} s ago, longer than its {self.lease_s:.0f} s lease"
        return None

    def stale_reason(self, now: float) -> str | None:
        """Why this lock no longer protects a live writer, or None while it does (see the module doc)."""
        if self.on_this_machine():
            return None if _alive(self.pid, self.start) else f"process {self.pid} on this host has ended"
        return self.lease_expired(now)

    def describe(self, now: float) -> str:
        if not self.on_this_machine():
            who = f"pid {self.pid} on host {self.host}"
        else:
            who = "this process" if self.pid == os.getpid() else f"pid {self.pid} on this host"
        return f"{who}, heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"

    def beat(self) -> LockInfo:
        return replace(self, heartbeat=time.time())


def _parse(data: bytes) -> LockInfo | str:
    try:
        return LockInfo.decode(data)
    except (ValueError, TypeError, KeyError) as e:
        return f"it cannot be parsed ({type(e).__name__})"


class StoreLock:
    """The writer's lock on one directory. :meth:`acquire` once, :meth:`release` once; thread-safe.

    Args:
        fs: the directory's filesystem. Remote backends get a private instance of it, so that the heartbeat
            thread never joins an fsspec transaction the writer has open.
        directory: the directory's path on ``fs``.
        display: the directory's path or URL, as named in messages.
        lease_s: how long after the last heartbeat another machine may consider the lock abandoned.
    """

    def __init__(
        self, fs: AbstractFileSystem, directory: str, display: str, lease_s: float = DEFAULT_LEASE_S
    ):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s!r}")
        self.path = f"{directory.rstrip('/')}/{LOCK_NAME}"
        self.directory = display
        self.display = f"{display.rstrip('/')}/{LOCK_NAME}"
        self.lease_s = lease_s
        self.info: LockInfo | None = None
        self.cheap_check = False
        #: Whether acquiring replaced a stale lock: the new holder must then fence the old one out.
        self.took_over = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: StoreLockedError | None = None

    @property
    def held(self) -> bool:
        return self.info is not None

    @property
    def lost(self) -> StoreLockedError | None:
        """The error to raise if the heartbeat found the lock taken over, else None."""
        return self._lost

    # --------------------------------------------------------------------------- for the subclasses
    def _refused(self, other: LockInfo) -> StoreLockedError:
        now = time.time()
        remaining = max(other.lease_s - (now - other.heartbeat), 0.0)
        if not other.on_this_machine():
            expiry = f"if that run is dead, its lock counts as abandoned in {remaining:.0f} s"
        elif other.pid == os.getpid():
            expiry = "it is released when that fit ends (or by its store's release_lock())"
        else:
            expiry = f"it is released when process {other.pid} ends"
        return StoreLockedError(
            f"checkpoint directory {self.directory!r} is in use by another run ({other.describe(now)}; "
            f"lock file {self.display}). Two runs writing to one directory would delete each other's "
            f"checkpoints. Stop the other run or give this one another dirpath; {expiry}."
        )

    def _lose(self, holder: LockInfo | str | None) -> StoreLockedError:
        who = holder.describe(time.time()) if isinstance(holder, LockInfo) else "nobody"
        self._lost = StoreLockedError(
            f"this run lost its lock on {self.display!r} (now held by {who}): another run judged it "
            f"abandoned, e.g. after this process was paused for longer than the {self.lease_s:.0f} s "
            f"lease. Stopping before the two runs delete each other's checkpoints."
        )
        return self._lost

    def _started(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="genesis-ckpt-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                with self._mutex:
                    if self.info is not None:
                        self._heartbeat()
            except StoreLockedError:
                return  # remembered in self._lost; the next commit raises it
            except Exception as e:  # a heartbeat that fails now may succeed next time
                if not (isinstance(e, OSError) or is_storage_client_error(e)):
                    raise
                log.warning("could not refresh the lock %s: %s", self.display, e)

    # ------------------------------------------------------------------------------------ the protocol
    def acquire(self) -> None:
        """Take the lock, replacing a stale one with a warning.

        Raises:
            StoreLockedError: another live run holds the directory.
            OSError: the lock file cannot be written or read.
        """
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`StoreLockedError` unless the lock is still this run's: called right before every
        manifest write. Failing to *read* the lock (a network hiccup) is raised as the ``OSError`` it is."""
        if self._lost is not None:
            raise self._lost
        with self._mutex:
            if self.info is None:
                raise StoreLockedError(f"this run does not hold the lock {self.display!r}")
            self._check()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours. Never raises for I/O errors."""
        atexit.unregister(self.release)
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._mutex:
            if self.info is None:
                return
            try:
                self._release()
            except Exception as e:
                if not (isinstance(e, OSError) or is_storage_client_error(e)):
                    raise
                log.warning(
                    "could not remove the lock %s: %s; the next run will find it stale", self.display, e
                )
            finally:
                self.info = None

    def _check(self) -> None:
        raise NotImplementedError

    def _heartbeat(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


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
                    other = _parse(_read_fd(fd))
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
            other = _parse(old)
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
        _write_fd(fd, mine.encode())
        os.fsync(fd)
        self.info = mine
        log.debug("locked %s", self.display)

    def _check(self) -> None:
        assert self._fd is not None and self.info is not None
        if not self._still_named(self._fd):
            raise self._lose(None)
        current = _parse(_read_fd(self._fd))
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
                other = _parse(found.data)
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
            raise self._lose(None if found is None else _parse(found.data))

    def _heartbeat(self) -> None:
        assert self.info is not None
        info = self.info.beat()
        try:
            self._tag = self.objects.replace(self.path, info.encode(), self._tag)
        except Conflict:
            found = self.objects.read(self.path)
            raise self._lose(None if found is None else _parse(found.data)) from None
        self.info = info
        self._renewed = time.monotonic()

    def _release(self) -> None:
        if self.objects.tag(self.path) == self._tag:
            self.fs.rm_file(self.path)


def lock_for(
    fs: AbstractFileSystem, directory: str, display: str, lease_s: float = DEFAULT_LEASE_S
) -> StoreLock:
    """The lock the filesystem's capabilities allow: ``flock`` on a local disk that supports it, else a lease."""
    if is_posix_local(fs) and _flock_works(directory):
        return FlockLock(fs, directory, display, lease_s)
    return LeaseLock(fs, directory, display, lease_s)


def _flock_works(directory: str) -> bool:
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
