"""Test-only kill points inside the save/commit path. Never set the variable below outside a test.

The crash tests (``tests/test_crash_kill.py``, ``benchmarks/stress_kill.py``) need a process to die at an exact
moment of a commit, which a timer cannot hit reliably. With ``GENESIS_CKPT_TEST_KILL_AT=<point>`` in the
environment the process SIGKILLs itself the first time it reaches ``<point>``; ``<point>:<n>`` kills it at the
n-th time. ``GENESIS_CKPT_TEST_STOP_AT=<point>`` stops it (SIGSTOP) there instead, as a VM freeze or a
debugger would, until the test continues it (SIGCONT). The points:

* ``after-data-before-rename`` -- a checkpoint's bytes are all written, its final name is not yet in place.
* ``after-rename-before-manifest`` -- the file (a save or the ``best_model.pth`` copy) is under its final
  name, the manifest does not list it yet.
* ``mid-manifest`` -- half of a new manifest is written.
* ``mid-deletion`` -- the manifest has forgotten rolled-out checkpoints, their files are not removed yet.

and one point outside the commit path, for the lock tests: ``lock-found-stale`` -- a run has read a lock
that it judged stale and is about to take it over.

Unset (always, outside tests) a point costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal

ENV = "GENESIS_CKPT_TEST_KILL_AT"
STOP_ENV = "GENESIS_CKPT_TEST_STOP_AT"
POINTS = ("after-data-before-rename", "after-rename-before-manifest", "mid-manifest", "mid-deletion")

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL (or SIGSTOP) this process here if the test variables name this point (and hit count)."""
    for env, signum in ((ENV, signal.SIGKILL), (STOP_ENV, signal.SIGSTOP)):
        spec = os.environ.get(env)
        if not spec:
            continue
        point, _, count = spec.partition(":")
        if point != name:
            continue
        key = f"{env}:{name}"
        _hits[key] = _hits.get(key, 0) + 1
        if _hits[key] == (int(count) if count else 1):
            os.kill(os.getpid(), signum)
