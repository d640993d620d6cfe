"""lightning-genesis-ckpt: checkpointing for PyTorch Lightning that never loses a run.

``import lightning_genesis_ckpt as genesis`` also gives the Genesis serialization API (``genesis.save``,
``genesis.load``, ...) and ``CheckpointManager`` for plain PyTorch loops, on the same store.

The package is layered (see ``docs/design.md``): ``core`` (records, names, the manifest format, policies;
pure), ``storage`` (transactions, the lock, reading, recovery), ``adapter`` (the Lightning callback), ``api``
(the Genesis API) and the CLI. This namespace holds what users call.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter.callback import GenesisCheckpoint
    from .adapter.fabric import FabricCheckpointer
    from .api.deploy import export
    from .api.functional import load, load_checkpoint, save, save_checkpoint
    from .api.importer import import_checkpoint
    from .api.manager import CheckpointManager
    from .api.tools import LoadReport, load_state_dict_into, validate_checkpoint
    from .api.versions import Version, list_versions, load_version, save_version, tag_version
    from .core.errors import (
        CheckpointCorruptError,
        CheckpointSaveError,
        FrozenBaseMismatchError,
        GenesisCheckpointError,
        ManifestError,
        MonitorNotFoundError,
        StoreLockedError,
        UnsafeCheckpointError,
    )
    from .core.preservation import AnyOf, BestN, EveryNSeconds, EveryNSteps, KeepFor, LatestN
    from .core.records import CheckpointRecord
    from .storage.store import CheckpointStore

__version__ = "0.1.0"

# Public name -> the module that defines it. Everything is imported on first use: torch takes seconds to
# import and Lightning more, and ``genesis-ckpt --help`` (or a script that only needs the errors) should not
# wait for either.
_EXPORTS = {
    "GenesisCheckpoint": ".adapter.callback",
    "FabricCheckpointer": ".adapter.fabric",
    "export": ".api.deploy",
    **dict.fromkeys(["load", "load_checkpoint", "save", "save_checkpoint"], ".api.functional"),
    "import_checkpoint": ".api.importer",
    "CheckpointManager": ".api.manager",
    **dict.fromkeys(["LoadReport", "load_state_dict_into", "validate_checkpoint"], ".api.tools"),
    **dict.fromkeys(
        ["Version", "list_versions", "load_version", "save_version", "tag_version"], ".api.versions"
    ),
    **dict.fromkeys(
        [
            "CheckpointCorruptError",
            "CheckpointSaveError",
            "FrozenBaseMismatchError",
            "GenesisCheckpointError",
            "ManifestError",
            "MonitorNotFoundError",
            "StoreLockedError",
            "UnsafeCheckpointError",
        ],
        ".core.errors",
    ),
    **dict.fromkeys(
        ["AnyOf", "BestN", "EveryNSeconds", "EveryNSteps", "KeepFor", "LatestN"], ".core.preservation"
    ),
    "CheckpointRecord": ".core.records",
    "CheckpointStore": ".storage.store",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "AnyOf",
    "BestN",
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointRecord",
    "CheckpointSaveError",
    "CheckpointStore",
    "EveryNSeconds",
    "EveryNSteps",
    "FabricCheckpointer",
    "FrozenBaseMismatchError",
    "GenesisCheckpoint",
    "GenesisCheckpointError",
    "KeepFor",
    "LatestN",
    "LoadReport",
    "ManifestError",
    "MonitorNotFoundError",
    "StoreLockedError",
    "UnsafeCheckpointError",
    "Version",
    "__version__",
    "export",
    "import_checkpoint",
    "list_versions",
    "load",
    "load_checkpoint",
    "load_state_dict_into",
    "load_version",
    "save",
    "save_checkpoint",
    "save_version",
    "tag_version",
    "validate_checkpoint",
]

# Same convention as Lightning itself: our info lines (one per save/resume) are visible by default, unless
# the application configured logging, in which case they propagate to its handlers.
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False
