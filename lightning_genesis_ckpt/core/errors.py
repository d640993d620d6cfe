"""Our own error meanings. Filesystem conditions use the standard library's exceptions instead.

Every error names the file or setting it is about and says what to do next.
"""

from __future__ import annotations

import pickle
from collections.abc import Collection


class GenesisCheckpointError(Exception):
    """Base class of every error this library raises for its own meanings."""


class CheckpointCorruptError(GenesisCheckpointError, pickle.UnpicklingError):
    """A checkpoint file is damaged: truncated, wrong checksum, not a checkpoint at all.

    It subclasses :class:`pickle.UnpicklingError` so that code written against ``torch.load`` /
    Genesis ``load`` keeps catching it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"checkpoint {path!r} is corrupt: {reason}")
        self.path = path
        self.reason = reason


class UnsafeCheckpointError(GenesisCheckpointError, pickle.UnpicklingError):
    """A checkpoint holds Python objects that loading would have to execute code to rebuild."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"refusing to load {path!r}: it contains objects that are not plain tensors or containers "
            f"({detail}). Loading it could run arbitrary code. If you trust this file, load it with "
            f"trusted=True (GenesisCheckpoint(..., trusted=True) for auto-resume), or allow the specific "
            f"types with torch.serialization.add_safe_globals([...])."
        )
        self.path = path


class ManifestError(GenesisCheckpointError):
    """The store's manifest cannot be used as it is (for example, written by a newer version)."""

    def __init__(self, path: str, reason: str, *, newer_format: bool = False) -> None:
        super().__init__(f"manifest {path!r}: {reason}")
        self.path = path
        self.reason = reason
        #: True when the manifest was written by a newer format: it must never be rebuilt over.
        self.newer_format = newer_format


class StoreLockedError(GenesisCheckpointError):
    """Another live run holds the checkpoint directory (or took it over from this one)."""


class CheckpointSaveError(GenesisCheckpointError, OSError):
    """A checkpoint could not be committed (disk full, I/O error...). Everything committed before it is intact.

    It is an :class:`OSError` carrying the original ``errno`` (``e.errno == errno.ENOSPC`` for a full disk),
    chained from the original error.
    """

    def __init__(self, path: str, cause: OSError, intact: str) -> None:
        message = (
            f"could not save checkpoint {path!r}: {cause.strerror or cause}. The checkpoints committed before "
            f"are intact and listed: {intact}. Training stops here rather than go on unprotected; fix the storage (free space, check "
            f"the mount or network) and run the same command again to resume from the newest checkpoint."
        )
        # OSError(errno, strerror) keeps ``.errno``; with no errno it would print "[Errno None]".
        super().__init__(*((cause.errno, message) if cause.errno is not None else (message,)))
        self.path = path


class MonitorNotFoundError(GenesisCheckpointError, ValueError):
    """The ``monitor`` metric was never logged by the time it was needed."""


class FrozenBaseMismatchError(GenesisCheckpointError, ValueError):
    """A checkpoint saved without its frozen parameters met frozen parameters other than the ones it was
    trained on (a different base model, changed or missing tensors)."""

    def __init__(self, source: str, names: list[str], how: str, remedy: str) -> None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(
            f"the base model changed: the frozen parameters {shown} from {source} are {how} compared with the "
            f"fingerprint the checkpoint was saved with. Construct the model from the same base weights, or {remedy}"
        )
        self.source = source
        self.names = names


#: Packages whose exceptions mean "the storage service said no" (credentials, endpoint, permissions):
#: fsspec backends let some of them through unwrapped instead of turning them into an ``OSError``.
STORAGE_CLIENT_PACKAGES = ("botocore", "aiobotocore", "google", "azure", "gcsfs", "adlfs", "s3fs")


def is_storage_client_error(error: BaseException) -> bool:
    """Whether ``error`` comes from an object-store client library rather than from this library or torch."""
    return any(cls.__module__.split(".")[0] in STORAGE_CLIENT_PACKAGES for cls in type(error).__mro__)


def store_answered(error: BaseException, codes: Collection[str], statuses: Collection[int]) -> bool:
    """Whether an object store answered one of ``codes`` (S3 error codes) or HTTP ``statuses``, anywhere
    along ``error``'s cause chain (s3fs wraps the client's error in an ``OSError``)."""
    cause: BaseException | None = error
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in codes or status in statuses:
                return True
        cause = cause.__cause__
    return False
