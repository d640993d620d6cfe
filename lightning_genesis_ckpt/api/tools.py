"""Tools for checking checkpoints and loading their weights into a model that is not quite the same shape."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import CheckpointCorruptError, ManifestError, UnsafeCheckpointError
from ..core.records import METADATA_KEY
from .functional import file_store

#: Prefixes that wrappers add to parameter names: ``DataParallel``/DDP (``module.``) and ``torch.compile``
#: (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

#: Where the common checkpoint layouts keep the model weights: Lightning, ``save_checkpoint``, and the
#: Genesis manager's documented ``{"model": model.state_dict(), ...}``.
_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model")


def extract_model_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint of any common layout.

    A Lightning checkpoint (``"state_dict"``), a :func:`~lightning_genesis_ckpt.save_checkpoint` file
    (``"model_state_dict"``), a Genesis-manager state (``"model"``) or a plain state dict.

    Raises:
        ValueError: no tensors where model weights would be.
    """
    if isinstance(checkpoint, Mapping):
        for key in _WEIGHT_KEYS:
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return {str(k): v for k, v in inner.items() if isinstance(v, torch.Tensor)}
        tensors = {
            str(k): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor) and k != METADATA_KEY
        }
        if tensors:
            return tensors
        keys = ", ".join(map(str, list(checkpoint)[:10])) or "none"
        raise ValueError(
            f"found no model weights: no tensors at the top level or under {_WEIGHT_KEYS} (keys: {keys})"
        )
    raise ValueError(f"found no model weights in a {type(checkpoint).__name__}")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        if "pytorch-lightning_version" in obj or ("state_dict" in obj and "loops" in obj):
            return f"a Lightning checkpoint (epoch {obj.get('epoch')}, step {obj.get('global_step')})"
        if "model_state_dict" in obj and "optimizer_state_dict" in obj:
            return "a save_checkpoint file (model and optimizer state)"
        return f"a dict of {len(obj)} entries"
    return f"a {type(obj).__name__}"


def validate_checkpoint(
    path: str | os.PathLike[str],
    *,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    """Check a checkpoint file without raising: its checksum, that it loads, and that it holds tensors.

    The checksum is compared when the directory's manifest lists the file; otherwise the message says it
    could not be. The file is loaded weights-only unless ``trusted``.

    Returns:
        ``(ok, message)``: the message says what was checked, or what is wrong and what to do.
    """
    try:
        store, name = file_store(path, storage_options)
        display = store.url_for(name)
        record = store.manifest().get(name)
        if record is not None:
            checked = f"checksum {record.checksum} matches the manifest"
        elif store.exists(name):
            checked = "not listed in a manifest, so no checksum to compare"
        else:
            return False, f"{display}: no such file"
        # One pass: the bytes are checksummed as they are read, and what loads is what was checked.
        obj = store.load(name, map_location="cpu", trusted=trusted, serializer="dill" if trusted else None)
    except (CheckpointCorruptError, UnsafeCheckpointError, ManifestError, FileNotFoundError, ValueError) as e:
        return False, str(e)
    except OSError as e:
        return False, f"{os.fspath(path)}: cannot be read ({e})"
    count = sum(1 for _ in _tensors(obj))
    if count == 0:
        return False, f"{display} is {_describe(obj)} but holds no tensors; {checked}"
    try:
        weights = extract_model_state_dict(obj)
        params = sum(t.numel() for t in weights.values())
        detail = f"{len(weights)} weight tensors ({params:,} values)"
    except ValueError:
        detail = f"{count} tensors (no model state dict found)"
    return True, f"{display} is {_describe(obj)} with {detail}; {checked}"


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state_dict_into` did.

    Attributes:
        loaded: model keys that received a value.
        missing: model keys the checkpoint has no value for.
        unexpected: checkpoint keys the model has no place for.
        shape_mismatched: ``(key, checkpoint shape, model shape)`` of values that did not fit (skipped).
        renamed: checkpoint keys loaded under another name (wrapper prefixes stripped), old -> new.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every model key was loaded and every checkpoint key was used."""
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} keys"]
        if self.renamed:
            parts.append(f"{len(self.renamed)} renamed (wrapper prefixes stripped)")
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{label}: {_short(keys)}")
        if self.shape_mismatched:
            shapes = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatched]
            parts.append(f"shape mismatched: {_short(shapes)}")
        return "; ".join(parts)


def _short(items: list[str], n: int = 8) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def strip_key_prefixes(key: str, prefixes: Iterable[str]) -> str:
    """``key`` without any of ``prefixes`` at its front, repeatedly (DDP around a compiled model saves
    ``module._orig_mod.layer.weight``)."""
    prefixes = [p for p in prefixes if p]
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    strict: bool = True,
    strip_prefixes: Iterable[str] = WRAPPER_PREFIXES,
    skip_shape_mismatch: bool = False,
) -> LoadReport:
    """Load weights into ``model``, matching names across wrappers, and report what did not fit.

    Keys are matched exactly first, then with ``strip_prefixes`` removed from the front of both sides, so a
    checkpoint of a ``DataParallel``/DDP or ``torch.compile`` model loads into the plain model (and the
    other way round). ``state_dict`` may also be a whole checkpoint (Lightning, ``save_checkpoint``): its
    model weights are used.

    Args:
        model: the module to load into. It is left unchanged when this raises.
        state_dict: weights, or a checkpoint holding them.
        strict: raise if any model key is missing or any checkpoint key is unexpected.
        strip_prefixes: name prefixes to ignore when matching (add e.g. ``"model."`` for a Lightning module
            that wraps the plain model as ``self.model``).
        skip_shape_mismatch: skip values whose shape differs from the model's (a new classifier head when
            fine-tuning) instead of raising.

    Raises:
        RuntimeError: a shape mismatch without ``skip_shape_mismatch``, or (``strict``) missing or
            unexpected keys. The message lists them.
        ValueError: the prefixes make two names collide, or ``state_dict`` holds no weights.
    """
    wrapped = any(isinstance(state_dict.get(k), Mapping) for k in _WEIGHT_KEYS)
    weights = extract_model_state_dict(state_dict) if wrapped else dict(state_dict)
    weights.pop(METADATA_KEY, None)
    prefixes = tuple(strip_prefixes)
    target_state = model.state_dict()
    by_stripped: dict[str, str] = {}
    for key in target_state:
        stripped = strip_key_prefixes(key, prefixes)
        if stripped in by_stripped:
            raise ValueError(
                f"model keys {by_stripped[stripped]!r} and {key!r} collide once prefixes are stripped"
            )
        by_stripped[stripped] = key
    mapped: dict[str, Any] = {}
    report = LoadReport()
    for key, value in weights.items():
        target = key if key in target_state else by_stripped.get(strip_key_prefixes(key, prefixes))
        if target is None:
            report.unexpected.append(key)
            continue
        if target in mapped:
            raise ValueError(f"checkpoint keys for {target!r} collide once prefixes are stripped")
        current = target_state[target]
        if (
            isinstance(current, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and value.shape != current.shape
        ):
            report.shape_mismatched.append((key, tuple(value.shape), tuple(current.shape)))
            continue
        if target != key:
            report.renamed[key] = target
        mapped[target] = value
    mismatched_targets = {
        key if key in target_state else by_stripped.get(strip_key_prefixes(key, prefixes))
        for key, _, _ in report.shape_mismatched
    }
    report.missing.extend(k for k in target_state if k not in mapped and k not in mismatched_targets)
    report.loaded.extend(mapped)
    if report.shape_mismatched and not skip_shape_mismatch:
        raise RuntimeError(
            f"cannot load into {type(model).__name__}: {report}. Pass skip_shape_mismatch=True to load the "
            "rest and keep the model's own values for those keys."
        )
    if strict and (report.missing or report.unexpected):
        raise RuntimeError(
            f"cannot load into {type(model).__name__} strictly: {report}. Pass strict=False for a partial "
            "load, or strip_prefixes=(...) if the names differ by a prefix."
        )
    model.load_state_dict(mapped, strict=False)
    return report
