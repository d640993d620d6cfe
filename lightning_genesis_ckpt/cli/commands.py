"""The commands of ``genesis-ckpt``: ``ls``, ``verify``, ``inspect``, ``resume-path``, ``prune``, ``export``."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..api.deploy import export
from ..core.display import human_size
from ..core.errors import GenesisCheckpointError
from ..core.names import MANIFEST_NAME
from ..core.preservation import (
    AnyOf,
    BestN,
    EveryNSteps,
    KeepFor,
    LatestN,
    PreservationPolicy,
    RetentionContext,
    select_deletions,
)
from ..core.records import CheckpointRecord
from ..storage.resume import resolve
from ..storage.store import CheckpointStore
from .common import (
    ROLE_WORDS,
    UserError,
    age,
    emit,
    format_table,
    load_unlisted,
    open_store,
    split_file,
    status,
    target,
)


# ----------------------------------------------------------------------------------------- commands
def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args.dir, args.options)
    records = store.records()
    rows = []
    for r in records:
        rows.append({**r.to_json(), "status": status(store, r, args.verify)})
    if not rows:
        emit(args, [], f"no committed checkpoints in {args.dir}")
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
                age(r.created),
                row["status"],
            ]
        )
    emit(args, rows, format_table(table))
    return 1 if any(row["status"] != "ok" for row in rows) else 0


def cmd_verify(args: argparse.Namespace) -> int:
    store, name = target(args.path, args.options)
    names = [name] if name is not None else [r.name for r in store.records()]
    listed = store.manifest().records if name is None or store.exists(MANIFEST_NAME) else {}
    results = []
    for n in names:
        try:
            if n in listed:
                files = store.verify(n).files
                detail = "checksum matches" if files is None else f"all {len(files)} files match"
                results.append({"name": n, "status": "ok", "detail": f"{detail} the manifest"})
            else:
                # A file the manifest does not list: the best we can do is prove that it loads.
                load_unlisted(store, n, verify=False)
                results.append({"name": n, "status": "ok", "detail": "loads (no manifest checksum)"})
        except FileNotFoundError as e:
            results.append({"name": n, "status": "missing", "detail": str(e)})
        except GenesisCheckpointError as e:
            results.append({"name": n, "status": "corrupt", "detail": str(e)})
    bad = [r for r in results if r["status"] != "ok"]
    lines = [f"{r['status']:8} {r['name']}: {r['detail']}" for r in results]
    lines.append(f"{len(results) - len(bad)} ok, {len(bad)} bad" if results else "nothing to verify")
    emit(args, results, "\n".join(lines))
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
    store, name = target(args.file, args.options)
    if name is None:
        raise UserError(f"{args.file!r} is a directory; inspect takes a checkpoint file")
    if store.exists(MANIFEST_NAME) and name in store.manifest().records:
        obj = store.load(name, trusted=args.trusted)
    else:
        obj = load_unlisted(store, name, trusted=args.trusted)
    info = {"file": store.url_for(name), **_describe(obj)}
    lines = [f"{k}: {v}" for k, v in info.items() if k not in ("keys", "hparams")]
    if "keys" in info:
        lines.append("keys: " + ", ".join(info["keys"]))
    if info.get("hparams"):
        lines.append("hparams: " + ", ".join(f"{k}={v}" for k, v in info["hparams"].items()))
    emit(args, info, "\n".join(lines))
    return 0


def cmd_resume_path(args: argparse.Namespace) -> int:
    store = open_store(args.dir, args.options)
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
    emit(args, payload, "\n".join(lines))
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
    recorded = sorted({k for r in records for k in r.metrics})
    if args.monitor and records and args.monitor not in recorded:
        # A typo would otherwise protect nothing: BestN ranks records without the metric last.
        raise UserError(
            f"--monitor {args.monitor!r} is not a metric of any checkpoint in {args.dir}; recorded: "
            + (", ".join(recorded) if recorded else "none")
        )
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
        reader = open_store(args.dir, args.options)
        records = reader.records()
        doomed = select_deletions(records, _prune_policy(args, records), RetentionContext(now=time.time()))
    else:
        open_store(args.dir, args.options)  # a missing directory is a user error, not a new store
        with CheckpointStore(args.dir, args.options, verbose=False).transaction() as tx:
            records = tx.manifest.sorted()
            policy = _prune_policy(args, records)
            doomed = tx.delete(select_deletions(records, policy, RetentionContext(now=time.time())))
    verb = "would remove" if args.dry_run else "removed"
    emit(
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
    out_dir = split_file(args.out)[0]
    destination = open_store(out_dir, args.options, must_exist=False)
    if destination.local and not destination.is_directory():
        # The user names a file; creating the directories on its way (at the filesystem root, say) is a
        # typo turned into litter.
        raise UserError(f"cannot export to {args.out}: directory {out_dir!r} does not exist; create it first")
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
    store, name = target(out, args.options)
    size = store.size(name) if name is not None else 0
    emit(
        args,
        {"source": args.file, "out": out, "format": args.format, "size": size},
        f"exported {args.file} -> {out} ({args.format}, {human_size(size)})",
    )
    return 0
