"""Deployment exports of a checkpoint: weights only (safetensors), or a runnable program (torch.export,
TorchScript) of a given model class traced with an example input.

The artifacts are standard: load them back with ``safetensors.torch.load_file``, ``torch.export.load`` or
``torch.jit.load``; serving them needs neither this library nor the training code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..core.names import EXPORT_FORMATS
from ..storage.serialization import SPOOL_IN_MEMORY
from .functional import file_store, load
from .tools import WRAPPER_PREFIXES, extract_model_state_dict, load_state_dict_into, strip_key_prefixes

log = logging.getLogger(__name__)

ExportFormat = Literal["safetensors", "torch.export", "torchscript"]
FORMATS = EXPORT_FORMATS


def export(
    checkpoint_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    format: ExportFormat = "safetensors",
    *,
    model: nn.Module | type[nn.Module] | None = None,
    example_input: torch.Tensor | tuple[Any, ...] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    strip_prefixes: Iterable[str] = WRAPPER_PREFIXES,
    strict: bool = True,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    frozen_from: nn.Module | None = None,
) -> str:
    """Export a checkpoint's model for deployment; the output file is written atomically.

    Formats:
        * ``"safetensors"``: the model weights only, no optimizer or training state, no pickle. Wrapper
          prefixes (``module.``, ``_orig_mod.``) are stripped from the names. Needs the ``safetensors``
          package (``pip install 'lightning-genesis-ckpt[export]'``).
        * ``"torch.export"``: an ``ExportedProgram`` (``.pt2``) of ``model`` with the checkpoint's weights,
          traced with ``example_input``; load with ``torch.export.load(path).module()``.
        * ``"torchscript"``: a traced TorchScript module for runtimes that still need it (libtorch); torch
          itself deprecates TorchScript in favour of ``torch.export``.

    Args:
        checkpoint_path: a Lightning checkpoint, a ``save``/``save_checkpoint`` file, a Genesis-manager
            state or a plain state dict (path or fsspec URL). Checksum-verified when listed in a manifest.
        out_path: where to write the artifact (path or fsspec URL).
        format: one of the formats above.
        model: for the program formats, the model class (instantiated with ``model_kwargs``, or with the
            checkpoint's ``hyper_parameters`` for a LightningModule checkpoint) or an instance.
        example_input: a tensor, or a tuple of positional arguments, to trace ``model`` with.
        model_kwargs: constructor arguments when ``model`` is a class.
        strip_prefixes: key prefixes removed before the weights are matched to ``model`` (see
            ``load_state_dict_into``).
        strict: whether every key must match (see ``load_state_dict_into``).
        trusted: allow a checkpoint that needs full pickle to load.
        storage_options: passed to fsspec for both paths.
        frozen_from: for a checkpoint saved with ``exclude_frozen=True``, the model to take its frozen
            parameters from (checked against the checkpoint's fingerprint); None: the store's copy of them.

    Returns:
        The output path or URL.

    Raises:
        ValueError: an unknown format, or a program format without ``model`` / ``example_input``.
        ImportError: ``safetensors`` is not installed.
    """
    if format not in FORMATS:
        raise ValueError(f"export format {format!r} is not supported: use one of {', '.join(FORMATS)}")
    if format != "safetensors" and (model is None or example_input is None):
        raise ValueError(f"format={format!r} needs model= (a class or an instance) and example_input=")
    checkpoint = load(
        checkpoint_path,
        map_location="cpu",
        trusted=trusted,
        storage_options=storage_options,
        frozen_from=frozen_from,
    )
    weights = extract_model_state_dict(checkpoint)
    store, name = file_store(out_path, storage_options)
    if format == "safetensors":
        data = _safetensors_bytes(weights, strip_prefixes, source=os.fspath(checkpoint_path))
        with store.transaction() as tx:  # committed like any checkpoint: atomically, checksummed, recorded
            tx.write_stream(name, lambda f: f.write(data), overwrite_unlisted=True, versions={})
        log.info(
            "exported %d weight tensors of %s to %s",
            len(weights),
            os.fspath(checkpoint_path),
            store.url_for(name),
        )
        return store.url_for(name)
    module = _instantiate(model, model_kwargs, checkpoint)
    load_state_dict_into(module, weights, strict=strict, strip_prefixes=strip_prefixes)
    module = module.to("cpu").eval()
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    # torch.export.save seeks back into what it wrote: the program is built in a scratch file (memory up to
    # 512 MiB, a local temp file above), then committed.
    with torch.no_grad(), tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as scratch:
        _save_program(format, module, args, scratch)
        scratch.seek(0)
        with store.transaction() as tx:
            tx.write_stream(
                name,
                lambda f: shutil.copyfileobj(scratch, f, 8 * 2**20),
                overwrite_unlisted=True,
                versions={},
            )
    log.info("exported %s of %s to %s", format, os.fspath(checkpoint_path), store.url_for(name))
    return store.url_for(name)


def _save_program(format: str, module: nn.Module, args: tuple[Any, ...], f: Any) -> None:
    if format == "torch.export":
        torch.export.save(torch.export.export(module, args), f)
    else:
        torch.jit.save(torch.jit.trace(module, args), f)


def _instantiate(
    model: nn.Module | type[nn.Module] | None, model_kwargs: Mapping[str, Any] | None, checkpoint: Any
) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, type) and issubclass(model, nn.Module):
        kwargs = model_kwargs
        if kwargs is None and isinstance(checkpoint, Mapping):
            # What LightningModule.load_from_checkpoint does with save_hyperparameters() checkpoints.
            hparams = checkpoint.get("hyper_parameters")
            if isinstance(hparams, Mapping) and any(c.__name__ == "LightningModule" for c in model.__mro__):
                # LightningCLI's _instantiator/_class_path, dropped arguments: Lightning's own rules. (Lightning
                # is imported already: the class is a LightningModule.)
                from ..adapter._lightning import instantiate_from_hparams

                module: nn.Module = instantiate_from_hparams(model, dict(hparams))
                return module
            kwargs = hparams if isinstance(hparams, Mapping) else None
        return model(**dict(kwargs or {}))
    raise TypeError(f"model= must be an nn.Module class or instance, got {model!r}")


def _safetensors_bytes(
    weights: Mapping[str, torch.Tensor], strip_prefixes: Iterable[str], source: str
) -> bytes:
    try:
        from safetensors.torch import save as safetensors_save
    except ImportError as e:
        raise ImportError(
            "format='safetensors' needs the safetensors package: pip install 'lightning-genesis-ckpt[export]'"
        ) from e
    prefixes = tuple(strip_prefixes)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in weights.items():
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights): give each its own copy.
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        new_key = strip_key_prefixes(key, prefixes)
        if new_key in out:
            raise ValueError(f"weights {key!r} and another collide as {new_key!r} once prefixes are stripped")
        out[new_key] = tensor
    return bytes(safetensors_save(out, metadata={"format": "pt", "source": os.path.basename(source)}))
