"""FabricCheckpointer: the store for ``lightning.fabric`` loops (LitGPT and the like), in a few calls.

::

    ckpt = FabricCheckpointer(fabric, "s3://bucket/run", keep_last=3, monitor="val_loss")
    state = {"model": model, "optimizer": optimizer, "step": 0}
    ckpt.resume(state)                      # newest valid checkpoint, into ``state`` in place
    with ckpt.guard(state):                 # a crash or Ctrl+C writes interrupt_checkpoint.pth
        while state["step"] < max_steps:
            ...                             # one optimizer step
            state["step"] += 1
            if state["step"] % 100 == 0:
                ckpt.save(state, metrics={"val_loss": val_loss})
            if ckpt.preempted():            # SIGTERM: stop here, snapshot, exit 143
                break

Every write is one store transaction (the same commit protocol as the Trainer callback): the file, the
retention decision and the manifest commit together, on rank 0 only. The state dict is built the way
``fabric.save`` builds it (modules and optimizers through the strategy), on every rank, because some
strategies gather it with collectives; decisions rank 0 makes reach every rank through
:func:`.distributed.on_rank_zero`, errors included, so a failed save raises everywhere instead of hanging.

Strategies that write one file per rank (FSDP with ``state_dict_type="sharded"``, DeepSpeed, ModelParallel's
distributed checkpoints) are refused with an error that says so: use their full state dict, or
``fabric.save``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

import torch

from ..core.names import INTERRUPT_NAME, step_name
from ..core.preservation import (
    AnyOf,
    BestN,
    LatestN,
    Mode,
    PreservationPolicy,
    RetentionContext,
    select_deletions,
)
from ..core.records import CheckpointRecord
from ..storage.resume import resolve
from ..storage.store import CheckpointStore
from . import rng
from .distributed import on_rank_zero

log = logging.getLogger(__name__)

#: Where the global RNG states travel in the file (beside the user's keys).
RNG_KEY = "genesis_rng"

_SHARDED = ("DeepSpeedStrategy", "XLAFSDPStrategy")


def _unwrap(obj: Any) -> Any:
    # Fabric's wrappers (_FabricModule, _FabricOptimizer) hold the objects the strategy knows how to save;
    # Lightning's own unwrapping helper is the one that follows every wrapper (torch.compile included).
    from lightning.fabric.wrappers import _unwrap_objects

    return _unwrap_objects(obj)


def _check_strategy(strategy: Any) -> None:
    name = type(strategy).__name__
    sharded = name in _SHARDED
    if name == "FSDPStrategy" and getattr(strategy, "_state_dict_type", "full") != "full":
        sharded = True
    if name == "ModelParallelStrategy" and getattr(strategy, "_save_distributed_checkpoint", True):
        sharded = True
    if sharded:
        raise ValueError(
            f"FabricCheckpointer writes one verified file from rank 0, and {name} as configured saves one "
            "file per rank: use its full state dict (e.g. FSDPStrategy(state_dict_type='full')), or "
            "fabric.save for sharded checkpoints"
        )


class FabricCheckpointer:
    """Atomic, checksummed checkpoints of a Fabric state dict, with retention, RNG, resume and snapshots.

    Files in ``dirpath``: ``checkpoint_step_{step}.pth`` (rolling, kept by ``keep_last`` / ``save_top_k`` or
    ``preserve``), ``interrupt_checkpoint.pth`` (a crash, Ctrl+C or a preemption inside :meth:`guard`), and
    ``genesis_manifest.json``. Each file is the state dict ``fabric.save`` would write, plus the global RNG
    states under ``"genesis_rng"``; ``torch.load(weights_only=True)`` reads it.

    Args:
        fabric: the launched ``lightning.fabric.Fabric``.
        dirpath: directory path or fsspec URL (``memory://...``, ``s3://bucket/prefix``...).
        monitor: metric (passed to :meth:`save`) that decides which checkpoints ``save_top_k`` protects.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        save_top_k: also keep the ``k`` best checkpoints by ``monitor`` (0: none).
        keep_last: how many of the newest rolling checkpoints to keep (at least 1).
        preserve: a preservation policy instead of ``keep_last`` and ``save_top_k``.
        storage_options: passed to fsspec (credentials, endpoints); never written to files or logs.
        trusted: allow resuming from files that need full pickle. Only for files you trust.
        verbose: log one info line per save and resume.
        preemption_signals: signals that :meth:`preempted` reports (inside :meth:`guard`).

    Raises:
        ValueError: a setting is out of range, or the strategy writes one file per rank.
    """

    def __init__(
        self,
        fabric: Any,
        dirpath: str,
        *,
        monitor: str | None = None,
        mode: Mode = "min",
        save_top_k: int = 1,
        keep_last: int = 3,
        preserve: PreservationPolicy | None = None,
        storage_options: Mapping[str, Any] | None = None,
        trusted: bool = False,
        verbose: bool = True,
        preemption_signals: tuple[int | str, ...] = ("SIGTERM",),
    ) -> None:
        if keep_last < 1 or save_top_k < 0:
            raise ValueError(
                f"FabricCheckpointer: keep_last must be at least 1 and save_top_k at least 0, got "
                f"keep_last={keep_last}, save_top_k={save_top_k}"
            )
        _check_strategy(fabric.strategy)
        from .preemption import parse_signals

        self.fabric = fabric
        self.store = CheckpointStore(str(dirpath), storage_options, verbose=verbose)
        self.monitor = monitor
        self.trusted = trusted
        policies: list[PreservationPolicy] = [LatestN(keep_last)]
        if monitor is not None and save_top_k:
            policies.append(BestN(save_top_k, monitor, mode))
        self.policy: PreservationPolicy = preserve if preserve is not None else AnyOf(*policies)
        self.signals = parse_signals(preemption_signals)
        #: The checkpoint :meth:`resume` loaded, kept until a checkpoint with more training commits.
        self.resumed_from: CheckpointRecord | None = None
        self._signal: int | None = None

    # ------------------------------------------------------------------------------------- saving
    def _state_dict(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """What ``fabric.save`` would write: modules and optimizers through the strategy (on every rank)."""
        strategy = self.fabric.strategy
        out: dict[str, Any] = {}
        for key, obj in _unwrap(dict(state)).items():
            if key == RNG_KEY:
                raise ValueError(f"{RNG_KEY!r} is reserved for the RNG states; rename that key of the state")
            if isinstance(obj, torch.nn.Module):
                out[key] = strategy.get_module_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                out[key] = strategy.get_optimizer_state(obj)
            elif callable(getattr(obj, "state_dict", None)) and callable(
                getattr(obj, "load_state_dict", None)
            ):
                out[key] = obj.state_dict()  # schedulers, samplers, anything stateful
            else:
                out[key] = obj
        out[RNG_KEY] = rng.capture()
        return out

    def _commit(
        self, name: str, payload: dict[str, Any], role: str, step: int, metrics: Any
    ) -> CheckpointRecord:
        with self.store.transaction() as tx:
            record = tx.write(
                name, payload, role=role, global_step=step, metrics=metrics, monitor=self.monitor, backup=True
            )
            if role == "step":
                context = RetentionContext(
                    now=time.time(), just_committed=record, resumed_from=self.resumed_from
                )
                tx.delete(select_deletions(tx.manifest.records.values(), self.policy, context))
        return record

    def save(
        self, state: Mapping[str, Any], *, step: int | None = None, metrics: Mapping[str, float] | None = None
    ) -> CheckpointRecord:
        """Commit ``state`` as ``checkpoint_step_{step}.pth`` and apply retention. Call it on every rank.

        Args:
            state: the Fabric state dict (``{"model": ..., "optimizer": ..., "step": ...}``).
            step: the optimizer steps taken; default ``state["step"]``.
            metrics: scalar metrics to record (``monitor`` among them for ``save_top_k``).

        Returns:
            The committed record, on every rank.

        Raises:
            CheckpointSaveError: the write or the commit failed (on every rank); what was committed is intact.
            ValueError: no step is given and ``state`` has no ``"step"``.
        """
        if step is None:
            if not isinstance(state.get("step"), int):
                raise ValueError("FabricCheckpointer.save: pass step=..., or keep an int under state['step']")
            step = int(state["step"])
        clean = {k: float(v) for k, v in (metrics or {}).items()}
        payload = self._state_dict(state)  # every rank: the strategy may gather with collectives
        record = self._on_rank_zero(lambda: self._commit(step_name(step), payload, "step", step, clean))
        if self.resumed_from is not None and (record.global_step or 0) > (self.resumed_from.global_step or 0):
            self.resumed_from = None
        return record

    def _on_rank_zero(self, step: Any) -> Any:
        f = self.fabric
        return on_rank_zero(f.strategy, f.is_global_zero, f.world_size, step)

    # ------------------------------------------------------------------------------------ resuming
    def resume(self, state: dict[str, Any], *, strict: bool = True) -> CheckpointRecord | None:
        """Load the newest valid checkpoint into ``state`` in place (modules, optimizers, other keys) and
        restore the RNG states. Call it on every rank, after ``fabric.setup``.

        Rank 0 picks the checkpoint (a missing or corrupt one is skipped with a warning); every rank loads
        that file, verified against the manifest. Returns the record, or None when there is nothing to
        resume from (``state`` is untouched).

        Raises:
            UnsafeCheckpointError: the file needs full pickle and ``trusted`` is False.
            KeyError: ``strict`` and the file lacks a key of ``state``.
        """
        record = self._on_rank_zero(lambda: resolve(self.store, load=False).record)
        if record is None:
            return None
        checkpoint = self.store.load(record.name, trusted=self.trusted)
        missing = [k for k in state if k not in checkpoint]
        if strict and missing:
            raise KeyError(f"{self.store.url_for(record.name)} has no {missing} of the state to restore")
        unwrapped = _unwrap(dict(state))
        strategy = self.fabric.strategy
        for key, obj in unwrapped.items():
            if key not in checkpoint:
                continue
            if isinstance(obj, torch.nn.Module):
                strategy.load_module_state_dict(obj, checkpoint[key], strict=strict)
            elif callable(getattr(obj, "load_state_dict", None)):
                obj.load_state_dict(checkpoint[key])
            else:
                state[key] = checkpoint[key]
        if RNG_KEY in checkpoint:
            rng.restore(checkpoint[RNG_KEY])
        self.resumed_from = record
        if self.store.verbose:
            log.info("resumed from %s (step %s)", self.store.url_for(record.name), record.global_step)
        return record

    # -------------------------------------------------------------------------------- interruptions
    def preempted(self) -> bool:
        """Whether a preemption signal arrived (on any rank) since :meth:`guard` began. Call it on every
        rank at a point where the state is consistent (after an optimizer step): it is a collective."""
        return bool(self.fabric.strategy.reduce_boolean_decision(self._signal is not None, all=False))

    def snapshot(self, state: Mapping[str, Any]) -> CheckpointRecord:
        """Commit ``interrupt_checkpoint.pth`` now (every rank calls it; rank 0 writes)."""
        step = int(state.get("step", 0)) if isinstance(state.get("step", 0), int) else 0
        payload = self._state_dict(state)
        return self._on_rank_zero(lambda: self._commit(INTERRUPT_NAME, payload, "interrupt", step, None))

    @contextlib.contextmanager
    def guard(self, state: Mapping[str, Any]) -> Iterator[FabricCheckpointer]:
        """Snapshot ``state`` when the block is left by an exception, Ctrl+C or a preemption.

        * A preemption signal only sets a flag (the state may be mid-step when it arrives): when the loop
          stops at :meth:`preempted` and leaves the block, the snapshot is committed on every rank's behalf
          and the process exits with ``128 + signal`` (143 for SIGTERM).
        * An exception or ``KeyboardInterrupt`` is re-raised after rank 0 wrote the snapshot from its own
          state, without a collective (the other ranks may be gone); that is exact for replicated state
          (one device, DDP), which is what this checkpointer saves.
        """
        previous = {sig: signal.getsignal(sig) for sig in self.signals}

        def note(signum: int, frame: FrameType | None) -> None:
            self._signal = signum

        for sig in self.signals:
            signal.signal(sig, note)
        try:
            yield self
        except BaseException as e:
            if self.fabric.is_global_zero:
                try:
                    step = state.get("step", 0)
                    payload = self._local_state_dict(state)
                    self._commit(
                        INTERRUPT_NAME, payload, "interrupt", step if isinstance(step, int) else 0, None
                    )
                    log.warning("interrupted (%s): snapshot committed", type(e).__name__)
                except Exception as failure:  # the original error matters more; say why there is no snapshot
                    log.error("could not write the interrupt snapshot: %s", failure)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._signal is not None:
            self.snapshot(state)
            code = 128 + int(self._signal)
            log.warning(
                "preempted by %s: snapshot committed, exiting with %d",
                signal.Signals(self._signal).name,
                code,
            )
            sys.exit(code)

    def _local_state_dict(self, state: Mapping[str, Any]) -> dict[str, Any]:
        # Without the strategy: its getters may be collectives, and after a crash no other rank joins them.
        out: dict[str, Any] = {}
        for key, obj in _unwrap(dict(state)).items():
            module = (
                getattr(obj, "module", obj)
                if isinstance(obj, torch.nn.parallel.DistributedDataParallel)
                else obj
            )
            out[key] = module.state_dict() if callable(getattr(module, "state_dict", None)) else module
        out[RNG_KEY] = rng.capture()
        return out
