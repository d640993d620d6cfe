"""Encoding and decoding checkpoints: torch (or dill) pickles streamed through a checksum, and safe loading.

Nothing here opens files by name; the store hands in file objects (or, on local disk, a path that torch can
read fastest). Loading is weights-only unless the caller says the file is trusted.
"""

from __future__ import annotations

import io
import pickle
import re
import tempfile
from collections.abc import Callable
from typing import IO, Any, Literal

import torch

from ..core.errors import CheckpointCorruptError, UnsafeCheckpointError
from . import progress, safe_types
from .checksums import ChecksumWriter, crc32, format_checksum

__all__ = ["ChecksumWriter", "dump", "format_checksum", "load", "read_verified"]

Serializer = Literal["torch", "dill"]
MapLocation = Any  # whatever torch.load accepts as map_location

# Big enough that crc32 and the syscall per read are amortised; small enough not to matter for memory.
READ_CHUNK = 8 * 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"
#: A checkpoint read from a remote filesystem is buffered in memory up to this size (peak: the file plus
#: the loaded tensors), in an anonymous local temporary file above it (peak: the loaded tensors).
SPOOL_IN_MEMORY = 512 * 2**20


def _dill_by_reference() -> Any:
    """dill, as a ``pickle_module`` for ``torch.save``, pickling only the globals a function uses.

    By default dill pickles a function's whole global namespace: for a lambda in a script that imported this
    library from a source checkout (not site-packages), that drags the library's modules in by value, with
    the state of a save in progress (its lock's heartbeat thread: not picklable). ``recurse`` pickles what the
    function references, and nothing else.
    """
    import types

    import dill

    class Pickler(dill.Pickler):
        def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("recurse", True)
            super().__init__(file, *args, **kwargs)

    module = types.ModuleType("dill")  # torch reads the name (and records dill's version) to pick its paths
    module.Pickler = Pickler  # type: ignore[attr-defined]
    for name in ("Unpickler", "dump", "load", "__version__"):
        setattr(module, name, getattr(dill, name))
    return module


def _torch_writes_crcs() -> bool:
    try:
        from torch.utils.serialization import config
    except ImportError:  # pragma: no cover - a torch without the setting always writes them
        return True
    return bool(getattr(config.save, "compute_crc32", True))


def dump(
    obj: Any,
    fileobj: IO[bytes],
    serializer: Serializer = "torch",
    *,
    read_back: Callable[[], tuple[int, int]] | None = None,
) -> tuple[int, str]:
    """Serialize ``obj`` straight into ``fileobj``; returns ``(size, checksum)``.

    The serialized bytes are never held in a second in-memory buffer. ``read_back`` (local files: see
    :func:`.checksums.read_back_file`) lets the checksum reuse the crc32 torch computes for every record
    instead of a second pass over the bytes (see :mod:`.checksums`).

    Raises:
        OSError: writing to ``fileobj`` failed (disk full, I/O error): the file's own error, with its errno.
    """
    if serializer not in ("torch", "dill"):
        raise ValueError(f"serializer must be 'torch' or 'dill', got {serializer!r}")
    # torch writes each record's crc32 into the file only while its config says so.
    reuse = read_back is not None and _torch_writes_crcs()
    writer = ChecksumWriter(fileobj, read_back if reuse else None)
    try:
        if serializer == "dill":
            torch.save(obj, writer, pickle_module=_dill_by_reference())  # type: ignore[arg-type]
        else:
            torch.save(obj, writer)  # type: ignore[arg-type]
        writer.flush()
        writer.finish()
    except Exception:
        if writer.error is not None:  # the disk's error (ENOSPC, EIO), not torch's rewording of it
            raise writer.error from None
        raise
    finally:
        writer.close()
    return writer.size, writer.checksum


def checksum_stream(
    fileobj: IO[bytes], sink: IO[bytes] | None = None, chunk_size: int = READ_CHUNK
) -> tuple[int, str]:
    """Read a file object to its end, copying each chunk into ``sink`` if given; returns ``(size, checksum)``."""
    crc = 0
    size = 0
    meter = progress.current()
    while True:
        chunk = fileobj.read(chunk_size)
        if not chunk:
            break
        crc = crc32(chunk, crc)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
        if meter is not None:
            meter.add(len(chunk))
    return size, format_checksum(crc)


def check(display_path: str, size: int, checksum: str | None, want_size: int, want_checksum: str) -> None:
    """Raise CheckpointCorruptError if a file's size or checksum (None: not known yet) is not the recorded one."""
    if size != want_size:
        raise CheckpointCorruptError(
            display_path, f"{size} bytes on disk, the manifest recorded {want_size} (truncated?)"
        )
    if checksum is not None and checksum != want_checksum:
        raise CheckpointCorruptError(
            display_path, f"checksum {checksum} does not match the manifest's {want_checksum}"
        )


def spool(size: int) -> IO[bytes]:
    """A seekable scratch buffer for ``size`` bytes: memory up to ``SPOOL_IN_MEMORY``, else a local temp file.

    Loading a checkpoint from it then costs the loaded tensors plus at most ``SPOOL_IN_MEMORY`` bytes.
    """
    return io.BytesIO() if size <= SPOOL_IN_MEMORY else tempfile.TemporaryFile()


def read_verified(
    fileobj: IO[bytes],
    display_path: str,
    size: int,
    checksum: str,
    sink: IO[bytes] | None = None,
    chunk_size: int = READ_CHUNK,
) -> None:
    """Read ``fileobj`` once, checking its size and checksum; copy it into ``sink`` (rewound) if given.

    Raises:
        CheckpointCorruptError: size or checksum differ. A file object that knows its size up front
            (fsspec's remote files, from the HEAD sent when opening) fails before any data is read.
    """
    known = getattr(fileobj, "size", None)
    if isinstance(known, int):
        check(display_path, known, None, size, checksum)
    check(display_path, *checksum_stream(fileobj, sink, chunk_size), size, checksum)
    if sink is not None:
        sink.seek(0)


def _is_unsafe_error(exc: BaseException) -> bool:
    # torch's weights-only unpickler reports a forbidden class or callable as "Unsupported global".
    text = str(exc)
    return isinstance(exc, pickle.UnpicklingError) and (
        "Unsupported global" in text
        or "GLOBAL" in text
        or "not an allowed global" in text
        or "Can only build" in text  # an object of a class that is not allowed, built by the file
    )


def check_map_location(map_location: MapLocation) -> None:
    """Raise ``ValueError`` when ``map_location`` names a device this machine does not have.

    Checked before loading: otherwise torch's error would surface as "corrupt file", and a resume search
    would skip every (perfectly good) checkpoint and start from scratch.
    """
    if not isinstance(map_location, (str, torch.device)):
        return  # a dict or a callable: torch applies it per storage
    try:
        device = torch.device(map_location)
    except RuntimeError as e:
        raise ValueError(f"map_location={map_location!r} is not a device ({e})") from e
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if device.type not in ("cpu", "meta") and callable(is_available) and not is_available():
        raise ValueError(
            f"map_location={map_location!r}: no {device.type} device is available on this machine; "
            "load to 'cpu' instead"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"map_location={map_location!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def load(
    source: str | IO[bytes],
    display_path: str,
    *,
    map_location: MapLocation = "cpu",
    trusted: bool = False,
    serializer: Serializer | None = None,
    mmap: bool = False,
) -> Any:
    """Load a torch/dill checkpoint from a local path or a readable, seekable file object.

    Args:
        source: local path (fastest) or file object.
        display_path: the path or URL named in errors.
        map_location: passed to ``torch.load``; ``"cpu"`` makes GPU-saved files load anywhere.
        trusted: allow arbitrary pickled objects (may run code from the file). Required for dill files.
        serializer: ``"dill"`` to read a file saved with dill; None means torch's pickle.
        mmap: memory-map tensor storages instead of reading them (local paths only).

    Raises:
        UnsafeCheckpointError: the file needs code execution to load and ``trusted`` is False.
        CheckpointCorruptError: the file is damaged or not a torch checkpoint.
        ValueError: ``map_location`` names a device this machine does not have.
    """
    if serializer == "dill" and not trusted:
        raise UnsafeCheckpointError(display_path, "it was saved with dill")
    check_map_location(map_location)
    kwargs: dict[str, Any] = {"map_location": map_location, "weights_only": not trusted}
    if serializer == "dill":
        import dill

        kwargs["pickle_module"] = dill
    if mmap:
        kwargs["mmap"] = True
    # Weights-only loading also accepts the known-safe types of hyperparameters (paths, numpy, omegaconf,
    # imported dataclasses and enums): see safe_types. Nothing else, and nothing is imported for them.
    allowed = [] if trusted else safe_types.allowed_globals(source)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, **kwargs)
    except (UnsafeCheckpointError, CheckpointCorruptError):
        raise
    except Exception as e:
        if _is_unsafe_error(e) and _looks_like_pickle(source):
            raise UnsafeCheckpointError(display_path, _unsafe_detail(e)) from e
        raise CheckpointCorruptError(
            display_path, f"cannot be read as a torch checkpoint ({_first_line(e)})"
        ) from e


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _unsafe_detail(exc: BaseException) -> str:
    # torch's message is a paragraph of advice (with terminal escape codes); the forbidden name is the fact.
    m = _GLOBAL_RE.search(str(exc))
    if m is None:
        return _first_line(exc)
    name = m.group(1)
    if name.startswith("dill."):
        return f"it references {name}, i.e. it was saved with dill"
    # A dataclass or enum is allowed once its class is imported: say so, it is the usual fix.
    return (
        f"it references {name} (a dataclass or enum is accepted once its module is imported before loading)"
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # torch's weights-only failures open with a paragraph about its defaults; the cause comes after it.
    if lines and lines[0].startswith("Weights only load failed"):
        causes = [
            line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file"))
        ]
        lines = causes or lines
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _looks_like_pickle(source: str | IO[bytes]) -> bool:
    # A file that is neither a torch zip archive nor a pickle (torch's legacy format, or a bare pickle) is
    # damaged or foreign, never "unsafe": without this check random bytes would be reported as a security
    # refusal. A pickle starts with the PROTO opcode and a protocol number.
    if isinstance(source, str):
        with open(source, "rb") as f:
            head = f.read(4)
    else:
        source.seek(0)
        head = source.read(4)
    return head == ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
