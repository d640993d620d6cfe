"""The Lightning adapter: :class:`~.callback.GenesisCheckpoint` turns trainer hooks into store transactions.

Importing this package imports Lightning; the store, the Genesis API and the CLI never do.
"""
