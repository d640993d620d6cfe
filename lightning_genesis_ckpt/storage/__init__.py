"""The storage layer: everything that reads or writes a checkpoint directory, on any fsspec filesystem.

Writes go through a :class:`~.transaction.Transaction` only (``CheckpointStore.transaction()``), under the
directory's lock (:mod:`.lock`, :mod:`.writers`); reads through :class:`~.reader.StoreReader`. No module
outside this package touches a filesystem handle or a commit strategy.
"""

from .reader import StoreReader
from .store import CheckpointStore

__all__ = ["CheckpointStore", "StoreReader"]
