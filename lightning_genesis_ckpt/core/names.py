"""File names: the store's own files, the standard checkpoint names and the roles they imply. Pure.

Standard names sort in numeric order when parsed (``checkpoint_epoch_10`` after ``checkpoint_epoch_9``): every
ordering goes through the numbers, never through the strings.
"""

from __future__ import annotations

import re

MANIFEST_NAME = "genesis_manifest.json"
#: The writer's lock file (see :mod:`lightning_genesis_ckpt.lock`); never a checkpoint.
LOCK_NAME = "genesis.lock"
BEST_NAME = "best_model.pth"
INTERRUPT_NAME = "interrupt_checkpoint.pth"
EPOCH_PREFIX = "checkpoint_epoch_"
EPOCH_SUFFIX = ".pth"
STEP_PREFIX = "checkpoint_step_"
STEP_SUFFIX = ".pth"
VERSION_PREFIX = "version_"
VERSION_SUFFIX = ".pth"
#: While ``genesis.save`` replaces a file, its previous content is kept under this suffix until the new one
#: has committed.
BACKUP_SUFFIX = ".genesis.bak"
#: The record a directory checkpoint carries inside itself, so that it can be rebuilt like a file.
DIRECTORY_RECORD = ".genesis_record.json"

#: Every temporary file of ours starts with this; the only names the sweep may remove on sight.
TMP_PREFIX = ".genesis-tmp-"
_INTENT_PREFIX = f"{TMP_PREFIX}intent-"

ROLES = ("epoch", "step", "best", "interrupt", "manual", "version")
#: Roles that retention may delete: the checkpoints saved on a schedule.
ROLLING_ROLES = ("epoch", "step")
#: Roles whose files hold a full training state and can therefore be resumed from.
RESUMABLE_ROLES = ("epoch", "step", "interrupt", "best")

_EPOCH_RE = re.compile(rf"^{EPOCH_PREFIX}(\d+){re.escape(EPOCH_SUFFIX)}$")
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+){re.escape(STEP_SUFFIX)}$")
_VERSION_RE = re.compile(rf"^{VERSION_PREFIX}(.+){re.escape(VERSION_SUFFIX)}$")


def epoch_name(epoch: int) -> str:
    """The file name of the rolling checkpoint of ``epoch``."""
    return f"{EPOCH_PREFIX}{int(epoch)}{EPOCH_SUFFIX}"


def epoch_of_name(name: str) -> int | None:
    """The epoch number in a rolling checkpoint's file name, or None for any other name."""
    m = _EPOCH_RE.match(name)
    return int(m.group(1)) if m else None


def step_name(step: int) -> str:
    """The file name of the checkpoint taken at optimizer step ``step``."""
    return f"{STEP_PREFIX}{int(step)}{STEP_SUFFIX}"


def step_of_name(name: str) -> int | None:
    """The step number in a step checkpoint's file name, or None for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def version_of_name(name: str) -> str | None:
    """The version name in a named version's file name (``version_<name>.pth``), or None."""
    m = _VERSION_RE.match(name)
    return m.group(1) if m else None


def role_of_name(name: str, default: str = "manual") -> str:
    """The role implied by one of our standard file names."""
    if name == BEST_NAME:
        return "best"
    if name == INTERRUPT_NAME:
        return "interrupt"
    if epoch_of_name(name) is not None:
        return "epoch"
    if step_of_name(name) is not None:
        return "step"
    if version_of_name(name) is not None:
        return "version"
    return default


def is_copy_name(name: str) -> bool:
    """Whether the store commits copies of other checkpoints under ``name`` (best_model.pth, versions).

    A file under such a name may carry another name inside it (it is a byte-identical copy of the checkpoint
    it was made from) and still be the store's own.
    """
    return name == BEST_NAME or version_of_name(name) is not None


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name that cannot leave its directory."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\x00")


def is_relative_file_path(path: object) -> bool:
    """Whether ``path`` is a ``/``-separated relative path that stays inside its directory."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary names (the only files the sweep may remove on sight)."""
    return name.startswith(TMP_PREFIX)


def is_reserved(name: str) -> bool:
    """The store's own bookkeeping files, which are never checkpoints."""
    return name in (MANIFEST_NAME, LOCK_NAME) or is_temp_name(name) or name.endswith(BACKUP_SUFFIX)


def intent_name(final_name: str) -> str:
    """The marker that announces a write of ``final_name`` until the manifest has committed it."""
    return f"{_INTENT_PREFIX}{final_name}"


def intent_target(name: str) -> str | None:
    """The file an intent marker announces, or None if ``name`` is not an intent marker."""
    return name[len(_INTENT_PREFIX) :] if name.startswith(_INTENT_PREFIX) else None


# The artifact formats of ``genesis.export`` (here, not in the exporter, so the CLI can offer them without
# importing torch).
EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "torch.export", "torchscript")
