"""One writer per checkpoint directory: a lock file with a lease, on any fsspec filesystem.

Two runs rotating checkpoints in one directory would delete each other's files, so a writer first creates
``genesis.lock`` in the directory, holding a random token, its host, PID namespace, PID and process start
time, and a heartbeat time. While it holds the lock it refreshes the heartbeat from a background thread every
``lease_s / 4`` seconds and before every commit, and each refresh first re-reads the file: if another run has
taken the lock over, the next commit raises :class:`StoreLockedError` instead of writing.

**When a lock is stale** (and a new run replaces it with a warning):

1. it was written on this machine (same host name and PID namespace) by a process that no longer runs, or
   whose PID now belongs to a process started at another time: stale at once;
2. it was written on another machine and its heartbeat is older than the lease it records (60 s by default);
3. it cannot be parsed (our writes are atomic, so such a file was damaged from outside).

Otherwise the lock is live and acquiring it raises :class:`StoreLockedError` naming the holder, when the lock
would expire, and what to do. Rule 2 compares this machine's clock with the holder's: the clocks must agree to
well within the lease.

How the lock file is created exclusively: on a local disk a complete temporary file is hard-linked to the lock
name (link(2) fails if the name exists, so readers never see a half-written lock); elsewhere fsspec's
``pipe_file(mode="create")`` (a conditional PUT on S3, atomic on ``memory://``). A backend that offers no
exclusive create falls back to write-then-read-back, which detects most races but not all.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from fsspec import AbstractFileSystem

from ._faults import fault_point
from .atomicity import RenameCommit, is_posix_local, temp_name
from .errors import StoreLockedError
from .manifest import LOCK_NAME

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

    def stale_reason(self, now: float) -> str | None:
        """Why this lock no longer protects a live writer, or None while it does (see the module doc)."""
        if self.on_this_machine():
            return None if _alive(self.pid, self.start) else f"process {self.pid} on this host has ended"
        age = now - self.heartbeat
        if age > self.lease_s:
            return f"its last heartbeat was {age:.0f} s ago, longer than its {self.lease_s:.0f} s lease"
        return None

    def describe(self, now: float) -> str:
        if not self.on_this_machine():
            who = f"pid {self.pid} on host {self.host}"
        else:
            who = "this process" if self.pid == os.getpid() else f"pid {self.pid} on this host"
        return f"{who}, heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"


class StoreLock:
    """The writer's lock on one directory. Thread-safe; :meth:`acquire` once, :meth:`release` once.

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
        self.local = is_posix_local(fs)
        self.fs = fs if self.local else type(fs)(skip_instance_cache=True, **fs.storage_options)
        self.path = f"{directory.rstrip('/')}/{LOCK_NAME}"
        self.directory = display
        self.display = f"{display.rstrip('/')}/{LOCK_NAME}"
        self.lease_s = lease_s
        self.info: LockInfo | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: StoreLockedError | None = None

    @property
    def held(self) -> bool:
        return self.info is not None

    # ------------------------------------------------------------------------------------ file I/O
    def _read(self) -> LockInfo | str | None:
        """The lock file's content, the reason it is unreadable, or None when there is no lock file."""
        try:
            with self.fs.open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return LockInfo.decode(data)
        except (ValueError, TypeError, KeyError) as e:
            return f"it cannot be parsed ({type(e).__name__})"

    def _create(self, data: bytes) -> None:
        """Create the lock file with ``data`` unless it exists (then ``FileExistsError``)."""
        if self.local:
            directory = os.path.dirname(self.path)
            tmp = os.path.join(directory, temp_name(LOCK_NAME))
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            return
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except (NotImplementedError, TypeError, ValueError):
            # No exclusive create on this backend: check, write, and let acquire() read it back.
            if self.fs.exists(self.path):
                raise FileExistsError(self.path) from None
            self.fs.pipe_file(self.path, data)

    def _overwrite(self, data: bytes) -> None:
        if self.local:
            with RenameCommit().open_write(self.path) as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.path, data)  # one PUT: readers see the old or the new content

    # ----------------------------------------------------------------------------------- lifecycle
    def acquire(self) -> None:
        """Create the lock, replacing a stale one with a warning.

        Raises:
            StoreLockedError: another live run holds the directory.
            OSError: the lock file cannot be written or read.
        """
        mine = LockInfo.mine(self.lease_s)
        with self._mutex:
            for _ in range(3):
                try:
                    self._create(mine.encode())
                    break
                except FileExistsError:
                    self._break_if_stale()
            else:
                raise StoreLockedError(
                    f"could not lock checkpoint directory {self.directory!r}: other runs keep taking the lock"
                )
            if (current := self._read()) != mine:
                raise StoreLockedError(
                    f"another run locked checkpoint directory {self.directory!r} at the same moment as this one"
                )
            self.info = mine
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="genesis-ckpt-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        log.debug("locked %s (%s)", self.display, current)

    def _break_if_stale(self) -> None:
        other = self._read()
        if other is None:
            return  # released meanwhile: try again
        now = time.time()
        reason = other if isinstance(other, str) else other.stale_reason(now)
        if reason is None:
            assert isinstance(other, LockInfo)
            remaining = max(other.lease_s - (now - other.heartbeat), 0.0)
            if not other.on_this_machine():
                expiry = f"if that run is dead, its lock counts as abandoned in {remaining:.0f} s"
            elif other.pid == os.getpid():
                expiry = "it is released when that fit ends (or by its store's release_lock())"
            else:
                expiry = f"it is released when process {other.pid} ends"
            raise StoreLockedError(
                f"checkpoint directory {self.directory!r} is in use by another run ({other.describe(now)}; "
                f"lock file {self.display}). Two runs writing to one directory would delete each other's "
                f"checkpoints. Stop the other run or give this one another dirpath; {expiry}, or delete the "
                f"lock file if you are sure that run is dead."
            )
        fault_point("lock-found-stale")
        log.warning("replacing the stale lock %s: %s", self.display, reason)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)

    def _refresh(self) -> None:
        """Re-read the lock; if it is still ours, write a new heartbeat. Raises if it was taken over."""
        with self._mutex:
            if self.info is None:
                return
            current = self._read()
            if not isinstance(current, LockInfo) or current.token != self.info.token:
                holder = current.describe(time.time()) if isinstance(current, LockInfo) else "nobody"
                self._lost = StoreLockedError(
                    f"this run lost its lock on {self.display!r} (now held by {holder}): another run judged it "
                    f"abandoned, e.g. after this process was paused for longer than the {self.lease_s:.0f} s "
                    f"lease. Stopping before the two runs delete each other's checkpoints."
                )
                raise self._lost
            self.info = LockInfo(**{**asdict(self.info), "heartbeat": time.time()})
            self._overwrite(self.info.encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self._refresh()
            except StoreLockedError:
                return  # remembered in self._lost; the next commit raises it
            except Exception as e:  # a heartbeat that fails now may succeed next time
                log.warning("could not refresh the lock %s: %s", self.display, e)

    def verify(self) -> None:
        """Refresh the heartbeat before a commit. Raises :class:`StoreLockedError` if the lock was lost.

        Only a lock that another run has taken over stops the commit; failing to read or write the lock file
        (a full disk, a network hiccup) is a warning, and the commit's own writes report the storage's state.
        """
        if self._lost is not None:
            raise self._lost
        try:
            self._refresh()
        except OSError as e:
            log.warning("could not refresh the lock %s: %s", self.display, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours. Never raises for I/O errors."""
        atexit.unregister(self.release)
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._mutex:
            info, self.info = self.info, None
            if info is None:
                return
            try:
                current = self._read()
                if isinstance(current, LockInfo) and current.token == info.token:
                    self.fs.rm_file(self.path)
            except OSError as e:
                log.warning(
                    "could not remove the lock %s: %s; the next run will find it stale", self.display, e
                )
