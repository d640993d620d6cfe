"""kill -9 a real training process at chosen points inside the commit path and at random moments.

The ≥ 200-trial version of this test is ``benchmarks/stress_kill.py``; see ``crash_harness`` for what each
trial checks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from crash_harness import Kill, KillExperiment

from lightning_genesis_ckpt.storage._faults import POINTS


@pytest.fixture
def experiment(tmp_path: Path) -> Iterator[KillExperiment]:
    exp = KillExperiment(tmp_path, seed=3)
    yield exp
    exp.close()


# Six runs of one chain, from an empty directory, each killed at a chosen point. At every epoch end a run saves
# (data, manifest), copies to best_model.pth when val_loss improved (every epoch but epoch 4 here), and removes
# rolling checkpoints beyond keep_last=2 (manifest, files); hit counts are per run.
CHOSEN = [
    Kill("after-data-before-rename"),  # epoch 0's bytes in a temp file; nothing committed
    Kill("after-rename-before-manifest"),  # epoch 0 under its final name, no manifest at all yet
    Kill("after-rename-before-manifest", 2),  # best_model.pth linked, not listed yet (rebuilt manifest)
    Kill("mid-manifest", 2),  # half of the manifest that commits best_model.pth
    Kill("mid-deletion"),  # epochs 0 and 1 un-committed, files still there
    Kill("after-rename-before-manifest", 3),  # a committed best_model.pth replaced by epoch 5's, not listed
]


def test_kill_9_at_chosen_points_and_random_moments(experiment: KillExperiment) -> None:
    # Then kills at random moments.
    plans = itertools.chain(CHOSEN, experiment.random_plans(points=()))
    tally = experiment.run(plans, trials=12)
    print(tally.summary(), *tally.events, sep="\n")
    assert tally.trials >= 12
    assert set(POINTS) <= set(tally.kills), f"not every kill point was hit: {tally.kills}"
    problems = "\n".join(tally.problems)
    assert (tally.damaged, tally.failed_resumes) == (0, 0), f"{tally.summary()}\n{problems}"
