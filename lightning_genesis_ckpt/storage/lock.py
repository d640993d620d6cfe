"""One writer per checkpoint directory: the lock file ``genesis.lock``, held for as long as a run writes.

Two runs rotating checkpoints in one directory would delete each other's files, so every writer (the callback,
``CheckpointManager``, versions, import, ``genesis.save``, ``genesis-ckpt prune``) takes this lock first; see
:mod:`.writers` for how writers of one process share it. The file holds a random token, the holder's host,
PID namespace, PID, process start time and a heartbeat time, so that a refusal can name the holder.

**Local POSIX disks** (:class:`~.local_lock.FlockLock`). The holder keeps the lock file open with ``flock(LOCK_EX)`` for
the whole run. The kernel decides who holds it: a live holder keeps it, even while it is stopped (SIGSTOP, a
VM freeze, a debugger), and a dead one loses it at once; of two runs racing for it exactly one gets it.
Nothing has to be judged from heartbeats or PIDs. The file is removed (while still locked) when the run ends;
a run that obtains the lock checks that the name still leads to the file it locked. Because a directory on a
network filesystem may be mounted with host-local ``flock`` (NFS ``local_lock``), the holder also writes
its heartbeat into the file, and a lock that another host's run refreshed within its lease is respected even
when ``flock`` succeeds.

**Object stores and everything else** (:class:`~.lease_lock.LeaseLock`). The lock is created with a conditional write
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

from ..core.errors import StoreLockedError, is_storage_client_error
from ..core.names import LOCK_NAME

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


def parse(data: bytes) -> LockInfo | str:
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
                log.warning("could not refresh the lock %s: %s", self.display, str(e))

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
