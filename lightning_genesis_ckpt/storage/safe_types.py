"""The known-safe types that weights-only loading accepts beyond torch's own allowlist, and the check at save.

Hyperparameters and ``on_save_checkpoint`` additions are often a ``pathlib.Path``, a numpy array or scalar,
an omegaconf ``DictConfig``/``ListConfig``, a dataclass or an enum. torch's weights-only unpickler refuses
them all, so a file saved with default settings could not be resumed with default settings. Allowed here:

* **fixed names**: ``pathlib`` path classes, numpy's array/scalar reconstruction (numpy 1 and 2 module
  names), omegaconf's container and node classes, and the plain type objects they reference (``typing.Any``,
  ``builtins.int``...). Building any of them runs no code chosen by the file.
* **dataclasses and enums whose class is already imported** in the loading process: the file can only pick
  among classes the program already has; nothing is imported, and no other global is resolved.

Anything else (a custom class, a function, ``dill`` objects) is still refused, and :func:`refused_objects`
names such objects at the first save so the user hears of it then, not when resuming. That includes
subscripted type hints (``List[int]``, ``tuple[int, ...]``, e.g. in an omegaconf structured config's schema):
they pickle as a call of ``operator.getitem``, a general-purpose function that is not allowed.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import io
import logging
import pathlib
import sys
import typing
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["SafeGlobal", "allowed_globals", "refused_globals", "refused_objects", "resolve", "warn_refused"]

log = logging.getLogger(__name__)

#: What ``torch.serialization.safe_globals`` takes: an object, or an object and the name a file uses for it.
SafeGlobal = Callable[..., Any] | tuple[Callable[..., Any], str]

_FIXED: dict[str, Any] = {
    "pathlib.Path": pathlib.Path,
    "pathlib.PosixPath": pathlib.PosixPath,
    "pathlib.WindowsPath": pathlib.WindowsPath,
    "pathlib.PurePath": pathlib.PurePath,
    "pathlib.PurePosixPath": pathlib.PurePosixPath,
    "pathlib.PureWindowsPath": pathlib.PureWindowsPath,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "typing.Any": typing.Any,
    "collections.defaultdict": collections.defaultdict,
    **{
        f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, frozenset, int, float, bool, str, bytes)
    },
}
# numpy 2 pickles name numpy._core, numpy 1 numpy.core: a file from either loads with either.
for _module in ("numpy._core.multiarray", "numpy.core.multiarray"):
    _FIXED[f"{_module}._reconstruct"] = np._core.multiarray._reconstruct  # type: ignore[attr-defined]
    _FIXED[f"{_module}.scalar"] = np._core.multiarray.scalar  # type: ignore[attr-defined]

#: omegaconf classes by the names its pickles use; imported (a fixed, known module) only when a file needs one.
_OMEGACONF = {
    "omegaconf.dictconfig.DictConfig": ("omegaconf.dictconfig", "DictConfig"),
    "omegaconf.listconfig.ListConfig": ("omegaconf.listconfig", "ListConfig"),
    "omegaconf.tupleconfig.TupleConfig": ("omegaconf.tupleconfig", "TupleConfig"),
    "omegaconf.base.ContainerMetadata": ("omegaconf.base", "ContainerMetadata"),
    "omegaconf.base.Metadata": ("omegaconf.base", "Metadata"),
    **{
        f"omegaconf.nodes.{n}": ("omegaconf.nodes", n)
        for n in (
            "AnyNode",
            "StringNode",
            "IntegerNode",
            "FloatNode",
            "BooleanNode",
            "EnumNode",
            "PathNode",
            "BytesNode",
            "InterpolationResultNode",
        )
    },
}


_NUMPY_DTYPE_CLASSES: list[SafeGlobal] = [
    (cls, f"numpy.dtypes.{name}")
    for name, cls in vars(np.dtypes).items()
    if isinstance(cls, type) and issubclass(cls, np.dtype)
]


def _already_imported(name: str) -> Any:
    """The object ``module.qualname`` names, looked up in ``sys.modules`` only (never imported)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def resolve(name: str) -> Any:
    """The object a checkpoint's global ``name`` may resolve to under weights-only loading, or None."""
    if name in _FIXED:
        return _FIXED[name]
    if name in _OMEGACONF:
        module, attr = _OMEGACONF[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None
    if name.startswith("numpy.dtypes.") and name.endswith("DType"):
        obj = getattr(np.dtypes, name.rsplit(".", 1)[1], None)
        return obj if isinstance(obj, type) and issubclass(obj, np.dtype) else None
    obj = _already_imported(name)
    if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
        return obj
    return None


def refused_globals(source: str | typing.IO[bytes]) -> tuple[list[SafeGlobal], list[str]]:
    """``(allowed, refused)``: the globals in a ``torch.save`` file beyond torch's allowlist.

    ``allowed`` is ready for ``torch.serialization.safe_globals``; ``refused`` are the names weights-only
    loading will reject. A file that is not a torch zip archive gives ``([], [])`` (the loader reports it).
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # not a torch zip, or opcodes the scanner does not know (dill): the loader reports it
        return [], []
    finally:
        if not isinstance(source, str):
            source.seek(0)
    allowed: list[SafeGlobal] = []
    refused: list[str] = []
    for name in sorted(names):
        obj = resolve(name)
        if obj is None:
            refused.append(name)
        else:
            allowed.append((obj, name))
    if any(name.startswith("numpy.") for _, name in allowed):  # type: ignore[misc]
        # A dtype is rebuilt as an instance of its class in numpy.dtypes (Float32DType...), which the
        # unpickler checks when it builds the object; the file does not name it.
        allowed += _NUMPY_DTYPE_CLASSES
    return allowed, refused


def allowed_globals(source: str | typing.IO[bytes]) -> list[SafeGlobal]:
    """The known-safe globals ``source`` needs (see the module docstring)."""
    return refused_globals(source)[0]


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _leaves(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every value in ``obj`` that is not a plain container, a tensor or a scalar, with its path."""
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif type(obj) in (list, tuple, set, frozenset):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


def refused_objects(checkpoint: Any, path: str = "checkpoint", limit: int = 10) -> list[str]:
    """Descriptions of the objects in ``checkpoint`` that weights-only loading would refuse (at most ``limit``).

    Each object found outside plain containers is pickled on its own (hyperparameters are small) and its
    globals are checked exactly as loading will check them.
    """
    found: list[str] = []
    for where, value in _leaves(checkpoint, path):
        buf = io.BytesIO()
        try:
            torch.save(value, buf)
        except Exception as e:  # the real save reports it; here it only means "not loadable"
            found.append(f"{where} (a {_type_name(value)}, which cannot be pickled: {e})")
        else:
            buf.seek(0)
            refused = refused_globals(buf)[1]
            if refused:
                found.append(f"{where} (a {_type_name(value)}: needs {', '.join(refused)})")
        if len(found) >= limit:
            break
    return found


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def warn_refused(checkpoint: Any, url: str) -> None:
    """Log one warning naming each object in ``checkpoint`` (about to be saved to ``url``) that a default
    resume would refuse, with the fix."""
    refused = refused_objects(checkpoint)
    if refused:
        log.warning(
            "%s holds objects that weights-only loading refuses, so resuming from it will stop with "
            "UnsafeCheckpointError: %s. Fix: store them as plain values (dict, list, str, numbers), a pathlib "
            "path, numpy, omegaconf, or a dataclass or Enum (accepted when its module is imported before "
            "loading); or resume with GenesisCheckpoint(trusted=True) if you trust the files.",
            url,
            "; ".join(refused),
        )
