"""The one writer of a directory in this process: its lock, its mutex and the manifest as last committed.

Every write goes through a :class:`~.transaction.Transaction`, and every transaction through the
:class:`DirectoryWriter` of its directory, which this module keeps in a registry by directory. So a second
writer in the process of a run that holds the lock (a ``tag_version`` from a callback, a
``CheckpointManager`` saving next to it, a background save) goes through the holder: it waits for the
holder's transaction in progress, uses the holder's lock, and commits on top of the manifest the holder
committed last. A writer without a holder in its process takes the lock for the duration of its transaction
(or, with :meth:`hold`, until it lets go), and is refused with :class:`StoreLockedError` while another
process holds it.

Taking the lock makes the writer the directory's *holder*, the only one that removes or rewrites anything
that is not its own new checkpoint: at once it settles what a writer that stopped left behind (see
:mod:`.recovery`) and writes the manifest if that changed anything, or if it took a stale lock over (so that
a paused former holder's manifest write, conditional on the version it read, is refused).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem

from ..core.manifest import Manifest
from ..core.records import Stamp
from . import recovery
from .atomicity import is_posix_local
from .lease_lock import LeaseLock
from .local_lock import FlockLock, flock_works
from .lock import DEFAULT_LEASE_S, StoreLock

if TYPE_CHECKING:
    from .location import Location

log = logging.getLogger(__name__)

_REGISTRY: dict[tuple[Any, ...], DirectoryWriter] = {}
_REGISTRY_MUTEX = threading.Lock()


@dataclass
class DirectoryWriter:
    """The state one process keeps about a directory it writes (see the module doc)."""

    key: tuple[Any, ...]
    mutex: threading.RLock = field(default_factory=threading.RLock)
    lock: StoreLock | None = None
    #: How many stores hold the lock beyond their transactions (``acquire_lock``); 0 for a one-off writer.
    holds: int = 0
    #: The manifest as last read or committed under the lock, and its version tag (an ETag...).
    manifest: Manifest | None = None
    tag: Any = None
    #: Files removed after a commit, whose ``deleting`` entries the next manifest write drops.
    cleared: dict[str, Stamp | None] = field(default_factory=dict)
    #: Names present in the directory when the lock was taken and not committed (None: never listed).
    unlisted: set[str] | None = None
    #: Names whose replacement a failed transaction left half-done: settled by the next one.
    unsettled: set[str] = field(default_factory=set)
    #: Whether :attr:`manifest` was read under the lock by the transaction's own acquisition just now.
    fresh: bool = False
    _local: threading.local = field(default_factory=threading.local)

    @property
    def in_transaction(self) -> bool:
        """Whether this thread is inside a transaction on this directory."""
        return bool(getattr(self._local, "depth", 0))

    def enter(self) -> None:
        if self.in_transaction:
            raise RuntimeError(
                "a transaction is already open on this checkpoint directory in this thread; commit it first"
            )
        self._local.depth = 1

    def leave(self) -> None:
        self._local.depth = 0

    def acquire(self, loc: Location, lease_s: float = DEFAULT_LEASE_S) -> list[str]:
        """Take the directory's lock and do the holder's start-up work (call with :attr:`mutex` held);
        returns the names that work removed."""
        assert self.lock is None
        loc.ensure_directory()
        lock = lock_for(loc.fs, loc.root, loc.url, lease_s)
        lock.acquire()
        self.lock = lock
        try:
            found = recovery.take_over(loc, lock)
        except BaseException:
            self.drop_lock()
            raise
        self.manifest, self.tag, self.unlisted = found.manifest, found.tag, found.unlisted
        self.fresh = True  # read under this lock just now: the first transaction need not read it again
        return found.removed

    def drop_lock(self) -> None:
        lock, self.lock = self.lock, None
        self.manifest, self.tag, self.unlisted = None, None, None
        self.cleared.clear()
        self.unsettled.clear()
        if lock is not None:
            lock.release()


def writer_for(loc: Location) -> DirectoryWriter:
    """The writer of ``store``'s directory in this process, registered if it was not yet."""
    with _REGISTRY_MUTEX:
        writer = _REGISTRY.get(loc.identity)
        if writer is None:
            writer = _REGISTRY[loc.identity] = DirectoryWriter(loc.identity)
        return writer


def holder_of(loc: Location) -> DirectoryWriter | None:
    """The writer of ``store``'s directory if a store in this process holds its lock right now."""
    with _REGISTRY_MUTEX:
        writer = _REGISTRY.get(loc.identity)
    return writer if writer is not None and writer.lock is not None else None


def forget(writer: DirectoryWriter) -> None:
    """Unregister a writer that holds no lock any more (call with its mutex held)."""
    with _REGISTRY_MUTEX:
        if writer.lock is None and writer.holds == 0 and _REGISTRY.get(writer.key) is writer:
            del _REGISTRY[writer.key]


def hold(loc: Location, lease_s: float = DEFAULT_LEASE_S) -> DirectoryWriter:
    """Hold the lock of ``store``'s directory until :func:`let_go` (see ``CheckpointStore.acquire_lock``)."""
    writer = writer_for(loc)
    with writer.mutex:
        if writer.lock is None:
            try:
                writer.acquire(loc, lease_s)
            except BaseException:
                forget(writer)
                raise
        writer.holds += 1
    return writer


def let_go(writer: DirectoryWriter) -> None:
    """End one :func:`hold`; the lock is released with the last one. Never raises for I/O errors."""
    with writer.mutex:
        writer.holds = max(0, writer.holds - 1)
        if writer.holds == 0:
            writer.drop_lock()
            forget(writer)


def held_directories() -> list[DirectoryWriter]:
    """The writers of this process that hold a lock right now."""
    with _REGISTRY_MUTEX:
        return [w for w in _REGISTRY.values() if w.lock is not None]


def refuse_if_lost(writer: DirectoryWriter) -> None:
    """Raise :class:`StoreLockedError` if this process's lock was taken over (the heartbeat noticed)."""
    if writer.lock is not None and writer.lock.lost is not None:
        raise writer.lock.lost


def lock_for(
    fs: AbstractFileSystem, directory: str, display: str, lease_s: float = DEFAULT_LEASE_S
) -> StoreLock:
    """The lock the filesystem's capabilities allow: ``flock`` on a local disk that supports it, else a lease."""
    if is_posix_local(fs) and flock_works(directory):
        return FlockLock(fs, directory, display, lease_s)
    return LeaseLock(fs, directory, display, lease_s)
