"""Test-only kill points inside the save/commit path. Never set the variable below outside a test.

The crash tests (``tests/test_crash_kill.py``, ``benchmarks/stress_kill.py``) need a process to die at an exact
moment of a commit, which a timer cannot hit reliably. With ``GENESIS_CKPT_TEST_KILL_AT=<point>`` in the
environment the process SIGKILLs itself the first time it reaches ``<point>``; ``<point>:<n>`` kills it at the
n-th time. The points:

* ``after-data-before-rename`` -- a checkpoint's bytes are all written, its final name is not yet in place.
* ``after-rename-before-manifest`` -- the file (a save or the ``best_model.pth`` copy) is under its final
  name, the manifest does not list it yet.
* ``mid-manifest`` -- half of a new manifest is written.
* ``mid-deletion`` -- the manifest has forgotten rolled-out checkpoints, their files are not removed yet.

Unset (always, outside tests) a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "GENESIS_CKPT_TEST_KILL_AT"
POINTS = ("after-data-before-rename", "after-rename-before-manifest", "mid-manifest", "mid-deletion")

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here if ``GENESIS_CKPT_TEST_KILL_AT`` names this point (and hit count)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)
