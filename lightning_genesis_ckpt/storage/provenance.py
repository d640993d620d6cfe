"""What wrote a checkpoint: the versions of this library, torch and Lightning, recorded with every one."""

from __future__ import annotations

import contextlib
import functools


@functools.cache
def library_versions() -> dict[str, str]:
    """Versions of this library, torch and Lightning (whichever flavour is installed), without importing
    Lightning."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"torch": str(torch.__version__)}
    with contextlib.suppress(PackageNotFoundError):
        out["lightning_genesis_ckpt"] = version("lightning-genesis-ckpt")
    for dist in ("pytorch-lightning", "lightning"):
        with contextlib.suppress(PackageNotFoundError):
            out["lightning"] = version(dist)
            break
    return out
