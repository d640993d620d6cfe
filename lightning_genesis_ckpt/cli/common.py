"""What the commands of ``genesis-ckpt`` share: opening a directory read-only, naming files, printing."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..core.errors import GenesisCheckpointError
from ..core.names import MANIFEST_NAME
from ..core.records import CheckpointRecord

if TYPE_CHECKING:
    from ..storage.store import StoreReader

PROG = "genesis-ckpt"

ROLE_WORDS = {
    "epoch": "rolling checkpoint",
    "best": "best model",
    "interrupt": "interrupt snapshot",
    "base": "frozen parameters (exclude_frozen)",
}


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
    from ..storage.store import StoreReader  # torch and fsspec: not for --help

    return _open(StoreReader, url, options, must_exist)


def _open(cls: type[StoreReader], url: str, options: dict[str, Any], must_exist: bool) -> StoreReader:
    try:
        store = cls(url, options, verbose=False)
    except (ValueError, ImportError) as e:
        raise UserError(f"cannot open {url!r}: {e}") from e
    if must_exist and not store.is_directory():
        raise UserError(f"{url!r} is not a directory")
    return store


def _file_reader(url: str, options: dict[str, Any]) -> StoreReader:
    """The directory of a file the user named: its manifest is read if it has one, and nothing else.

    A directory without a manifest is not rebuilt from its files, which would load every neighbour of the
    named file (the user's README, their data) just to answer about one.
    """
    from ..storage.location import Conduct
    from ..storage.store import StoreReader

    class FileReader(StoreReader):
        conduct = Conduct(rebuilds=False, sweeps=False)

    return _open(FileReader, url, options, must_exist=False)


def split_file(url: str) -> tuple[str, str]:
    head, sep, name = url.rstrip("/").rpartition("/")
    if not sep:
        return ".", name
    return (head or "/"), name


def target(url: str, options: dict[str, Any]) -> tuple[StoreReader, str | None]:
    """A directory gives (store, None); a file gives (a reader of its directory, its name).

    Only the named file (and its directory's manifest, if there is one) is read.
    """
    store = open_store(url, options, must_exist=False)
    if store.is_directory():
        parent = _file_reader(split_file(url)[0], options)
        if not store.exists(MANIFEST_NAME) and parent.exists(MANIFEST_NAME):
            name = split_file(url)[1]
            if name in parent.manifest().records:  # a directory checkpoint, not a checkpoint directory
                return parent, name
        return store, None
    directory, name = split_file(url)
    parent = _file_reader(directory, options)
    if not parent.exists(name):
        raise UserError(f"{url!r} does not exist")
    return parent, name


def load_unlisted(store: StoreReader, name: str, **kwargs: Any) -> Any:
    """Load a file that no manifest lists; a file that is not a checkpoint at all is the user's error.

    Without a record there is no telling a damaged checkpoint from a stray file (a README, a CSV), so both
    get the same one line, naming the file.
    """
    from ..core.errors import CheckpointCorruptError

    try:
        return store.load(name, **kwargs)
    except CheckpointCorruptError as e:
        reason = e.reason.split("; torch said:")[0]
        raise UserError(
            f"{store.url_for(name)} is not a readable checkpoint ({reason}): corrupt, or not a checkpoint "
            "at all; give a checkpoint file or a checkpoint directory"
        ) from e


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
