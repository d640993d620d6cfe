"""When the callback saves: the save-decision policy its settings make, the moments it is asked, and which
logged metrics belong to each moment.

The callback asks at three kinds of save point (see :mod:`lightning_genesis_ckpt.core.save_decision`):

* ``"step"``: after a batch that ended with an optimizer step (``on_train_batch_end``), for the step and
  time triggers;
* ``"validation"``: at the end of a validation run in the middle of an epoch (``val_check_interval < 1`` or a
  batch count), where ``best_model.pth`` is judged and the validation trigger saves;
* ``"epoch"``: at the end of an epoch (``on_train_epoch_end``, after the epoch's own validation).

A save point at the last batch of an epoch, or at the step that reaches ``max_steps``, is taken at the epoch
end instead: the same step, once, with the epoch's metrics and its validation's (a state saved there also
resumes at the next epoch's start, which the epoch end handles exactly).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from ..core.save_decision import (
    AfterValidation,
    AnySave,
    EpochInterval,
    Event,
    SaveContext,
    SaveDecisionPolicy,
    StepInterval,
    TimeInterval,
)
from . import _lightning_loops, fit_state

#: Which metric sources are fresh at each save point (see :func:`_lightning_loops.metric_sources`).
_FRESH: dict[Event, frozenset[str]] = {
    "step": frozenset({"train_step", "train"}),
    "validation": frozenset({"train_step", "train", "validation"}),
    "epoch": frozenset({"train_step", "train", "train_epoch"}),
}


class Triggers:
    """The callback's save schedule: epoch, step, time and validation triggers combined in one policy.

    Args:
        every_n_epochs: see :class:`~lightning_genesis_ckpt.GenesisCheckpoint`.
        every_n_train_steps: save every ``n`` optimizer steps (None or 0: no step trigger).
        train_time_interval: save once this much wall time has passed since the last save (None: none).
        save_on_validation: save after every validation run.
    """

    def __init__(
        self,
        every_n_epochs: int,
        every_n_train_steps: int | None,
        train_time_interval: datetime.timedelta | float | None,
        save_on_validation: bool,
    ) -> None:
        self.epoch_policy = EpochInterval(every_n_epochs)
        policies: list[SaveDecisionPolicy] = [self.epoch_policy]
        if every_n_train_steps:
            policies.append(StepInterval(every_n_train_steps))
        if train_time_interval is not None:
            policies.append(TimeInterval(train_time_interval))
        if save_on_validation:
            policies.append(AfterValidation())
        self.policy = AnySave(*policies)
        self.at_steps = bool(every_n_train_steps) or train_time_interval is not None
        #: The time trigger reads each rank's clock: its decision must be rank 0's, broadcast. The others are
        #: pure functions of the loop counters, which every rank shares.
        self.needs_rank_zero = train_time_interval is not None
        self.last_step: int | None = None
        self.last_time: float | None = None
        self._validated_at: tuple[int, int] | None = None

    def start(self) -> None:
        """Training (re)starts: the time trigger counts from now."""
        self.last_step = None
        self.last_time = time.time()
        self._validated_at = None

    def saved(self, global_step: int) -> None:
        """A scheduled checkpoint was saved at ``global_step``."""
        self.last_step = global_step
        self.last_time = time.time()

    def validation_ended(self, trainer: Any) -> None:
        self._validated_at = (trainer.current_epoch, trainer.global_step)

    def validated(self, trainer: Any) -> bool:
        """A validation run ended at this step of this epoch (its metrics are this moment's)."""
        return self._validated_at == (trainer.current_epoch, trainer.global_step)

    def context(self, trainer: Any, event: Event) -> SaveContext:
        return SaveContext(
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            now=time.time(),
            is_final=event == "epoch" and fit_state.is_final_epoch(trainer),
            last_step=self.last_step,
            last_time=self.last_time,
            event=event,
            validated=self.validated(trainer),
        )

    @staticmethod
    def deferred_to_epoch_end(trainer: Any) -> bool:
        """Whether the epoch ends after this batch (its last, or ``max_steps``): the epoch end saves."""
        return bool(trainer.fit_loop.epoch_loop._is_training_done)

    def fresh_metrics(self, trainer: Any, event: Event) -> dict[str, float]:
        """The scalar metrics that belong to this save point, and only those.

        A validation metric belongs to it when that validation ended at this step; an epoch aggregate only
        to the epoch end; a step value to the step that logged it. Metrics of unknown origin (put into
        ``callback_metrics`` by other code) are kept at epoch ends only.
        """
        sources = _lightning_loops.metric_sources(trainer)
        values = fit_state.scalar_metrics(trainer)
        if event == "step":
            # This batch's step values reach callback_metrics after the on_train_batch_end hooks.
            values.update(fit_state.scalars(_lightning_loops.step_metrics(trainer)))
        fresh = set(_FRESH[event])
        if event == "epoch" and self.validated(trainer):
            fresh.add("validation")
        return {
            k: v for k, v in values.items() if (sources[k] in fresh if k in sources else event == "epoch")
        }
