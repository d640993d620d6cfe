"""The crc32 of a checkpoint as it is written, at the cost of the bytes torch does not checksum itself.

torch's zip writer already computes the crc32 of every record it writes (each tensor's storage, the
pickle) and writes it into the record's *data descriptor*, the 16 or 24 bytes ``PK\\x07\\x08 crc size size``
that follow the record's bytes. :class:`ChecksumWriter` takes the crc32 of the whole file from those: for a
large write it waits for the descriptor that must follow, checks that the descriptor describes exactly the
bytes it was handed (signature and both sizes), and folds the record's crc into the running one with
:func:`crc32_combine`. Everything else (headers, descriptors, the central directory: kilobytes) is
checksummed directly. The profile showed that second crc32 pass as the largest cost of a save above the
durable floor (about a third of a 16 MiB save on two busy cores).

Where the stream does not look like that (another torch, ``compute_crc32`` off, a foreign producer), the
writer falls back to reading the file back once it is complete, so the checksum is always the crc32 of the
bytes in the file. Without a way to read the file back (an upload in progress) every byte is checksummed
as it passes, on a helper thread for large writes (zlib releases the GIL).
"""

from __future__ import annotations

import functools
import logging
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from . import progress

log = logging.getLogger(__name__)


def _fastest_crc32() -> Callable[..., int]:
    """ISA-L's crc32 when ``isal`` is installed (the same polynomial as zlib's, about 7x faster: hardware
    carry-less multiplication), else zlib's. Both release the GIL on large buffers."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.crc32
    fast: Callable[..., int] = isal_zlib.crc32
    return fast


#: ``crc32(data, value=0)`` as zlib defines it, from the fastest implementation installed (see above). Every
#: checksum of checkpoint bytes goes through it: a load verifies at the speed the bytes arrive.
crc32 = _fastest_crc32()

#: Writes at least this large are record payloads (their crc32 comes from the descriptor torch writes after
#: them), or, without a read-back, are checksummed on a helper thread while the bytes go to the file.
LARGE_WRITE = 1 << 20
_DESCRIPTOR = b"PK\x07\x08"
_POLY = 0xEDB88320  # crc32's reflected polynomial


def format_checksum(crc: int) -> str:
    """Render a crc32 value as it is stored in the manifest."""
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo crc32's polynomial (zlib's ``multmodp``, reflected bit order)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _powers() -> list[int]:
    # x^(2^k) mod p for k = 0..31: x2nmodp's table, as zlib builds it.
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _powers()


@functools.lru_cache(maxsize=1024)
def _x8nmodp(n: int) -> int:
    """x^(8n) mod p: the operator that appends ``n`` zero bytes (cached: tensors repeat their sizes)."""
    p = 1 << 31  # x^0
    k = 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The crc32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's ``crc32_combine``)."""
    return _multmodp(_x8nmodp(len2), crc1 & 0xFFFFFFFF) ^ (crc2 & 0xFFFFFFFF)


class ChecksumWriter:
    """A write-only file wrapper that counts the bytes and computes their crc32 (see the module doc).

    Args:
        raw: the file the bytes go to.
        read_back: when given, a function returning ``(size, crc32)`` of everything written so far, read
            from the file itself (after a flush). It enables taking torch's record crcs instead of computing
            them again; it is called only if the stream is not the zip layout expected.
    """

    def __init__(self, raw: IO[bytes], read_back: Callable[[], tuple[int, int]] | None = None) -> None:
        self._raw = raw
        self._read_back = read_back
        self.size = 0
        self._crc = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0  # length of a large write whose descriptor has not been seen yet
        self._after = bytearray()  # the bytes written after it, until the descriptor is complete
        self._fallback = False  # the stream did not follow the zip layout: read the file back at the end
        self._read_file = False  # finish() did
        #: The first error the underlying file raised. torch.save turns it into an unrelated RuntimeError
        #: ("unexpected pos ..."), so :func:`.serialization.dump` re-raises this one instead.
        self.error: OSError | None = None
        self._meter = progress.current()  # looked up once: a write pays one None check when there is none

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            if self._fallback:
                self._raw.write(view)
            elif self._read_back is not None:
                self._write_reusing(view)
            elif n >= LARGE_WRITE:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genesis-crc")
                pending = self._pool.submit(crc32, view, self._crc)
                try:
                    self._raw.write(view)
                finally:
                    # Always collect the crc before returning: ``view`` may not outlive this call.
                    self._crc = pending.result()
            else:
                self._crc = crc32(view, self._crc)
                self._raw.write(view)
        except OSError as e:
            self.error = self.error or e
            raise
        self.size += n
        if self._meter is not None:
            self._meter.add(n)
        return n

    def _write_reusing(self, view: memoryview) -> None:
        n = len(view)
        if self._pending:
            if n >= LARGE_WRITE:
                self._give_up("a large write with no data descriptor before it")
            else:
                self._after += view
                self._resolve()
        elif n >= LARGE_WRITE:
            self._pending = n
        else:
            self._crc = crc32(view, self._crc)
        self._raw.write(view)

    def _resolve(self) -> None:
        """Fold the pending record's crc (from its descriptor, once complete) into the running crc."""
        after, n = self._after, self._pending
        if len(after) < 16:
            return
        if after[:4] != _DESCRIPTOR:
            self._give_up("no data descriptor after a record")
            return
        crc, size32a, size32b = struct.unpack_from("<III", after, 4)
        if not (size32a == n and size32b == n):
            if len(after) < 24:
                return  # perhaps zip64's descriptor, with 8-byte sizes: wait for them
            if struct.unpack_from("<QQ", after, 8) != (n, n):
                self._give_up("a data descriptor that does not describe the record")
                return
        # The descriptor and whatever followed it are ordinary bytes of the file, checksummed in order.
        self._crc = crc32(after, crc32_combine(self._crc, crc, n))
        self._pending = 0
        self._after = bytearray()

    def _give_up(self, why: str) -> None:
        log.debug("checksumming by reading the file back: %s", why)
        self._fallback = True
        self._pending = 0
        self._after = bytearray()

    def flush(self) -> None:
        self._raw.flush()

    def finish(self) -> None:
        """Complete the checksum once everything is written (reads the file back if the layout required it)."""
        if self._pending:
            self._give_up("the stream ended inside a record")
        if self._fallback:
            assert self._read_back is not None
            self._raw.flush()
            size, self._crc = self._read_back()
            if size != self.size:
                raise OSError(f"the file holds {size} bytes after writing {self.size}")
            self._fallback = False
            self._read_file = True

    def close(self) -> None:
        """Stop the helper thread (the wrapped file is left open: its owner closes it)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def reused_zip_crcs(self) -> bool:
        """Whether the checksum came from torch's own record crcs (no fallback was needed)."""
        return self._read_back is not None and not (self._fallback or self._read_file)

    @property
    def checksum(self) -> str:
        if self._pending or self._fallback:
            raise RuntimeError("ChecksumWriter.finish() must be called before reading the checksum")
        return format_checksum(self._crc)


def read_back_file(path: str, chunk_size: int = 8 * 2**20) -> Callable[[], tuple[int, int]]:
    """A ``read_back`` for :class:`ChecksumWriter`: ``(size, crc32)`` of the local file at ``path``."""

    def read() -> tuple[int, int]:
        crc = size = 0
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                crc = crc32(chunk, crc)
                size += len(chunk)
        return size, crc

    return read
