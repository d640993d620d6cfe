"""Which checkpoint to resume from, and verification of each candidate before it is trusted."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointCorruptError
from .manifest import CheckpointRecord
from .store import CheckpointStore

log = logging.getLogger(__name__)

#: Roles whose files hold a full training state and can therefore be resumed from.
RESUMABLE_ROLES = ("epoch", "interrupt", "best")


def candidates(records: Iterable[CheckpointRecord]) -> list[CheckpointRecord]:
    """Resumable records, newest training state first.

    Newest means most optimizer steps; at equal steps a rolling or interrupt checkpoint is preferred to
    ``best_model.pth`` (usually a copy of one of them), then the later commit wins.
    """
    usable = [r for r in records if r.role in RESUMABLE_ROLES]
    return sorted(
        usable,
        key=lambda r: (-1 if r.global_step is None else r.global_step, r.role != "best", r.seq),
        reverse=True,
    )


@dataclass
class Resolution:
    """The outcome of a resume search: the chosen record (None: start fresh) and what was skipped why."""

    record: CheckpointRecord | None
    checkpoint: Any = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def resolve(
    store: CheckpointStore,
    *,
    trusted: bool = False,
    load: bool = True,
    validate: Callable[[Any], str | None] | None = None,
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
    """
    resolution = Resolution(record=None)
    for record in candidates(store.records()):
        try:
            if load:
                checkpoint = store.load(record.name, trusted=trusted)
                reason = validate(checkpoint) if validate is not None else None
                if reason is not None:
                    raise CheckpointCorruptError(store.url_for(record.name), reason)
                resolution.checkpoint = checkpoint
            else:
                store.verify(record.name)
        except (CheckpointCorruptError, FileNotFoundError) as e:
            log.warning("skipping checkpoint %s: %s", store.url_for(record.name), e)
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
