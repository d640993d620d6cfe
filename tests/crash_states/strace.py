"""Record a real process's file-system system calls with strace, and parse the record.

The flags, and why each one:

* ``-f`` follows threads (the lock's heartbeat thread writes too) and child processes.
* ``-y`` prints the path behind every file-descriptor argument (``3</dir/file>``), and behind ``AT_FDCWD``
  (the working directory): ``*at`` calls resolve without our own bookkeeping of directory descriptors.
* ``-xx`` prints every string, paths and written bytes alike, as ``\\xNN`` escapes: a line never holds a raw
  quote, comma or bracket inside a string, so it splits without a C-string parser.
* ``-s 16777216`` captures up to 16 MiB per buffer, so every written byte is in the record; a truncated
  string (``"..."...``) is an error, never a silent gap. Workloads keep their tensors KiB-sized.
* ``-X raw`` prints flags and constants as numbers (compared with ``os.O_*`` bits), not as names that differ
  between strace versions.
* ``--seccomp-bpf`` stops the process only at the traced calls (the interpreter's many reads do not pay).
* ``-e signal=none``, ``-qq``: no signal or exit lines in the record.

Traced calls: everything that creates, writes, truncates, renames, links, removes or syncs a file or a
directory, plus what moves file offsets and descriptors (``lseek``, ``dup*``, ``fcntl``, ``close``), what
forks or execs, and what the model cannot express (``mmap`` of a writable shared mapping, ``copy_file_range``,
``sendfile``, ``splice``, ``symlink``), so that :mod:`.fsops` can refuse a trace it would misread instead of
guessing. ``read`` is not traced: a descriptor opened read-write that is written with ``write`` (whose offset
a read could have moved) is refused for that reason.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SYSCALLS = (
    "open", "openat", "creat", "write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate", "truncate",
    "fallocate", "fsync", "fdatasync", "sync_file_range", "sync", "syncfs", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir", "close",
    "dup", "dup2", "dup3", "fcntl", "lseek", "mmap", "clone", "clone3", "fork", "vfork", "execve", "chdir",
    "fchdir", "copy_file_range", "sendfile", "splice",
)  # fmt: skip

#: Bytes captured per buffer argument (see the module doc).
MAX_STRING = 16 * 2**20


class TraceError(RuntimeError):
    """The record holds something the explorer cannot model faithfully; the message says what and where."""


@functools.cache
def unavailable_reason() -> str | None:
    """Why this machine cannot record traces (no strace, ptrace forbidden), or None when it can."""
    exe = shutil.which("strace")
    if exe is None:
        return "strace is not installed (make's setup installs it with apt-get where it can)"
    try:
        probe = subprocess.run(
            [exe, "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"strace cannot run: {e}"
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()[:200]}"
    return None


def strace_command(trace: Path, argv: Sequence[str]) -> list[str]:
    """The strace command line that records ``argv`` into ``trace``."""
    exe = shutil.which("strace") or "strace"
    return [
        exe, "-f", "-qq", "-y", "-xx", "-X", "raw", "-s", str(MAX_STRING), "--seccomp-bpf",
        "-e", "signal=none", "-e", "trace=" + ",".join(f"?{s}" for s in SYSCALLS), "-e", "raw=mmap",
        "-o", str(trace), "--", *argv,
    ]  # fmt: skip


def record(
    trace: Path, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under strace, writing the record to ``trace``.

    Raises:
        TraceError: the traced process failed (its stderr's tail is in the message).
    """
    proc = subprocess.run(
        strace_command(trace, argv), cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise TraceError(f"traced workload exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


# ------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class Syscall:
    """One completed system call: its raw arguments, result, and the -y path of a returned descriptor."""

    line: int
    tid: int
    name: str
    args: tuple[str, ...]
    ret: int | None  # None: "?" (the call did not return, e.g. exit)
    error: str | None  # errno name when the call failed
    ret_path: str | None

    def where(self) -> str:
        return f"trace line {self.line} ({self.name}, thread {self.tid})"


_LINE = re.compile(r"^(\d+) +(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_UNFINISHED = " <unfinished ...>"
_FORKS = ("clone(", "clone3(", "fork(", "vfork(")
_HEX = re.compile(r"((?:\\x[0-9a-f]{2})*)")


def unhex(text: str) -> bytes:
    """``\\x41\\x42`` (strace -xx) to bytes."""
    return bytes.fromhex(text.replace("\\x", ""))


def string_arg(arg: str, call: Syscall) -> bytes:
    """The bytes of a quoted ``-xx`` string argument; a truncated one is an error."""
    arg = arg.strip()
    if arg.endswith("..."):
        raise TraceError(f"{call.where()}: a buffer was longer than strace captured ({MAX_STRING} bytes)")
    if not (arg.startswith('"') and arg.endswith('"')):
        raise TraceError(f"{call.where()}: expected a string argument, got {arg[:80]!r}")
    return unhex(arg[1:-1])


def path_arg(arg: str, call: Syscall) -> str:
    return os.fsdecode(string_arg(arg, call))


def int_arg(arg: str) -> int:
    return int(arg.strip().split("<", 1)[0], 0)


def fd_arg(arg: str) -> tuple[int, str | None]:
    """A descriptor argument: its number and the ``-y`` path (None when strace printed none)."""
    arg = arg.strip()
    number, sep, rest = arg.partition("<")
    path = os.fsdecode(unhex(rest[:-1])) if sep and rest.endswith(">") else None
    return int(number, 0), path


def iovec_arg(arg: str, call: Syscall) -> bytes:
    """The concatenated buffers of a ``writev`` iovec array."""
    out = []
    for m in re.finditer(r'iov_base=("[^"]*"(?:\.\.\.)?)', arg):
        out.append(string_arg(m.group(1), call))
    return b"".join(out)


def clone_flags(call: Syscall) -> int:
    """The CLONE_* flags of a clone/clone3 call (fork and vfork: 0, nothing shared)."""
    m = re.search(r"flags=(0x[0-9a-f]+|\d+)", ", ".join(call.args))
    return int(m.group(1), 0) if m else 0


def _split_args(text: str) -> tuple[list[str], str]:
    """Split ``a, {b, c}, [d]) = 3<...>`` into the top-level arguments and the text after ``)``."""
    depth, start, args, quoted = 0, 0, [], False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch in "([{":
            depth += 1
        elif ch in "}])":
            if depth == 0 and ch == ")":
                last = text[start:i].strip()
                if last or args:
                    args.append(last)
                return args, text[i + 1 :]
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    raise ValueError("unbalanced")


def _parse_result(text: str) -> tuple[int | None, str | None, str | None]:
    text = text.strip()
    if not text.startswith("="):
        raise ValueError("no result")
    value = text[1:].strip()
    if value.startswith("?"):
        return None, None, None
    head, _, tail = value.partition(" ")
    if head == "-1" and tail[:1].isupper():
        return -1, tail.split()[0], None
    number, sep, rest = head.partition("<")
    path = os.fsdecode(unhex(rest[: rest.rindex(">")])) if sep else None
    return int(number, 0), None, path


def parse(trace: Path) -> Iterator[Syscall]:
    """The completed calls of a record, in the order they returned (an interrupted call is joined up)."""
    pending: dict[int, str] = {}
    with open(trace, encoding="ascii", errors="strict") as f:
        for lineno, raw in enumerate(f, start=1):
            m = _LINE.match(raw.rstrip("\n"))
            if m is None:
                continue
            tid, text = int(m.group(1)), m.group(2)
            if text.endswith(_UNFINISHED):
                pending[tid] = text[: -len(_UNFINISHED)]
                if text.startswith(_FORKS):
                    # The child may run (and be recorded) before its parent's call returns: announce it now,
                    # with the flags that say whether it shares the parent's descriptor table.
                    yield Syscall(lineno, tid, "clone-started", (pending[tid],), None, None, None)
                continue
            resumed = _RESUMED.match(text)
            if resumed is not None:
                if tid not in pending:
                    raise TraceError(f"trace line {lineno}: {resumed.group(1)} resumed but never started")
                text = pending.pop(tid) + resumed.group(2)
            name, paren, rest = text.partition("(")
            if not paren or not name.isidentifier():
                continue  # "--- SIG..." / "+++ exited" lines, should any appear
            try:
                args, after = _split_args(rest)
                ret, error, ret_path = _parse_result(after)
            except ValueError as e:
                raise TraceError(f"trace line {lineno}: cannot parse {text[:120]!r} ({e})") from e
            yield Syscall(lineno, tid, name, tuple(args), ret, error, ret_path)
