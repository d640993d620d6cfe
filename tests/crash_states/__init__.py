"""A power-loss crash-state explorer, in the manner of ALICE (OSDI '14): observe, do not instrument.

A workload (:mod:`.workloads`) saves checkpoints through the public API in a real process that strace
records (:mod:`.strace`). The record alone is replayed into the file-system operations each traced directory
saw, on inodes (:mod:`.replay`, :mod:`.tree`). A persistence model (:mod:`.persistence`: ext4-ordered-like or
weak POSIX) says which subsets of those operations a power cut at each point may leave on disk. Each such
crash state is written out as a real directory and opened through the library's public surface as a user and
the next run would (:mod:`.surface`, the one place that imports the library), and :mod:`.oracle` checks it
against what the trace shows had returned. :mod:`.explore` ties it together; :mod:`.broken` is the self-test.

The default test run explores a seeded sample (``tests/test_crash_states.py``); the full run is
``benchmarks/crashstates.py``. See ``docs/crash-states.md``.
"""
