"""The local rename commit: temp file beside the target, old content intact on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_genesis_ckpt.core.names import TMP_PREFIX
from lightning_genesis_ckpt.storage.atomicity import RenameCommit, makedirs


class Recording(RenameCommit):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, bytes, bytes]] = []

    def _before_rename(self, tmp: str, final: str) -> None:
        with open(tmp, "rb") as f:
            tmp_data = f.read()
        with open(final, "rb") as f:
            final_data = f.read()
        self.seen.append((tmp, tmp_data, final_data))


class FailBeforeRename(RenameCommit):
    def _before_rename(self, tmp: str, final: str) -> None:
        raise OSError(28, "No space left on device")


def test_temp_file_is_a_sibling_and_target_untouched_until_rename(tmp_path: Path) -> None:
    target = tmp_path / "x.pth"
    target.write_bytes(b"old")
    commit = Recording()
    with commit.open_write(str(target)) as f:
        f.write(b"new content")
    [(tmp, tmp_data, final_data)] = commit.seen
    assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(TMP_PREFIX)
    assert (tmp_data, final_data) == (b"new content", b"old")
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["x.pth"]


@pytest.mark.parametrize("fail", ["inside", "before-rename"])
def test_failure_keeps_old_file_and_removes_temp(tmp_path: Path, fail: str) -> None:
    target = tmp_path / "x.pth"
    target.write_bytes(b"old")
    commit = FailBeforeRename() if fail == "before-rename" else RenameCommit()
    with pytest.raises(OSError, match="No space"), commit.open_write(str(target)) as f:
        f.write(b"partial")
        if fail == "inside":
            raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.pth"]


def test_copy_hard_links_and_replaces(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    RenameCommit().copy(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"A"
    assert os.stat(tmp_path / "a").st_ino == os.stat(tmp_path / "b").st_ino
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_makedirs_creates_what_is_missing_and_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    # That each new level is fsync'd into its parent is proven on a real trace by
    # tests/test_crash_states.py::test_a_new_dirpath_is_durable_when_the_first_commit_returns.
    makedirs(str(tmp_path / "a" / "b" / "c"))
    makedirs(str(tmp_path / "a" / "b" / "c"))  # already there: nothing to do
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        makedirs(str(tmp_path / "file" / "sub"))
