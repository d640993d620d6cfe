"""lightning-genesis-ckpt: checkpointing for PyTorch Lightning that never loses a run.

``import lightning_genesis_ckpt as genesis`` also gives the Genesis serialization API (``genesis.save``,
``genesis.load``, ...) and ``CheckpointManager`` for plain PyTorch loops, on the same store.
"""

from __future__ import annotations

import logging

from .api import load, load_checkpoint, save, save_checkpoint
from .callback import GenesisCheckpoint
from .deploy import export
from .errors import (
    CheckpointCorruptError,
    CheckpointSaveError,
    GenesisCheckpointError,
    ManifestError,
    MonitorNotFoundError,
    StoreLockedError,
    UnsafeCheckpointError,
)
from .manager import CheckpointManager
from .manifest import CheckpointRecord, Manifest
from .resume import Resolution, resolve
from .store import CheckpointStore
from .tools import LoadReport, load_state_dict_into, validate_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointRecord",
    "CheckpointSaveError",
    "CheckpointStore",
    "GenesisCheckpoint",
    "GenesisCheckpointError",
    "LoadReport",
    "Manifest",
    "ManifestError",
    "MonitorNotFoundError",
    "Resolution",
    "StoreLockedError",
    "UnsafeCheckpointError",
    "__version__",
    "export",
    "load",
    "load_checkpoint",
    "load_state_dict_into",
    "resolve",
    "save",
    "save_checkpoint",
    "validate_checkpoint",
]

# Same convention as Lightning itself: our info lines (one per save/resume) are visible by default, unless
# the application configured logging, in which case they propagate to its handlers.
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False
