"""``genesis-ckpt``: look after a checkpoint directory from the shell (any fsspec URL).

Exit codes: 0 success, 1 a checkpoint is corrupt or missing (``verify``), 2 a user error (bad URL, missing
directory, unreadable file). User errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .deploy import FORMATS, export
from .errors import GenesisCheckpointError, is_storage_client_error
from .names import MANIFEST_NAME
from .preservation import (
    AnyOf,
    BestN,
    EveryNSteps,
    KeepFor,
    LatestN,
    PreservationPolicy,
    RetentionContext,
    select_deletions,
)
from .records import CheckpointRecord
from .resume import resolve
from .store import CheckpointStore, StoreReader, human_size

PROG = "genesis-ckpt"

ROLE_WORDS = {"epoch": "rolling checkpoint", "best": "best model", "interrupt": "interrupt snapshot"}


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


# ------------------------------------------------------------------------------------------ helpers
def _storage_options(pairs: Sequence[str]) -> dict[str, Any]:
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


def _open_store(url: str, options: dict[str, Any], *, must_exist: bool = True) -> StoreReader:
    """A read-only view of the directory: the read commands never remove or rewrite anything."""
    try:
        store = StoreReader(url, options, verbose=False)
    except (ValueError, ImportError) as e:
        raise UserError(f"cannot open {url!r}: {e}") from e
    if must_exist and not store.is_directory():
        raise UserError(f"{url!r} is not a directory")
    return store


def _split_file(url: str) -> tuple[str, str]:
    head, sep, name = url.rstrip("/").rpartition("/")
    if not sep:
        return ".", name
    return (head or "/"), name


def _target(url: str, options: dict[str, Any]) -> tuple[StoreReader, str | None]:
    """A directory gives (store, None); a file gives (its directory's store, its name)."""
    store = _open_store(url, options, must_exist=False)
    if store.is_directory():
        parent = _open_store(_split_file(url)[0], options, must_exist=False)
        if not store.exists(MANIFEST_NAME) and parent.exists(MANIFEST_NAME):
            name = _split_file(url)[1]
            if name in parent.manifest().records:  # a directory checkpoint, not a checkpoint directory
                return parent, name
        return store, None
    directory, name = _split_file(url)
    parent = _open_store(directory, options, must_exist=False)
    if not parent.exists(name):
        raise UserError(f"{url!r} does not exist")
    return parent, name


def _age(created: float) -> str:
    seconds = max(0.0, time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _status(store: StoreReader, record: CheckpointRecord, checksums: bool) -> str:
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


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) if args.json else text)


# ----------------------------------------------------------------------------------------- commands
def cmd_ls(args: argparse.Namespace) -> int:
    store = _open_store(args.dir, args.options)
    records = store.records()
    rows = []
    for r in records:
        rows.append({**r.to_json(), "status": _status(store, r, args.verify)})
    if not rows:
        _emit(args, [], f"no committed checkpoints in {args.dir}")
        return 0
    table = [["name", "role", "epoch", "step", "metric", "size", "age", "status"]]
    for r, row in zip(records, rows, strict=True):
        value = r.metric()
        metric = "-" if value is None else f"{r.monitor}={value:.4g}"
        table.append(
            [
                f"{r.name}/ ({len(r.files)} files)" if r.files is not None else r.name,
                r.role,
                str(r.epoch),
                str(r.global_step),
                metric,
                human_size(r.size),
                _age(r.created),
                row["status"],
            ]
        )
    _emit(args, rows, _table(table))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store, name = _target(args.path, args.options)
    names = [name] if name is not None else [r.name for r in store.records()]
    results = []
    for n in names:
        try:
            if n in store.manifest().records:
                files = store.verify(n).files
                detail = "checksum matches" if files is None else f"all {len(files)} files match"
                results.append({"name": n, "status": "ok", "detail": f"{detail} the manifest"})
            else:
                # A file the manifest does not list: the best we can do is prove that it loads.
                store.load(n, verify=False)
                results.append({"name": n, "status": "ok", "detail": "loads (no manifest checksum)"})
        except FileNotFoundError as e:
            results.append({"name": n, "status": "missing", "detail": str(e)})
        except GenesisCheckpointError as e:
            results.append({"name": n, "status": "corrupt", "detail": str(e)})
    bad = [r for r in results if r["status"] != "ok"]
    lines = [f"{r['status']:8} {r['name']}: {r['detail']}" for r in results]
    lines.append(f"{len(results) - len(bad)} ok, {len(bad)} bad" if results else "nothing to verify")
    _emit(args, results, "\n".join(lines))
    return 1 if bad else 0


def _describe(obj: Any) -> dict[str, Any]:
    tensors = 0
    nbytes = 0

    def walk(x: Any) -> None:
        nonlocal tensors, nbytes
        if isinstance(x, torch.Tensor):
            tensors += 1
            nbytes += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    info: dict[str, Any] = {"type": type(obj).__name__, "tensors": tensors, "tensor_bytes": nbytes}
    if isinstance(obj, dict):
        info["keys"] = sorted(map(str, obj))
        meta = obj.get("genesis_ckpt")
        info["versions"] = dict(meta.get("versions", {})) if isinstance(meta, dict) else {}
        if "pytorch-lightning_version" in obj:
            info["versions"].setdefault("lightning", obj["pytorch-lightning_version"])
        for key in ("epoch", "global_step"):
            if key in obj:
                info[key] = obj[key]
        hp = obj.get("hyper_parameters")
        info["hparams"] = {str(k): repr(v) for k, v in hp.items()} if isinstance(hp, dict) else None
        callbacks = obj.get("callbacks")
        info["rng"] = isinstance(callbacks, dict) and any(
            isinstance(v, dict) and "rng" in v for v in callbacks.values()
        )
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    store, name = _target(args.file, args.options)
    if name is None:
        raise UserError(f"{args.file!r} is a directory; inspect takes a checkpoint file")
    obj = store.load(name, trusted=args.trusted)
    info = {"file": store.url_for(name), **_describe(obj)}
    lines = [f"{k}: {v}" for k, v in info.items() if k not in ("keys", "hparams")]
    if "keys" in info:
        lines.append("keys: " + ", ".join(info["keys"]))
    if info.get("hparams"):
        lines.append("hparams: " + ", ".join(f"{k}={v}" for k, v in info["hparams"].items()))
    _emit(args, info, "\n".join(lines))
    return 0


def cmd_resume_path(args: argparse.Namespace) -> int:
    store = _open_store(args.dir, args.options)
    found = resolve(store, load=False)
    rec = found.record
    payload = {
        "path": None if rec is None else store.url_for(rec.name),
        "record": None if rec is None else rec.to_json(),
        "skipped": [{"name": n, "reason": why} for n, why in found.skipped],
    }
    lines = [f"skipped {n}: {why}" for n, why in found.skipped]
    if rec is None:
        lines.append("auto-resume would start from scratch: no valid checkpoint")
    else:
        lines.append(
            f"auto-resume would use {store.url_for(rec.name)} "
            f"({ROLE_WORDS.get(rec.role, rec.role)}, epoch {rec.epoch}, step {rec.global_step}; "
            "the most training among the valid candidates, checksum verified)"
        )
    _emit(args, payload, "\n".join(lines))
    return 0


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """``90``, ``30m``, ``12h``, ``7d``, ``2w`` as seconds."""
    unit = text[-1:].lower()
    number = text[:-1] if unit in _DURATION_UNITS else text
    try:
        seconds = float(number) * _DURATION_UNITS.get(unit, 1)
    except ValueError:
        raise UserError(f"--keep-for expects a duration like 90, 30m, 12h or 7d, got {text!r}") from None
    if seconds <= 0:
        raise UserError(f"--keep-for must be positive, got {text!r}")
    return seconds


def _prune_policy(args: argparse.Namespace, records: list[CheckpointRecord]) -> PreservationPolicy:
    monitors = {r.monitor for r in records if r.role in ("epoch", "step") and r.monitor}
    monitor = args.monitor or (monitors.pop() if len(monitors) == 1 else None)
    policies: list[PreservationPolicy] = [LatestN(args.keep_last)]
    if args.keep_best:
        if monitor is None:
            raise UserError("--keep-best needs a metric: the records name none (or several); pass --monitor")
        policies.append(BestN(args.keep_best, monitor, args.mode))
    if args.keep_every_steps:
        policies.append(EveryNSteps(args.keep_every_steps))
    if args.keep_for:
        policies.append(KeepFor(_duration(args.keep_for)))
    return AnyOf(*policies)


def cmd_prune(args: argparse.Namespace) -> int:
    # The same decision as the callback's and CheckpointManager's (select_deletions), under the same lock.
    if args.dry_run:
        reader = _open_store(args.dir, args.options)
        records = reader.records()
        doomed = select_deletions(records, _prune_policy(args, records), RetentionContext(now=time.time()))
    else:
        _open_store(args.dir, args.options)  # a missing directory is a user error, not a new store
        with CheckpointStore(args.dir, args.options, verbose=False).transaction() as tx:
            records = tx.manifest.sorted()
            policy = _prune_policy(args, records)
            doomed = tx.delete(select_deletions(records, policy, RetentionContext(now=time.time())))
    verb = "would remove" if args.dry_run else "removed"
    _emit(
        args,
        {"dry_run": args.dry_run, "removed": doomed},
        f"{verb} {len(doomed)} checkpoint(s)" + (": " + ", ".join(doomed) if doomed else ""),
    )
    return 0


def _import_model(spec: str) -> type[torch.nn.Module]:
    """``package.module:ClassName`` -> the class (the user names their own code; nothing from the file)."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--model expects package.module:ClassName, got {spec!r}")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import --model {spec!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise UserError(f"--model {spec!r} is not a torch.nn.Module class")
    return cls


def cmd_export(args: argparse.Namespace) -> int:
    model = example = None
    if args.format != "safetensors":
        if not (args.model and args.input_shape):
            raise UserError(f"--format {args.format} needs --model package.module:Class and --input-shape")
        model = _import_model(args.model)
        try:
            shape = [int(d) for d in args.input_shape.split(",")]
        except ValueError as e:
            raise UserError(
                f"--input-shape expects comma-separated sizes like 1,32, got {args.input_shape!r}"
            ) from e
        example = torch.zeros(shape)
    try:
        out = export(
            args.file,
            args.out,
            args.format,
            model=model,
            example_input=example,
            trusted=args.trusted,
            storage_options=args.options,
        )
    except (ValueError, TypeError, ImportError, RuntimeError) as e:
        # What the file holds or what the model expects does not fit: the message names it.
        raise UserError(f"cannot export {args.file}: {e}") from e
    store, name = _target(out, args.options)
    size = store.size(name) if name is not None else 0
    _emit(
        args,
        {"source": args.file, "out": out, "format": args.format, "size": size},
        f"exported {args.file} -> {out} ({args.format}, {human_size(size)})",
    )
    return 0


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``genesis-ckpt``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable); VALUE is parsed as JSON when it can be",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and maintain lightning-genesis-ckpt stores."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ls", parents=[common], help="list committed checkpoints")
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="verify checksums too (reads every file)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", parents=[common], help="verify checksums; exit 1 if anything is corrupt")
    p.add_argument("path", help="a store directory or one checkpoint file")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", parents=[common], help="describe one checkpoint file")
    p.add_argument("file")
    p.add_argument("--trusted", action="store_true", help="allow full pickle (only for files you trust)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "resume-path", parents=[common], help="which checkpoint auto-resume would pick, and why"
    )
    p.add_argument("dir")
    p.set_defaults(func=cmd_resume_path)

    p = sub.add_parser(
        "prune",
        parents=[common],
        help="delete scheduled checkpoints beyond a retention policy (and a superseded interrupt snapshot)",
    )
    p.add_argument("dir")
    p.add_argument("--keep-last", type=int, required=True, help="keep the N with the most training")
    p.add_argument("--keep-best", type=int, default=0, help="also keep the N best by --monitor")
    p.add_argument("--monitor", help="metric for --keep-best (default: the one the records name)")
    p.add_argument("--mode", choices=["min", "max"], default="min")
    p.add_argument(
        "--keep-every-steps", type=int, default=0, help="also keep every checkpoint at a multiple of N steps"
    )
    p.add_argument("--keep-for", help="also keep everything saved within this long (90, 30m, 12h, 7d)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", parents=[common], help="export a checkpoint's model for deployment")
    p.add_argument("file", help="a checkpoint file (Lightning, save/save_checkpoint, or a state dict)")
    p.add_argument("out", help="the artifact to write (path or URL)")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument("--model", help="package.module:Class to trace (torch.export and torchscript only)")
    p.add_argument("--input-shape", help="example input shape to trace with, e.g. 1,32 (program formats)")
    p.add_argument("--trusted", action="store_true", help="allow full pickle (only for files you trust)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The commands print their own result; the library's info lines would say it twice. Warnings stay.
    logging.getLogger("lightning_genesis_ckpt").setLevel(logging.WARNING)
    if (
        getattr(args, "keep_last", 1) < 1
        or getattr(args, "keep_best", 0) < 0
        or getattr(args, "keep_every_steps", 0) < 0
    ):
        parser.error("--keep-last must be at least 1, --keep-best and --keep-every-steps at least 0")
    try:
        args.options = _storage_options(args.storage_option)
        return int(args.func(args))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, GenesisCheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_storage_client_error(e):
            raise  # a bug of ours: the traceback is what a report needs
        # Credentials, endpoint, permissions on an object store: the user's to fix, and the client says how.
        print(
            f"{PROG}: error: the storage backend refused the request ({type(e).__name__}: {e}); "
            "check the URL and the credentials (--storage-option key=VALUE or the backend's environment)",
            file=sys.stderr,
        )
        return 2


__all__ = ["build_parser", "main"]
