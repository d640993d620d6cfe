"""Which checkpoint to resume from, and verification of each candidate before it is trusted."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import CheckpointCorruptError
from ..core.names import RESUMABLE_ROLES
from ..core.ordering import OrderKey, candidates, interrupt_then_epoch, most_steps_first
from ..core.records import CheckpointRecord
from .reader import StoreReader
from .serialization import MapLocation, Serializer

log = logging.getLogger(__name__)

__all__ = [
    "RESUMABLE_ROLES",
    "Resolution",
    "candidates",
    "interrupt_then_epoch",
    "most_steps_first",
    "resolve",
]


@dataclass
class Resolution:
    """The outcome of a resume search: the chosen record (None: start fresh) and what was skipped why.

    ``checkpoint`` is the loaded state, or None when it was not loaded (``load=False``, or a directory
    checkpoint, which only its strategy can load).
    """

    record: CheckpointRecord | None
    checkpoint: Any = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def resolve(
    store: StoreReader,
    *,
    trusted: bool = False,
    load: bool = True,
    validate: Callable[[Any], str | None] | None = None,
    map_location: MapLocation = "cpu",
    serializer: Serializer | None = None,
    roles: Sequence[str] = RESUMABLE_ROLES,
    key: OrderKey = most_steps_first,
) -> Resolution:
    """Find the newest valid checkpoint in ``store``.

    Each candidate's checksum is verified; a missing, corrupt or invalid one is skipped with a warning that
    names it, and the next is tried. A file that is *unsafe* to load is not skipped: the error propagates,
    because silently starting from scratch would be worse than stopping.

    Args:
        store: the checkpoint store.
        trusted: load with full pickle (see :func:`lightning_genesis_ckpt.serialization.load`).
        load: also load the chosen checkpoint (False: only verify checksums, as the CLI's dry run does).
        validate: returns a reason string when a loaded checkpoint is not usable, None when it is.
        map_location: where tensors are loaded to (passed to ``torch.load``).
        serializer: ``"dill"`` to read files saved with dill (needs ``trusted``).
        roles: which records may be chosen.
        key: the order of preference (see :func:`candidates`).
    """
    resolution = Resolution(record=None)
    for record in candidates(store.records(), roles=roles, key=key):
        try:
            if record.is_directory:
                # Only the strategy that wrote a directory can load it: verify every file, the caller loads
                # from ``store.local_copy(record.name)`` (``checkpoint`` stays None).
                store.verify(record.name)
            elif load:
                checkpoint = store.load(
                    record.name, trusted=trusted, map_location=map_location, serializer=serializer
                )
                reason = validate(checkpoint) if validate is not None else None
                if reason is not None:
                    raise CheckpointCorruptError(store.url_for(record.name), reason)
                resolution.checkpoint = checkpoint
            else:
                store.verify(record.name)
        except (CheckpointCorruptError, FileNotFoundError) as e:
            log.warning("skipping checkpoint %s: %s", store.url_for(record.name), str(e))
            resolution.skipped.append((record.name, str(e)))
            continue
        resolution.record = record
        return resolution
    if resolution.skipped:
        log.warning(
            "no valid checkpoint in %s (%d skipped); starting from scratch",
            store.url,
            len(resolution.skipped),
        )
    return resolution
