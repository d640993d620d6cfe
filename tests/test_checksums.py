"""The checksum of a save reuses torch's record crcs, and is always the crc32 of the bytes in the file."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
import torch

from lightning_genesis_ckpt.storage import checksums, serialization


def test_crc32_combine_matches_zlib() -> None:
    rng = random.Random(0)
    for _ in range(100):
        a, b = os.urandom(rng.randint(0, 5000)), os.urandom(rng.randint(0, 5000))
        assert checksums.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


STATES = {
    "mixed": lambda: {
        "w": torch.randn(2**20),
        "idx": torch.arange(10),
        "half": torch.randn(3 * 2**19).half(),
        "text": "x" * 3_000_000,  # a pickle over the large-write threshold
    },
    "many": lambda: [torch.randn(300_000) for _ in range(20)],
    "one-big": lambda: {"big": torch.randn(4 * 2**20)},
    "views": lambda: {"t": torch.randn(1024, 2048)[:, ::2]},
}


@pytest.mark.parametrize("kind", list(STATES))
def test_dump_reuses_torch_crcs(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    with open(path, "wb", buffering=256 * 1024) as f:
        writer = checksums.ChecksumWriter(f, checksums.read_back_file(str(path)))
        torch.save(STATES[kind](), writer)
        writer.flush()
        writer.finish()
    data = path.read_bytes()
    assert writer.reused_zip_crcs  # no read-back was needed: torch's record crcs were taken
    assert (writer.size, writer.checksum) == (len(data), checksums.format_checksum(zlib.crc32(data)))
    with open(path, "wb") as f:  # dump, with the read-back, gives the same checksum
        assert serialization.dump(STATES[kind](), f, read_back=checksums.read_back_file(str(path)))[1] == (
            checksums.format_checksum(zlib.crc32(path.read_bytes()))
        )


@pytest.mark.parametrize(
    "tail",
    [
        b"no descriptor here, just bytes",  # not the zip layout
        b"PK\x07\x08\x00\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00 and more",  # sizes do not match
        b"",  # the stream ends inside the record
    ],
)
def test_foreign_layout_reads_the_file_back(tail: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    big = os.urandom(checksums.LARGE_WRITE + 5)
    with open(path, "wb") as f:
        writer = checksums.ChecksumWriter(f, checksums.read_back_file(str(path)))
        for piece in (b"head", big, tail, big, b"end"):
            writer.write(piece)
        writer.finish()
    data = path.read_bytes()
    assert not writer.reused_zip_crcs
    assert writer.checksum == checksums.format_checksum(zlib.crc32(data))


def test_a_wrong_crc_in_a_descriptor_is_taken_only_when_sizes_match(tmp_path: Path) -> None:
    # The descriptor's sizes are what proves it describes the record; a lying producer is not our threat
    # model (torch computes the crc over the very buffer it hands us), but a short stream must not pass.
    path = tmp_path / "x.bin"
    with open(path, "wb") as f:
        writer = checksums.ChecksumWriter(f, checksums.read_back_file(str(path)))
        writer.write(os.urandom(checksums.LARGE_WRITE))
        writer.write(b"PK\x07\x08")  # incomplete
        with pytest.raises(RuntimeError, match="finish"):
            _ = writer.checksum
        writer.finish()
    assert writer.checksum == checksums.format_checksum(zlib.crc32(path.read_bytes()))


def test_without_read_back_every_byte_is_checksummed(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    with open(path, "wb") as f:
        writer = checksums.ChecksumWriter(f)
        torch.save({"w": torch.randn(2**20)}, writer)
        writer.finish()
        writer.close()
    assert not writer.reused_zip_crcs
    assert writer.checksum == checksums.format_checksum(zlib.crc32(path.read_bytes()))


def test_the_fast_crc32_is_zlibs_crc32() -> None:
    """Whichever implementation is installed, the checksums are the ones zlib (and every manifest) computes."""
    data = os.urandom(3 * 2**20 + 17)
    assert checksums.crc32(data) == zlib.crc32(data)
    assert checksums.crc32(data[5:], 0x1234ABCD) == zlib.crc32(data[5:], 0x1234ABCD)
    assert checksums.crc32(memoryview(data)[:0], 99) == 99
