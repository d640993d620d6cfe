"""Directory checkpoints: strategies that save one directory per checkpoint (FSDP sharded, DeepSpeed...).

A directory is committed like a file, by the manifest (see :mod:`.transaction`), and its record lists every
file in it with size and crc32 (:attr:`~.records.CheckpointRecord.files`). The directory also carries that
record itself, as ``.genesis_record.json``, so a lost manifest is rebuilt with it. How it becomes visible
depends on the filesystem:

* **Local POSIX disk** -- the strategy writes into a temporary sibling directory (our temp name, so a killed
  writer's leftovers are swept). Every file and sub-directory is fsync'd, then the directory is renamed to
  its final name. Replacing a committed name swaps the two directories in one
  ``renameat2(RENAME_EXCHANGE)`` where Linux offers it: readers see the old tree or the new one, never a mix,
  and a transaction that fails before its commit swaps them back. Elsewhere the old tree is first renamed
  aside, so a crash between the two renames leaves the name missing (resume skips it with a warning).
* **Object stores and memory://** (no rename) -- the strategy writes into a local staging directory that is
  uploaded file by file under the final prefix; the manifest write is the commit point, and the intent marker
  proves an uncommitted prefix ours. Replacing a committed name removes the old tree first (uploading over it
  would leave a mix of old and new files behind a crash): until the commit, that name's record fails
  verification and resume uses the next candidate; after a crash the holder adopts the new tree if it is
  complete (its marker holds its record).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from ..core.errors import CheckpointCorruptError
from ..core.names import DIRECTORY_RECORD, TMP_PREFIX, is_reserved
from ..core.records import CheckpointRecord, FileEntry, Stamp, tree_digest
from . import markers, serialization
from .atomicity import fsync_directory, temp_name
from .location import Location

log = logging.getLogger(__name__)

Files = dict[str, FileEntry]


# ------------------------------------------------------------------------------------------ scanning
def scan_local(directory: str, *, fsync: bool) -> Files:
    """Size and crc32 of every file under a local ``directory`` (``fsync``: also make each durable).

    The directory's own record file is not part of the listing.

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
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel == DIRECTORY_RECORD:
                continue
            with open(full, "rb") as f:
                size, checksum = serialization.checksum_stream(f)
                if fsync:
                    os.fsync(f.fileno())
            files[rel] = FileEntry(size, checksum)
        if fsync:  # bottom-up: a file's directory entry is durable before its parent's is
            fsync_directory(current)
    if not files:
        raise ValueError(f"{directory} holds no files: nothing was written to commit")
    return files


def is_tree(loc: Location, name: str) -> bool:
    """Whether ``name`` is a directory on the loc."""
    with loc.storage_errors("look up", name):
        return bool(loc.fs.isdir(loc.path(name)))


def _listing(loc: Location, name: str) -> list[str]:
    """Relative paths of every file under ``name`` as the store sees them now (one listing on object stores)."""
    root = loc.path(name)
    with loc.storage_errors("list", name):
        try:
            found = loc.fs.find(root, withdirs=False)
        finally:
            loc.fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    return sorted(p[len(prefix) :] for p in map(str, found) if p.startswith(prefix))


def read_record(loc: Location, name: str) -> bytes | None:
    """The record a directory checkpoint carries (``.genesis_record.json``), or None."""
    with loc.storage_errors("read", name):
        try:
            return bytes(loc.fs.cat_file(f"{loc.path(name)}/{DIRECTORY_RECORD}"))
        except FileNotFoundError:
            return None


def tree_stamp(loc: Location, name: str) -> Stamp:
    """The :func:`~.records.tree_digest` of the directory ``name`` as it is now (reads every file)."""
    files = {}
    for rel in _listing(loc, name):
        if rel == DIRECTORY_RECORD:
            continue
        with loc.storage_errors("read", name), loc.fs.open(f"{loc.path(name)}/{rel}", "rb") as f:
            files[rel] = FileEntry(*serialization.checksum_stream(f))
    if not files:
        raise FileNotFoundError(loc.url_for(name))
    return Stamp(*tree_digest(files))


def remains_of(loc: Location, name: str, stamp: Stamp) -> bool:
    """Whether the directory ``name`` is what is left of the tree ``stamp`` describes after a removal that
    stopped half-way: it still carries that tree's record (removed last), and every file left matches it."""
    data = read_record(loc, name)
    try:
        record = CheckpointRecord.from_json(json.loads(data)) if data is not None else None
    except (ValueError, TypeError, KeyError):
        return False
    if record is None or record.files is None or record.stamp != stamp:
        return False
    for rel in _listing(loc, name):
        if rel == DIRECTORY_RECORD:
            continue
        entry = record.files.get(rel)
        if entry is None:
            return False
        with loc.storage_errors("read", name), loc.fs.open(f"{loc.path(name)}/{rel}", "rb") as f:
            if FileEntry(*serialization.checksum_stream(f)) != entry:
                return False
    return True


# ------------------------------------------------------------------------------------------ verifying
def verify(loc: Location, record: CheckpointRecord, sink_dir: str | None = None) -> None:
    """Check every file of a directory checkpoint; with ``sink_dir``, copy each one there while reading it.

    Each byte is read once: a remote tree is downloaded and verified in the same pass.

    Raises:
        FileNotFoundError: the directory or one of its files is missing (the message names it).
        CheckpointCorruptError: a file's size or checksum differs, or the directory holds files the
            manifest does not list (a mix of two trees).
    """
    assert record.files is not None
    display = loc.url_for(record.name)
    present = [p for p in _listing(loc, record.name) if p != DIRECTORY_RECORD]
    if not present:
        raise FileNotFoundError(f"{display} is listed in the manifest but missing")
    extra = sorted(set(present) - set(record.files))
    if extra:
        raise CheckpointCorruptError(display, f"holds files the manifest does not list: {', '.join(extra)}")
    for rel, entry in sorted(record.files.items()):
        path = f"{loc.path(record.name)}/{rel}"
        shown = f"{display}/{rel}"
        if rel not in present:
            raise FileNotFoundError(f"{shown} is missing from the directory checkpoint {display}")
        with contextlib.ExitStack() as stack, loc.storage_errors("read", record.name):
            sink = None
            if sink_dir is not None:
                target = os.path.join(sink_dir, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                sink = stack.enter_context(open(target, "xb"))
            f = stack.enter_context(loc.fs.open(path, "rb"))
            serialization.read_verified(f, shown, entry.size, entry.checksum, sink)


@contextlib.contextmanager
def local_copy(loc: Location, record: CheckpointRecord) -> Iterator[str]:
    """A verified local path of the directory checkpoint ``record``, for the strategy's own loader.

    On a local disk it is the committed directory itself (verified first: one read of every file). On an
    object store the tree is downloaded, and verified in the same pass, into a local temporary directory
    that is removed when the block ends: the cost is one full download and as much free local disk as the
    checkpoint's size.

    Raises:
        FileNotFoundError: a file is missing.
        CheckpointCorruptError: a file is damaged.
    """
    if loc.local:
        verify_current(loc, record)
        yield loc.path(record.name)
        return
    staging = tempfile.mkdtemp(prefix="genesis-download-")
    try:
        verify_current(loc, record, os.path.join(staging, record.name))
        yield os.path.join(staging, record.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_current(loc: Location, record: CheckpointRecord, sink_dir: str | None = None) -> CheckpointRecord:
    """:func:`verify` ``record``'s tree, or the new tree its intent marker announces (a replacement in
    progress, or one a stopped writer did not commit: the holder settles it, a reader accepts it); returns
    the record the tree matched.

    Raises:
        FileNotFoundError, CheckpointCorruptError: the tree matches neither (``record``'s error).
    """
    try:
        verify(loc, record, sink_dir)
        return record
    except (CheckpointCorruptError, FileNotFoundError) as e:
        found = markers.read(loc, record.name)
        new = None if found is None else found.record
        if new is None or new.files is None or new.name != record.name:
            raise
        if sink_dir is not None:
            shutil.rmtree(sink_dir, ignore_errors=True)
        try:
            verify(loc, new, sink_dir)
        except (CheckpointCorruptError, FileNotFoundError):
            raise e from None
        return new


# ---------------------------------------------------------------------------------------- committing
class PendingDirectory:
    """A directory checkpoint being written: fill :attr:`path`, then commit it in a transaction
    (``tx.commit_directory(pending, ...)``), or :meth:`abort`.

    Made by :meth:`.CheckpointStore.begin_directory` (or a transaction's ``write_directory``). :attr:`path` is
    a local directory: on a local store a temporary sibling of the final name, elsewhere a staging directory
    in the system's temp dir.
    """

    def __init__(self, loc: Location, name: str) -> None:
        if is_reserved(name):
            raise ValueError(f"{name!r} is reserved for the store's own files; choose another name")
        loc.path(name)  # refuses names that could leave the directory
        self.name = name
        self._handed_over = False
        self._local = loc.local
        loc.ensure_directory()
        if loc.local:
            self.path = loc.path(temp_name(name))
            os.mkdir(self.path)
        else:
            self.path = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}staging-")

    def hand_over(self) -> None:
        """Called once the tree is in place: on a local disk :attr:`path` is then the published tree's old
        name, which holds the tree it replaced (if any). That tree belongs to the transaction: removed only
        after the commit is durable, swapped back if the transaction aborts."""
        self._handed_over = self._local

    def abort(self) -> None:
        """Remove what was written and not committed (a no-op once the tree was handed over)."""
        if not self._handed_over:
            shutil.rmtree(self.path, ignore_errors=True)


def seal(loc: Location, path: str, record: CheckpointRecord) -> CheckpointRecord:
    """Make the tree at the local ``path`` durable and describe it: ``record`` with its files, size and
    checksum, also written into the tree as its own record."""
    files = scan_local(path, fsync=loc.local)
    size, checksum = tree_digest(files)
    record = record.with_changes(files=files, size=size, checksum=checksum)
    with open(os.path.join(path, DIRECTORY_RECORD), "w") as f:
        json.dump(record.to_json(), f, sort_keys=True, allow_nan=False)
        if loc.local:
            f.flush()
            os.fsync(f.fileno())
    if loc.local:
        fsync_directory(path)
    return record


def put_in_place(loc: Location, path: str, name: str, replaced: bool) -> str | None:
    """Publish the sealed local tree ``path`` under ``name``; returns where the replaced tree now is (a
    local temporary name, removed after the commit), if it was kept."""
    final = loc.path(name)
    if loc.local:
        aside = _swap_in(path, final) if replaced else None
        if not replaced:
            os.rename(path, final)
        return aside
    if replaced:
        loc.discard_tree(name)
    for current, _, names in os.walk(path):
        for entry in names:
            rel = os.path.relpath(os.path.join(current, entry), path).replace(os.sep, "/")
            with loc.storage_errors("upload", name):
                loc.fs.put_file(os.path.join(current, entry), f"{final}/{rel}")
    return None


def copy_into_place(
    loc: Location, source: CheckpointRecord, record: CheckpointRecord, replaced: bool
) -> str | None:
    """Publish a copy of the committed directory ``source`` as ``record.name`` (hard links on a local disk,
    server-side copies on an object store: the tree is not downloaded)."""
    assert source.files is not None
    if loc.local:
        staged = loc.path(temp_name(record.name))
        os.mkdir(staged)
        try:
            for rel in sorted(source.files):
                target = os.path.join(staged, *rel.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                origin = os.path.join(loc.path(source.name), *rel.split("/"))
                try:
                    os.link(origin, target)  # shares the durable bytes: nothing is read or written again
                except OSError:
                    shutil.copyfile(origin, target)
            seal(loc, staged, record)
            return put_in_place(loc, staged, record.name, replaced)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    if replaced:
        loc.discard_tree(record.name)
    with loc.storage_errors("copy", record.name):
        for rel in sorted(source.files):
            loc.fs.cp_file(f"{loc.path(source.name)}/{rel}", f"{loc.path(record.name)}/{rel}")
        data = json.dumps(record.to_json(), sort_keys=True, allow_nan=False).encode()
        loc.fs.pipe_file(f"{loc.path(record.name)}/{DIRECTORY_RECORD}", data)
    return None


def swap_back(loc: Location, name: str, aside: str) -> None:
    """Undo :func:`put_in_place` of a replacement on a local disk: the old tree goes back under ``name``."""
    final = loc.path(name)
    if os.path.exists(final):
        _swap_in(aside, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(aside, final)
    fsync_directory(loc.root)


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
