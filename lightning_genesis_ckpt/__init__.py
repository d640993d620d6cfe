"""lightning-genesis-ckpt: checkpointing for PyTorch Lightning that never loses a run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointCorruptError,
    CheckpointSaveError,
    GenesisCheckpointError,
    ManifestError,
    MonitorNotFoundError,
    StoreLockedError,
    UnsafeCheckpointError,
)
from .manifest import CheckpointRecord, Manifest
from .resume import Resolution, resolve
from .store import CheckpointStore

if TYPE_CHECKING:
    from .callback import GenesisCheckpoint

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # GenesisCheckpoint needs Lightning, whose import takes seconds; the store, the functional API and the
    # CLI do not, so it is imported on first use only.
    if name == "GenesisCheckpoint":
        from .callback import GenesisCheckpoint

        return GenesisCheckpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointCorruptError",
    "CheckpointRecord",
    "CheckpointSaveError",
    "CheckpointStore",
    "GenesisCheckpoint",
    "GenesisCheckpointError",
    "Manifest",
    "ManifestError",
    "MonitorNotFoundError",
    "Resolution",
    "StoreLockedError",
    "UnsafeCheckpointError",
    "__version__",
    "resolve",
]

# Same convention as Lightning itself: our info lines (one per save/resume) are visible by default, unless
# the application configured logging, in which case they propagate to its handlers.
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False
