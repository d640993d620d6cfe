"""``python -m lightning_genesis_ckpt``: the ``genesis-ckpt`` command line."""

import sys

from .cli import main

sys.exit(main())
