"""The Genesis API: ``save`` / ``load`` of single files, ``CheckpointManager`` for plain loops, named
versions, importing and exporting checkpoints, and tools; all built on the storage layer's transactions."""
