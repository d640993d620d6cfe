"""Long transfers show progress: a bar on an interactive terminal, one line elsewhere, nothing when quick.

A real save and load in a subprocess, on a ``faulty://`` filesystem (remote: the load is a download, read
through the checksum) throttled to 8 MiB/s (``write_rate``, ``read_rate``), with the display threshold lowered
through ``_GENESIS_PROGRESS_AFTER_S`` so that each 8 MiB transfer needs about a second. The same script first
makes a quick save, which must show nothing. Its stderr is a pseudo-terminal (the interactive case) or a pipe.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import faultyfs  # registers faulty://
    from lightning_genesis_ckpt import CheckpointStore

    state = {f"w{i}": torch.full((128, 1024), float(i)) for i in range(16)}  # 16 x 512 KiB
    store = CheckpointStore("faulty://progress-run")
    with store.transaction() as tx:
        tx.write("quick.pth", {"w": torch.zeros(4)})
    sys.stderr.write("=== SLOW SAVE\\n")
    sys.stderr.flush()
    store.loc.fs.write_rate = 8 * 2**20  # 8 MiB/s: the 8 MiB save takes about a second
    with store.transaction() as tx:
        tx.write("big.pth", state)
    sys.stderr.write("=== SLOW LOAD\\n")
    sys.stderr.flush()
    store.loc.fs.read_rate = 8 * 2**20
    assert torch.equal(store.load("big.pth")["w3"], state["w3"])
    sys.stderr.write("=== DONE\\n")
    """
)


def env() -> dict[str, str]:
    return {**os.environ, "_GENESIS_PROGRESS_AFTER_S": "0.3"}


def run_on_pty(tmp_path: Path) -> str:
    script = tmp_path / "save.py"
    script.write_text(SCRIPT)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(
        [sys.executable, str(script), str(TESTS)],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env(),
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 100
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=30)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_slow_save_shows_a_bar_on_a_terminal(tmp_path: Path) -> None:
    out = run_on_pty(tmp_path)
    quick, slow = out.split("=== SLOW SAVE", 1)
    slow, load = slow.split("=== SLOW LOAD", 1)
    assert "saved faulty://progress-run/quick.pth" in quick
    assert "%|" not in quick and "so far" not in quick, quick
    # tqdm's bar: the label, a percentage with its bar (the size is known: the tensors' bytes), rate, ETA.
    assert "saving big.pth" in slow, slow
    assert "%|" in slow and "B/s" in slow and "<" in slow, slow
    assert "so far" not in slow  # the one-line form is for non-terminals
    assert "saved faulty://progress-run/big.pth" in slow
    assert "loading big.pth" in load and "%|" in load, load


def test_slow_save_is_one_line_outside_a_terminal(tmp_path: Path) -> None:
    script = tmp_path / "save.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(TESTS)], capture_output=True, text=True, timeout=100, env=env()
    )
    assert result.returncode == 0, result.stderr
    quick, slow = result.stderr.split("=== SLOW SAVE", 1)
    slow, load = slow.split("=== SLOW LOAD", 1)
    assert "so far" not in quick and "%|" not in quick, quick
    progress_lines = [line for line in slow.splitlines() if "so far" in line]
    assert len(progress_lines) == 1, slow
    line = progress_lines[0]
    assert line.startswith("saving faulty://progress-run/big.pth: ") and "MiB/s" in line and "left" in line, (
        line
    )
    assert "\r" not in slow and "%|" not in slow, slow
    (load_line,) = [line for line in load.splitlines() if "so far" in line]
    assert load_line.startswith("loading faulty://progress-run/big.pth: "), load
