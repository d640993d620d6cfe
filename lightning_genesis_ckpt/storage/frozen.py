"""Frozen parameters: checkpoints that leave out what training never changes, and check it on the way back.

A fine-tuning run (LoRA, a frozen backbone) trains a small part of a large model. With frozen exclusion the
``requires_grad=False`` parameters (and the buffers the user names) are removed from each checkpoint's
``state_dict``; the checkpoint keeps a *fingerprint* of them instead, under :data:`FROZEN_KEY`:

* ``names``, ``shapes`` and ``dtypes`` of the left-out tensors, in state-dict order;
* ``checksum``: a crc32 over every left-out tensor's bytes (per-tensor crcs, in name order);
* ``base``: the name of the one full copy of these tensors the store keeps (``frozen_base_<digest>.pth``,
  written once per base, role ``"base"``, which no preservation policy ever deletes).

A checkpoint is made complete again (:func:`complete`) from a source of the frozen tensors, the model as
constructed or the store's base copy, after the source's fingerprint is compared with the checkpoint's: a
different base model is refused with :class:`FrozenBaseMismatchError`, never loaded under trained adapters it
was not trained with.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import FrozenBaseMismatchError
from .checksums import crc32, format_checksum
from .reader import StoreReader

#: Key of the fingerprint in a checkpoint whose frozen tensors were left out.
FROZEN_KEY = "genesis_frozen"
#: Key of the fingerprint in the store's base copy itself (so that loading the copy is not "completing" it).
FROZEN_BASE_KEY = "genesis_frozen_base"
#: The role of a store's full copy of the frozen tensors (not a training checkpoint, never retired).
BASE_ROLE = "base"
#: Where the weights are in a Lightning checkpoint.
WEIGHTS_KEY = "state_dict"

# A tensor's in-place version counter (bumped by every in-place change): torch has no public accessor.
_inplace_version = operator.attrgetter("_version")


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a set of frozen tensors: their names, shapes, dtypes and a checksum of their bytes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    checksum: str

    @property
    def digest(self) -> str:
        """Eight hex digits over the whole fingerprint: names the store's base copy of these tensors."""
        text = "\n".join(
            f"{n}\t{s}\t{d}" for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)
        )
        crc = zlib.crc32(text.encode() + b"\n" + self.checksum.encode())
        return f"{crc & 0xFFFFFFFF:08x}"

    @property
    def base_name(self) -> str:
        """The file name of the store's full copy of these tensors."""
        return f"frozen_base_{self.digest}.pth"

    def to_dict(self) -> dict[str, Any]:
        """A weights-only-loadable encoding (lists, strings and ints only)."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "checksum": self.checksum,
            "base": self.base_name,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str) -> Fingerprint:
        """Parse :meth:`to_dict`'s encoding; raises ``ValueError`` naming ``source`` when malformed."""
        try:
            names = tuple(str(n) for n in d["names"])
            shapes = tuple(tuple(int(x) for x in s) for s in d["shapes"])
            dtypes = tuple(str(t) for t in d["dtypes"])
            checksum = str(d["checksum"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed {FROZEN_KEY!r} entry ({e})") from e
        if not len(names) == len(shapes) == len(dtypes):
            raise ValueError(f"{source}: malformed {FROZEN_KEY!r} entry (lists of different lengths)")
        return cls(names, shapes, dtypes, checksum)


def frozen_names(module: torch.nn.Module, buffers: Iterable[str] = ()) -> list[str]:
    """The state-dict keys of ``module`` that frozen exclusion leaves out: every parameter with
    ``requires_grad=False``, plus the named ``buffers`` (state-dict keys, e.g. ``"backbone.bn.running_mean"``).

    Raises:
        KeyError: a named buffer is not in the module's state dict.
    """
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    keys = list(module.state_dict(keep_vars=True))
    missing = sorted(set(buffers) - set(keys))
    if missing:
        raise KeyError(
            f"frozen_buffers names {', '.join(missing)}, which the model's state_dict does not have "
            f"(its keys look like {', '.join(keys[:3])}...)"
        )
    frozen.update(buffers)
    return [k for k in keys if k in frozen]


class FingerprintCache:
    """Per-tensor crc32s, reused while a tensor is the same storage at the same in-place version.

    Frozen weights do not change between saves, so their bytes are checksummed once per fit, not once per save;
    an in-place change (``p.data.mul_(2)``) bumps the tensor's version counter and is checksummed again.
    """

    def __init__(self) -> None:
        self._crcs: dict[str, tuple[tuple[Any, ...], int]] = {}

    def fingerprint(self, tensors: Mapping[str, torch.Tensor]) -> Fingerprint:
        """The fingerprint of ``tensors`` (name -> tensor, in state-dict order)."""
        crc = 0
        for name, t in tensors.items():
            key = (t.data_ptr(), _inplace_version(t), tuple(t.shape), t.dtype, t.device)
            cached = self._crcs.get(name)
            if cached is None or cached[0] != key:
                cached = (key, tensor_crc(t))
                self._crcs[name] = cached
            crc = zlib.crc32(f"{name}:{cached[1]:08x}\n".encode(), crc)
        return Fingerprint(
            names=tuple(tensors),
            shapes=tuple(tuple(t.shape) for t in tensors.values()),
            dtypes=tuple(str(t.dtype) for t in tensors.values()),
            checksum=format_checksum(crc),
        )


def tensor_crc(t: torch.Tensor) -> int:
    """crc32 of a tensor's bytes in row-major order, wherever it lives (copied to CPU if it must be)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if flat.numel() == 0:
        return 0
    return crc32(flat.view(torch.uint8).numpy().data) & 0xFFFFFFFF


def exclude(
    checkpoint: dict[str, Any], names: list[str], cache: FingerprintCache
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Fingerprint]:
    """A copy of ``checkpoint`` without the ``names`` tensors in its ``state_dict``, carrying their fingerprint.

    Returns the new checkpoint, the tensors left out (for the store's base copy) and their fingerprint. The
    caller's dicts are not changed.
    """
    weights = checkpoint[WEIGHTS_KEY]
    left_out = {n: weights[n] for n in names if n in weights}
    fingerprint = cache.fingerprint(left_out)
    kept = {k: v for k, v in weights.items() if k not in left_out}
    return {**checkpoint, WEIGHTS_KEY: kept, FROZEN_KEY: fingerprint.to_dict()}, left_out, fingerprint


def base_state(tensors: Mapping[str, torch.Tensor], fingerprint: Fingerprint) -> dict[str, Any]:
    """What the store's base copy holds: the frozen tensors and their fingerprint."""
    return {WEIGHTS_KEY: dict(tensors), FROZEN_BASE_KEY: fingerprint.to_dict()}


def fingerprint_of(checkpoint: Any, source: str) -> Fingerprint | None:
    """The fingerprint a checkpoint carries, or None for a complete checkpoint."""
    if not isinstance(checkpoint, Mapping) or FROZEN_KEY not in checkpoint:
        return None
    return Fingerprint.from_dict(checkpoint[FROZEN_KEY], source)


def complete(
    checkpoint: dict[str, Any], frozen: Mapping[str, torch.Tensor], source: str, remedy: str
) -> dict[str, Any]:
    """``checkpoint`` with its left-out tensors put back from ``frozen`` (a state dict holding at least them),
    after checking that they are the tensors it was saved with. A complete checkpoint is returned as it is.

    ``source`` names where ``frozen`` comes from and ``remedy`` what the user can do instead, for the error.

    Raises:
        FrozenBaseMismatchError: ``frozen`` lacks some of the tensors, or their fingerprint differs.
    """
    want = fingerprint_of(checkpoint, source)
    if want is None:
        return checkpoint
    missing = [n for n in want.names if n not in frozen]
    if missing:
        raise FrozenBaseMismatchError(source, missing, "missing", remedy)
    tensors = {n: frozen[n] for n in want.names}
    have = FingerprintCache().fingerprint(tensors)
    if have != want:
        changed = [
            n
            for n, s, d, t in zip(want.names, want.shapes, want.dtypes, tensors.values(), strict=True)
            if (tuple(t.shape), str(t.dtype)) != (s, d)
        ]
        raise FrozenBaseMismatchError(source, changed or list(want.names), "changed", remedy)
    restored = {k: v for k, v in checkpoint.items() if k != FROZEN_KEY}
    restored[WEIGHTS_KEY] = {**tensors, **checkpoint[WEIGHTS_KEY]}
    return restored


def complete_from(
    reader: StoreReader, checkpoint: Any, source: str, model: torch.nn.Module | None = None
) -> Any:
    """``checkpoint`` (loaded from ``source`` in ``reader``'s store) made complete: its left-out frozen tensors
    from ``model`` when given, else from the store's base copy. A complete checkpoint is returned as it is.

    Raises:
        FrozenBaseMismatchError: the source's frozen tensors are not the ones the checkpoint was saved with.
        FileNotFoundError: no ``model`` and the store's base copy is gone.
    """
    want = fingerprint_of(checkpoint, source)
    if want is None:
        return checkpoint
    base_url = reader.url_for(want.base_name)
    if model is not None:
        remedy = f"leave the model out to use the store's copy of the frozen parameters, {base_url}"
        return complete(checkpoint, model.state_dict(), f"the model {type(model).__name__}", remedy)
    if reader.manifest().get(want.base_name) is None:
        raise FileNotFoundError(
            f"{source} was saved without its frozen parameters, and the store's copy of them ({base_url}) is "
            "missing: pass the model constructed from the same base weights to fill them in"
        )
    base = reader.load(want.base_name)
    remedy = "pass the model constructed from the base weights the run was trained on"
    return complete(checkpoint, base[WEIGHTS_KEY], base_url, remedy)
