"""Frozen exclusion for the callback: checkpoints without the frozen parameters, completed again on load.

The format and the checks are :mod:`..storage.frozen`'s; this module applies them to Lightning's checkpoint
dict at a save point, writes the store's one base copy, and completes every checkpoint the trainer loads
through the store from the model as constructed, so that Lightning's strict ``load_state_dict`` sees every
key and a different base model is refused before any weight is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..storage import frozen
from ..storage.store import CheckpointStore
from ._lightning import Resolved, writes_directory

log = logging.getLogger(__name__)


class FrozenExclusion:
    """The callback's ``exclude_frozen`` / ``frozen_buffers`` settings at work (see ``GenesisCheckpoint``)."""

    def __init__(self, enabled: bool, buffers: Sequence[str] = ()) -> None:
        if buffers and not enabled:
            raise ValueError("frozen_buffers needs exclude_frozen=True: without it every tensor is saved")
        self.enabled = enabled
        self.buffers = tuple(buffers)
        self._cache = frozen.FingerprintCache()

    def check(self, trainer: Any) -> None:
        """At setup: refuse a strategy whose checkpoints this cannot apply to (it writes shards itself)."""
        if self.enabled and writes_directory(trainer.strategy):
            raise ValueError(
                f"GenesisCheckpoint(exclude_frozen=True) does not support {type(trainer.strategy).__name__}, "
                "which writes sharded checkpoints itself: use exclude_frozen=False with this strategy"
            )

    def apply(self, store: CheckpointStore, trainer: Any, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """``checkpoint`` without the frozen tensors (on rank 0, before it is written). The first save of a
        base into ``store`` also commits the base copy, once: the later saves find it in the manifest."""
        if not self.enabled:
            return checkpoint
        names = frozen.frozen_names(trainer.lightning_module, self.buffers)
        if not names:
            return checkpoint
        slim, left_out, fingerprint = frozen.exclude(checkpoint, names, self._cache)
        if store.manifest().get(fingerprint.base_name) is None:
            store.save(fingerprint.base_name, frozen.base_state(left_out, fingerprint), role=frozen.BASE_ROLE)
            log.info(
                "saved the %d frozen tensors once to %s; checkpoints here leave them out",
                len(left_out),
                store.url_for(fingerprint.base_name),
            )
        return slim


def completed(trainer: Any, found: Resolved) -> Resolved:
    """A checkpoint the resume hook is about to restore, completed from the model being fitted or tested.

    Raises:
        FrozenBaseMismatchError: the model's frozen tensors differ from those the checkpoint was saved with.
    """
    if found is None or callable(found[1]):
        return found
    path, checkpoint = found[0], found[1]
    if frozen.fingerprint_of(checkpoint, path) is None:
        return found
    module = trainer.lightning_module
    remedy = (
        "resume from a complete checkpoint (one saved with exclude_frozen=False), or start a new run in another "
        "dirpath"
    )
    return path, frozen.complete(
        checkpoint, module.state_dict(), f"the model {type(module).__name__}", remedy
    )
