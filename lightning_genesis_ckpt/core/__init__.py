"""The pure core: names, records, the manifest's format, and the policies that decide over records.

Nothing here does I/O or imports torch: every function takes records and returns records or decisions, and
is tested with hand-built records (see ``tests/test_policies.py``).
"""
