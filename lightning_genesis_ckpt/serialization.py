"""Encoding and decoding checkpoints: torch (or dill) pickles streamed through a checksum, and safe loading.

Nothing here opens files by name; the store hands in file objects (or, on local disk, a path that torch can
read fastest). Loading is weights-only unless the caller says the file is trusted.
"""

from __future__ import annotations

import pickle
import re
import zlib
from typing import IO, Any, Literal

import torch

from .errors import CheckpointCorruptError, UnsafeCheckpointError

Serializer = Literal["torch", "dill"]
MapLocation = Any  # whatever torch.load accepts as map_location

# Big enough that crc32 and the syscall per read are amortised; small enough not to matter for memory.
READ_CHUNK = 8 * 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"


def format_checksum(crc: int) -> str:
    """Render a crc32 value as it is stored in the manifest."""
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


class ChecksumWriter:
    """A write-only file wrapper that counts bytes and computes crc32 in the same pass as the write.

    torch.save writes each tensor's bytes in one call, so the checksum costs no extra copy or read.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.size = 0
        self._crc = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._crc = zlib.crc32(view, self._crc)
        self._raw.write(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._raw.flush()

    @property
    def checksum(self) -> str:
        return format_checksum(self._crc)


def dump(obj: Any, fileobj: IO[bytes], serializer: Serializer = "torch") -> tuple[int, str]:
    """Serialize ``obj`` straight into ``fileobj``; returns ``(size, checksum)``.

    The serialized bytes are never held in a second in-memory buffer.
    """
    writer = ChecksumWriter(fileobj)
    if serializer == "torch":
        torch.save(obj, writer)  # type: ignore[arg-type]
    elif serializer == "dill":
        import dill

        torch.save(obj, writer, pickle_module=dill)  # type: ignore[arg-type]
    else:
        raise ValueError(f"serializer must be 'torch' or 'dill', got {serializer!r}")
    writer.flush()
    return writer.size, writer.checksum


def checksum_stream(fileobj: IO[bytes]) -> tuple[int, str]:
    """Read a file object to its end; returns ``(size, checksum)``."""
    crc = 0
    size = 0
    while True:
        chunk = fileobj.read(READ_CHUNK)
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return size, format_checksum(crc)


def _is_unsafe_error(exc: BaseException) -> bool:
    # torch's weights-only unpickler reports a forbidden class or callable as "Unsupported global".
    text = str(exc)
    return isinstance(exc, pickle.UnpicklingError) and (
        "Unsupported global" in text or "GLOBAL" in text or "not an allowed global" in text
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
    try:
        return torch.load(source, **kwargs)
    except (UnsafeCheckpointError, CheckpointCorruptError):
        raise
    except Exception as e:
        if _is_unsafe_error(e) and _looks_like_zip(source):
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
    return f"it references {name}" + (", i.e. it was saved with dill" if name.startswith("dill.") else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _looks_like_zip(source: str | IO[bytes]) -> bool:
    # A file that is not even a zip archive is damaged or foreign, never "unsafe": without this check
    # random bytes would be reported as a security refusal.
    if isinstance(source, str):
        with open(source, "rb") as f:
            head = f.read(4)
    else:
        source.seek(0)
        head = source.read(4)
    return head == ZIP_MAGIC
