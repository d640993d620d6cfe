"""Preemption signals (SIGTERM, SLURM's ``--signal=USR1@120``...): stop at a safe point, exit with 128 + signal.

Lightning's own SIGTERM handling stops the loops at the next batch, even between two gradient-accumulation
steps (the accumulated gradients are in no checkpoint) or inside validation (a restart re-runs a shortened
validation and reshuffles the next epoch). :class:`Preemption` takes the signals over once training runs and
requests Lightning's stop only at a *safe point*: after a batch that ended with an optimizer step, and never
inside validation during ``fit`` (a validation that has started runs to its end). A second signal while the
stop is held back requests it at once. Before training starts (the sanity check), the stop is immediate.

After the stop, :meth:`exit_code` gives what the process should exit with: ``128 + signal`` by default (143
for SIGTERM, what schedulers such as SLURM and Kubernetes read as "killed by the signal", not "finished").
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from . import _lightning_loops

log = logging.getLogger(__name__)

SignalSpec = int | str


def parse_signals(signals: Iterable[SignalSpec]) -> tuple[signal.Signals, ...]:
    """``["SIGTERM", "USR1", 12]`` -> Signals; raises ValueError naming a signal that cannot be handled."""
    if isinstance(signals, (str, int)):
        signals = [signals]
    out: list[signal.Signals] = []
    for spec in signals:
        try:
            if isinstance(spec, str):
                name = spec.upper()
                sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            else:
                sig = signal.Signals(spec)
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"GenesisCheckpoint(preemption_signals=...): {spec!r} is not a signal of this platform"
            ) from e
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"GenesisCheckpoint(preemption_signals=...): {sig.name} cannot be caught")
        if sig not in out:
            out.append(sig)
    return tuple(out)


class Preemption:
    """Owns the preemption signals of one ``fit``: when the stop is requested, and how long it all took.

    Args:
        signals: the signals that mean "this job is being preempted".
        exit_code: what a preempted process exits with; None: ``128 + signal number``.
    """

    def __init__(self, signals: Iterable[SignalSpec] = ("SIGTERM",), exit_code: int | None = None) -> None:
        self.signals = parse_signals(signals)
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
            raise ValueError(f"GenesisCheckpoint(preemption_exit_code={exit_code!r}) must be an int or None")
        self._exit_code = exit_code
        self._trainer: Any = None
        self._previous: dict[signal.Signals, list[Callable[..., Any]]] = {}
        self._deferring = False
        self._holding = False  # a validation inside fit is running
        self._requested = False
        #: The first preemption signal of this ``fit`` and when it arrived (``time.monotonic()``).
        self.signum: int | None = None
        self.received_at: float | None = None
        self._count = 0

    # ---------------------------------------------------------------------------------- install
    def reset(self) -> None:
        self._trainer = None
        self._previous = {}
        self._deferring = self._holding = self._requested = False
        self.signum = self.received_at = None
        self._count = 0

    def release(self) -> None:
        """Forget the trainer (its ``fit`` ended); what stopped it stays readable for the exit code."""
        self._trainer = None
        self._previous = {}
        self._deferring = self._holding = False

    def take_over(self, trainer: Any, *, defer: bool) -> None:
        """Handle the signals from now on (called once Lightning registered its own handlers).

        Lightning's teardown puts back the handlers that were there before ``fit``, ours included out.
        """
        self._deferring = defer
        if self._trainer is trainer or threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for sig in self.signals:
            self._previous[sig] = _lightning_loops.other_handlers(trainer, signal.getsignal(sig))
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
        for handler in self._previous.get(signal.Signals(signum), []):
            handler(signum, frame)
        if self._count > 1 and self._deferring and not self._requested:
            log.warning(
                "second %s: stopping now instead of at the next safe point; the resumed run is not "
                "guaranteed to be bit-identical",
                signal.Signals(signum).name,
            )
            self._deferring = False
        if not self._deferring:
            self._request()

    def _request(self) -> None:
        if self._trainer is None or self.signum is None or self._requested:
            return
        self._requested = True
        _lightning_loops.request_stop(self._trainer, self.signum)

    # ------------------------------------------------------------------------------- safe points
    @property
    def pending(self) -> bool:
        """A signal arrived and the stop has not been requested yet."""
        return self.signum is not None and not self._requested

    def after_train_batch(self, trainer: Any) -> None:
        if self.pending and not self._holding and _lightning_loops.at_optimizer_step_boundary(trainer):
            self._request()

    def validation_started(self, trainer: Any) -> None:
        if self._deferring:
            self._holding = True
            if self._requested:
                # Requested after the batch that triggers this validation: let the validation finish.
                _lightning_loops.withdraw_stop(trainer)
                self._requested = False

    def epoch_ended(self, trainer: Any) -> None:
        # The fit loop checks for a stop once the epoch is complete (plateau schedulers stepped): the cleanest
        # point of all, so a signal that arrived during the epoch-end hooks stops here, not a batch later.
        if self.pending and not self._holding:
            self._request()

    def validation_ended(self, trainer: Any) -> None:
        if self._holding:
            self._holding = False
            if self.pending and _lightning_loops.at_optimizer_step_boundary(trainer):
                self._request()

    # --------------------------------------------------------------------------------- reporting
    def exit_code(self, default_signum: int = signal.SIGTERM) -> int:
        """The code a preempted process exits with (see the class docstring)."""
        if self._exit_code is not None:
            return self._exit_code
        return 128 + int(self.signum if self.signum is not None else default_signum)

    def describe(self, default_signum: int = signal.SIGTERM) -> str:
        """``"SIGTERM"``, or ``"SIGUSR1 (2 signals)"``: what stopped the run, for log lines."""
        name = signal.Signals(self.signum if self.signum is not None else default_signum).name
        return name if self._count <= 1 else f"{name} ({self._count} signals)"

    def seconds_since_signal(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at
