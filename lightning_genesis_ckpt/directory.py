"""Directory checkpoints: strategies that save one directory per checkpoint (FSDP sharded, DeepSpeed...).

A directory is committed like a file, by the manifest, and its record lists every file in it with size and
crc32 (:attr:`~.manifest.CheckpointRecord.files`). How it becomes visible depends on the filesystem:

* **Local POSIX disk** -- the strategy writes into a temporary sibling directory (our temp name, so the sweep
  at the next start removes what a killed writer left). Every file and sub-directory is fsync'd, the
  directory is renamed to its final name and the parent is fsync'd. Replacing a committed name swaps the two
  directories in one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it: readers see the old tree or the
  new one, never a mix. Elsewhere the old tree is first renamed aside, so a crash between the two renames
  leaves the name missing (resume skips it with a warning), still never a mix.
* **Object stores and memory://** (no rename) -- the strategy writes into a local staging directory that is
  then uploaded file by file under the final prefix; the manifest write is the commit point. The intent
  marker of :meth:`.CheckpointStore._publishing` proves the prefix ours, so a crash before the manifest
  write leaves an orphan that readers ignore and the next sweep removes. Replacing a committed name first
  un-commits and removes the old tree, so there is a window (the upload) in which that name is not
  committed at all: a crash there loses it, and resume uses the next candidate. Uploading over the old
  objects instead would leave a mix of old and new files behind a crash.

After a crash while a name was being replaced, the manifest lists it under ``replacing``, with the new tree's
record under ``incoming`` (a directory carries no record of its own, unlike a single file): the next reader
keeps the old record if the old tree is still in place and takes the new one if the exchange happened. A tree
that matches neither (only after the non-exchange fallback left the name absent, or damage from outside)
keeps the old record; verification fails and resume skips it with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import serialization
from ._faults import fault_point
from .atomicity import TMP_PREFIX, _fsync_dir, is_temp_name, temp_name
from .errors import CheckpointCorruptError
from .manifest import (
    LOCK_NAME,
    MANIFEST_NAME,
    CheckpointRecord,
    FileEntry,
    Manifest,
    role_of_name,
    tree_digest,
)

if TYPE_CHECKING:
    from .reader import StoreReader
    from .store import CheckpointStore

log = logging.getLogger(__name__)

Files = dict[str, FileEntry]


# ------------------------------------------------------------------------------------------ scanning
def scan_local(directory: str, *, fsync: bool) -> Files:
    """Size and crc32 of every file under a local ``directory`` (``fsync``: also make each durable).

    Raises:
        ValueError: the tree holds something other than plain files and directories (a symlink could point
            outside the checkpoint, and would not survive an upload), or no file at all.
    """
    files: Files = {}
    for current, dirs, names in os.walk(directory, topdown=False):
        for entry in [*dirs, *names]:
            full = os.path.join(current, entry)
            if os.path.islink(full) or not (os.path.isfile(full) or os.path.isdir(full)):
                raise ValueError(f"{full} is not a plain file or directory: a checkpoint cannot contain it")
        for entry in names:
            full = os.path.join(current, entry)
            with open(full, "rb") as f:
                size, checksum = serialization.checksum_stream(f)
                if fsync:
                    os.fsync(f.fileno())
            files[os.path.relpath(full, directory).replace(os.sep, "/")] = FileEntry(size, checksum)
        if fsync:  # bottom-up: a file's directory entry is durable before its parent's is
            _fsync_dir(current)
    if not files:
        raise ValueError(f"{directory} holds no files: nothing was written to commit")
    return files


def _listing(store: StoreReader, name: str) -> list[str]:
    """Relative paths of every file under ``name`` as the store sees them now (one listing on object stores)."""
    root = store.path(name)
    try:
        found = store.fs.find(root, withdirs=False)
    finally:
        store.fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    return sorted(p[len(prefix) :] for p in map(str, found) if p.startswith(prefix))


# ------------------------------------------------------------------------------------------ verifying
def verify(store: StoreReader, record: CheckpointRecord, sink_dir: str | None = None) -> None:
    """Check every file of a directory checkpoint; with ``sink_dir``, copy each one there while reading it.

    Each byte is read once: a remote tree is downloaded and verified in the same pass.

    Raises:
        FileNotFoundError: the directory or one of its files is missing (the message names it).
        CheckpointCorruptError: a file's size or checksum differs, or the directory holds files the
            manifest does not list (a mix of two trees).
    """
    assert record.files is not None
    display = store.url_for(record.name)
    present = _listing(store, record.name)
    if not present:
        raise FileNotFoundError(f"{display} is listed in the manifest but missing")
    extra = sorted(set(present) - set(record.files))
    if extra:
        raise CheckpointCorruptError(display, f"holds files the manifest does not list: {', '.join(extra)}")
    for rel, entry in sorted(record.files.items()):
        path = f"{store.path(record.name)}/{rel}"
        shown = f"{display}/{rel}"
        if rel not in present:
            raise FileNotFoundError(f"{shown} is missing from the directory checkpoint {display}")
        with contextlib.ExitStack() as stack:
            sink = None
            if sink_dir is not None:
                target = os.path.join(sink_dir, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                sink = stack.enter_context(open(target, "xb"))
            f = stack.enter_context(store.fs.open(path, "rb"))
            serialization.read_verified(f, shown, entry.size, entry.checksum, sink)


@contextlib.contextmanager
def local_copy(store: StoreReader, name: str) -> Iterator[str]:
    """A verified local path of the directory checkpoint ``name``, for the strategy's own loader.

    On a local disk it is the committed directory itself (verified first: one read of every file). On an
    object store the tree is downloaded, and verified in the same pass, into a local temporary directory
    that is removed when the block ends: the cost is one full download and as much free local disk as the
    checkpoint's size.

    Raises:
        FileNotFoundError: ``name`` is not committed, or a file is missing.
        IsADirectoryError: ``name`` is a single-file checkpoint (load it with ``load``).
        CheckpointCorruptError: a file is damaged.
    """
    record = store.manifest().get(name)
    if record is None:
        raise FileNotFoundError(f"{store.url_for(name)} is not a committed checkpoint of this store")
    if record.files is None:
        raise IsADirectoryError(
            f"{store.url_for(name)} is a single-file checkpoint, not a directory: load it with load()"
        )
    if store.local:
        verify(store, record)
        yield store.path(name)
        return
    staging = tempfile.mkdtemp(prefix="genesis-download-")
    try:
        start = time.perf_counter()
        verify(store, record, os.path.join(staging, name))
        log.debug("downloaded %s in %.2fs", store.url_for(name), time.perf_counter() - start)
        yield os.path.join(staging, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------ committing
class PendingDirectory:
    """A directory checkpoint being written: fill :attr:`path`, then :meth:`commit` (or :meth:`abort`).

    Made by :meth:`.CheckpointStore.begin_directory`. :attr:`path` is a local directory: on a local store a
    temporary sibling of the final name, elsewhere a staging directory in the system's temp dir.
    """

    def __init__(self, store: CheckpointStore, name: str) -> None:
        if name in (MANIFEST_NAME, LOCK_NAME) or is_temp_name(name):
            raise ValueError(f"{name!r} is reserved for the store's own files; choose another name")
        store.path(name)  # refuses names that could leave the directory
        self.store = store
        self.name = name
        self._start = time.perf_counter()
        store._ensure_dir()
        if store.local:
            self.path = store.path(temp_name(name))
            os.mkdir(self.path)
        else:
            self.path = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}staging-")

    def abort(self) -> None:
        """Remove what was written; nothing was committed."""
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, **fields: Any) -> CheckpointRecord:
        """Make the directory durable and commit it under its name (see the module doc for how).

        ``fields`` are the record's ``role``, ``epoch``, ``global_step``, ``metrics`` and ``monitor``.

        Raises:
            CheckpointSaveError: writing or publishing failed; nothing committed was touched.
            FileExistsError: something the manifest does not list already has this name.
        """
        from .store import human_size, library_versions

        store, name = self.store, self.name
        try:
            files = scan_local(self.path, fsync=store.local)
            fault_point("after-data-before-rename")
            with store._lock:
                store._check_lock()
                manifest = store.manifest()
                replacing = name in manifest.records
                if not replacing and store.fs.exists(store.path(name)):
                    raise FileExistsError(
                        f"{store.url_for(name)} exists but is not a committed checkpoint: move it away or "
                        "choose another name (the store never overwrites what it cannot prove its own)"
                    )
                size, checksum = tree_digest(files)
                record = CheckpointRecord(
                    name=name,
                    role=fields.get("role") or role_of_name(name),
                    size=size,
                    checksum=checksum,
                    created=time.time(),
                    seq=0,
                    epoch=fields.get("epoch"),
                    global_step=fields.get("global_step"),
                    metrics={str(k): float(v) for k, v in dict(fields.get("metrics") or {}).items()},
                    versions=library_versions(),
                    monitor=fields.get("monitor"),
                    files=files,
                )
                record = _publish(store, record, manifest, replacing, self.path)
        finally:
            if os.path.exists(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
        if store.verbose:
            log.info(
                "saved directory %s (%d files, %s in %.2fs)",
                store.url_for(name),
                len(files),
                human_size(record.size),
                time.perf_counter() - self._start,
            )
        return record


def _publish(
    store: CheckpointStore, record: CheckpointRecord, manifest: Manifest, replacing: bool, source: str
) -> CheckpointRecord:
    """Publish the local tree ``source`` as ``record.name`` and commit it (the store's lock is held)."""
    name = record.name
    final = store.path(name)
    old_aside: str | None = None
    try:
        if store.local:
            if replacing:
                # With the new tree's record: once the exchange below is on disk, the name holds a tree only
                # that record describes, and a crash before the commit must still find it (recovery.py).
                store._write_manifest(manifest.replacing_file(name, incoming=record))
            with store._publishing(name):
                old_aside = _swap_in(source, final) if replacing else None
                if not replacing:
                    os.rename(source, final)
                _fsync_dir(store.root)
        else:
            if replacing:
                # Un-commit first, so the prefix never holds a mix of two trees under a committed name.
                manifest = manifest.without([name])
                store._write_manifest(manifest)
                replacing = False  # from here on a failure leaves an uncommitted prefix, removed again
                store._remove_tree(name)
            with store._publishing(name):
                for rel in sorted(record.files or {}):
                    store.fs.put_file(os.path.join(source, *rel.split("/")), f"{final}/{rel}")
        fault_point("after-rename-before-manifest")
    except OSError as e:
        raise store._save_failed(name, e, replacing) from e
    record = record.with_changes(seq=manifest.next_seq)
    store._commit_record(record, manifest, replacing)
    store._retract(name)
    if old_aside is not None:
        try:
            shutil.rmtree(old_aside)
        except OSError as e:  # a temp name: the next sweep removes it
            log.warning("could not remove the replaced %s: %s", old_aside, e)
    return record


_RENAME_EXCHANGE = 2


def _swap_in(new: str, final: str) -> str:
    """Put ``new`` under the name ``final``, whose old tree ends under ``new``'s temp name; returns that.

    Linux's ``renameat2(RENAME_EXCHANGE)`` swaps both names in one atomic step. Without it (another OS, a
    filesystem that refuses the flag) the old tree is renamed aside first and the name is briefly absent.
    """
    renameat2: Callable[..., int] | None = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(final), _RENAME_EXCHANGE) == 0:
            return new
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), final)
    aside = os.path.join(os.path.dirname(final), temp_name(os.path.basename(final)))
    os.rename(final, aside)
    os.rename(new, final)
    return aside


def copy(store: CheckpointStore, src: CheckpointRecord, dst: str, role: str | None) -> CheckpointRecord:
    """Commit ``dst`` as a copy of the directory checkpoint ``src`` (hard links on a local disk).

    On object stores each file is copied server-side into a local-free commit: the tree is not downloaded.
    """
    record = src.with_changes(name=dst, role=role or role_of_name(dst))
    if store.local:
        pending = PendingDirectory(store, dst)
        try:
            for rel in sorted(src.files or {}):
                target = os.path.join(pending.path, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                source = os.path.join(store.path(src.name), *rel.split("/"))
                try:
                    os.link(source, target)  # shares the durable bytes: nothing is read or written again
                except OSError:
                    shutil.copyfile(source, target)
            return pending.commit(**_fields(record))
        finally:
            pending.abort()
    with store._lock:
        store._check_lock()
        manifest = store.manifest()
        if dst in manifest.records:
            manifest = manifest.without([dst])
            store._write_manifest(manifest)
            store._remove_tree(dst)
        try:
            with store._publishing(dst):
                for rel in sorted(src.files or {}):
                    store.fs.cp_file(f"{store.path(src.name)}/{rel}", f"{store.path(dst)}/{rel}")
            fault_point("after-rename-before-manifest")
        except OSError as e:
            raise store._save_failed(dst, e, False) from e
        record = record.with_changes(seq=manifest.next_seq, created=time.time())
        store._commit_record(record, manifest, False)
        store._retract(dst)
    return record


def _fields(record: CheckpointRecord) -> Mapping[str, Any]:
    return {
        "role": record.role,
        "epoch": record.epoch,
        "global_step": record.global_step,
        "metrics": record.metrics,
        "monitor": record.monitor,
    }


def matches(store: StoreReader, record: CheckpointRecord) -> bool:
    """Whether the directory checkpoint on the store still holds exactly the tree ``record`` describes."""
    try:
        verify(store, record)
    except (FileNotFoundError, CheckpointCorruptError):
        return False
    return True
