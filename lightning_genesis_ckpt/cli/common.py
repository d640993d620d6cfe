"""What the commands of ``genesis-ckpt`` share: opening a directory read-only, naming files, printing."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from ..core.errors import GenesisCheckpointError
from ..core.names import MANIFEST_NAME
from ..core.records import CheckpointRecord
from ..storage.store import StoreReader

PROG = "genesis-ckpt"

ROLE_WORDS = {"epoch": "rolling checkpoint", "best": "best model", "interrupt": "interrupt snapshot"}


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ helpers
def storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--storage-option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(raw)  # numbers, booleans, nested dicts (client_kwargs={...})
        except json.JSONDecodeError:
            options[key] = raw
    return options


def open_store(url: str, options: dict[str, Any], *, must_exist: bool = True) -> StoreReader:
    """A read-only view of the directory: the read commands never remove or rewrite anything."""
    try:
        store = StoreReader(url, options, verbose=False)
    except (ValueError, ImportError) as e:
        raise UserError(f"cannot open {url!r}: {e}") from e
    if must_exist and not store.is_directory():
        raise UserError(f"{url!r} is not a directory")
    return store


def split_file(url: str) -> tuple[str, str]:
    head, sep, name = url.rstrip("/").rpartition("/")
    if not sep:
        return ".", name
    return (head or "/"), name


def target(url: str, options: dict[str, Any]) -> tuple[StoreReader, str | None]:
    """A directory gives (store, None); a file gives (its directory's store, its name)."""
    store = open_store(url, options, must_exist=False)
    if store.is_directory():
        parent = open_store(split_file(url)[0], options, must_exist=False)
        if not store.exists(MANIFEST_NAME) and parent.exists(MANIFEST_NAME):
            name = split_file(url)[1]
            if name in parent.manifest().records:  # a directory checkpoint, not a checkpoint directory
                return parent, name
        return store, None
    directory, name = split_file(url)
    parent = open_store(directory, options, must_exist=False)
    if not parent.exists(name):
        raise UserError(f"{url!r} does not exist")
    return parent, name


def age(created: float) -> str:
    seconds = max(0.0, time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def status(store: StoreReader, record: CheckpointRecord, checksums: bool) -> str:
    try:
        if checksums:
            store.verify(record.name)
        elif record.is_directory:  # sizes are per file: only --verify reads the tree
            if not store.exists(record.name):
                return "missing"
        elif store.size(record.name) != record.size:
            return "corrupt"
    except FileNotFoundError:
        return "missing"
    except GenesisCheckpointError:
        return "corrupt"
    return "ok"


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) if args.json else text)
