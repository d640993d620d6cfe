"""The traced process: ``python tests/crash_states/driver.py --marks FILE NAME=DIR ...`` (see :mod:`.workloads`)."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from crash_states.workloads import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
