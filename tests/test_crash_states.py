"""Power-loss crash states (tests/crash_states/): a bounded, seeded sample of the full run.

Every workload runs once, in one process recorded by strace; the sample then judges, under both persistence
models, the crash states just after every call returned plus a seeded sample of the other crash points, and a
real Trainer resumes from two of them. The full run is ``benchmarks/crashstates.py`` (docs/crash-states.md).

The regression tests below are the states the explorer found before the fixes, each rebuilt from the current
trace: where an op's loss broke the state, that op must now be durable at that crash point (and the state that
loses it anyway is still judged bad, so the test keeps its teeth); the directory exchange, which broke with
nothing lost, must now pass.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from crash_states import explore, strace
from crash_states.broken import BROKEN
from crash_states.persistence import Ordered, Weak
from crash_states.workloads import WORKLOADS

pytestmark = pytest.mark.skipif(
    strace.unavailable_reason() is not None,
    reason=f"crash-state tests need strace: {strace.unavailable_reason()}",
)

SEED = 12  # printed in a failure: rerun `benchmarks/crashstates.py --seed 12 --cap 16 --points 25` to see it
CAP, POINTS = 16, 25


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = explore.scratch_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, scratch: Path) -> dict[str, explore.Study]:
    return explore.studies(list(WORKLOADS), tmp_path_factory.mktemp("crash-states"), scratch)


def _report(cells: list[explore.Cell]) -> str:
    lines = []
    for c in cells:
        for f in c.findings[:3]:
            lines.append(f"{c.workload}/{c.model} (seed {SEED}): {f.where}")
            lines.extend(f"    {v}" for v in f.violations[:4])
    return "\n".join(lines)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_sampled_crash_states_keep_every_committed_checkpoint(
    studies: dict[str, explore.Study], name: str
) -> None:
    resumes = 1 if name in ("interrupt", "best") else 0  # a real Trainer resumes from a crash state
    cells = [
        explore.explore(studies[name], model, seed=SEED, cap=CAP, points=POINTS, resume_samples=resumes)
        for model in explore.MODELS
    ]
    assert all(c.states > 0 for c in cells)
    assert sum(c.resumes for c in cells) == 2 * resumes
    assert not any(c.bad_states for c in cells), _report(cells)


def test_the_oracle_reports_every_broken_commit(tmp_path: Path, scratch: Path) -> None:
    # An explorer that can never fail proves nothing: each deliberately broken commit must be caught, under
    # both models (every crash point, the two extreme states at each).
    studies = explore.studies(list(BROKEN), tmp_path, scratch)
    cells = [explore.explore(studies[n], model, seed=SEED, cap=2) for n in BROKEN for model in explore.MODELS]
    quiet = [f"{c.workload}/{c.model}" for c in cells if not c.bad_states]
    assert not quiet, f"no violation reported for {quiet}"
    kinds: dict[str, set[str]] = {}
    for c in cells:
        kinds.setdefault(c.workload, set()).update(c.kinds)
    assert "committed-lost" in kinds["broken-rename-before-fsync"]  # renamed before its bytes were durable
    assert "committed-lost" in kinds["broken-no-dir-fsync"]  # a returned commit that a power cut undoes
    assert "listed-invalid" in kinds["broken-manifest-first"]  # listed while its data does not exist yet
    assert "listed-invalid" in kinds["broken-overwrite-in-place"]  # the committed file truncated in place


def _kinds(study: explore.Study, p: int, lost: frozenset[int]) -> set[str]:
    violations, _ = study.judge(p, lost)
    return {v.kind for v in violations}


def test_a_new_dirpath_is_durable_when_the_first_commit_returns(studies: dict[str, explore.Study]) -> None:
    # Found by the explorer (weak model): the callback made runs/exp1 with mkdir and never fsync'd a parent, so
    # a power cut after epoch 0's commit returned could take the directory, and the checkpoint, away.
    study = studies["first_save"]
    p = study.point_after("epoch 0 end")
    mkdirs = frozenset(
        op.idx for op in study.ops[:p] if op.kind == "mkdir" and op.note in ("runs", "runs/exp1")
    )
    assert len(mkdirs) == 2
    weak = Weak(study.ops)
    assert all(weak.durable(p, i) for i in mkdirs)
    assert {"committed-lost", "resume-regressed"} <= _kinds(study, p, mkdirs)


def test_the_intent_marker_is_durable_before_the_data_takes_its_name(
    studies: dict[str, explore.Study],
) -> None:
    # Found by the explorer (weak model): the rename of epoch 1's file reached the disk, its intent marker did
    # not; the next start could not prove the unlisted file ours and left it there for good.
    study = studies["rolling"]
    name = "ckpt/checkpoint_epoch_1.pth"
    rename = next(op for op in study.ops if op.kind == "rename" and op.note.endswith(f"-> {name}"))
    marker_name = "ckpt/.genesis-tmp-intent-checkpoint_epoch_1.pth"  # written whole, then renamed to its name
    marker = next(
        op
        for op in study.ops
        if (op.kind == "create" and op.note == marker_name)
        or (op.kind == "rename" and op.note.endswith(f"-> {marker_name}"))
    )
    p = rename.idx + 1
    assert Weak(study.ops).durable(p, marker.idx)
    assert "uncommitted-survived" in _kinds(study, p, frozenset({marker.idx}))


def test_a_crash_after_a_directory_exchange_keeps_the_complete_new_tree(
    studies: dict[str, explore.Study],
) -> None:
    # Found by the explorer (both models, and kill -9 alike: nothing lost): after the exchange that replaces a
    # committed directory checkpoint and before the manifest's commit, the old record no longer matched the
    # tree, so the name was skipped -- and the old tree, under a temp name, was swept: epoch 1 was lost.
    study = studies["directory"]
    exchange = next(op for op in study.ops if op.kind == "exchange")
    for p in (exchange.idx + 1, exchange.idx + 2):  # before and after the directory's fsync
        violations, chosen = study.judge(p, frozenset())
        assert violations == []
        assert chosen == ("checkpoint_epoch_1.pth", 1)
    assert study.expectations[study.interval(exchange.idx + 1)].during == "save_directory epoch 1 step 25"


def test_the_replaced_tree_is_removed_only_once_the_exchange_is_durable(
    studies: dict[str, explore.Study],
) -> None:
    # Found by the explorer (weak model): write_directory's cleanup removed the replaced tree, which the exchange
    # had put under the pending temp name, before the directory holding both names was fsync'd. A power cut
    # could keep those unlinks and lose the exchange: the committed epoch 1 came back without its shards.
    study = studies["directory"]
    exchange = next(op for op in study.ops if op.kind == "exchange")
    aside = exchange.note.split(" -> ")[0]
    removals = [
        op
        for op in study.ops[exchange.idx + 1 :]
        if op.kind in ("unlink", "rmdir") and op.note.startswith(f"{aside}/")
    ]
    assert removals, f"the replaced tree {aside} was never removed"
    assert Weak(study.ops).durable(removals[0].idx, exchange.idx)
    violations, _ = study.judge(removals[0].idx + 1, frozenset())
    assert violations == []


def test_a_deleted_directory_is_renamed_aside_durably_before_it_is_emptied(
    studies: dict[str, explore.Study],
) -> None:
    # Found by the explorer (weak model): retention renamed checkpoint_epoch_0.pth to a temp name and removed
    # its files at once; a power cut could keep the unlinks and lose the rename, leaving a half-emptied tree
    # under the standard name, no longer listed and without the record that proves it ours.
    study = studies["directory"]
    weak = Weak(study.ops)
    checked = 0
    for rename in (op for op in study.ops if op.kind == "rename" and "/.genesis-tmp-" in op.note):
        source, aside = rename.note.split(" -> ")
        removals = [
            o for o in study.ops[rename.idx + 1 :] if o.kind == "unlink" and o.note.startswith(f"{aside}/")
        ]
        if not source.startswith("ckpt/checkpoint_") or not removals:
            continue
        assert weak.durable(removals[0].idx, rename.idx), f"{source} emptied before its rename was durable"
        # The state that keeps every unlink, the record's last, and loses the rename: judged bad (teeth).
        assert "half-deleted-survived" in _kinds(study, removals[-1].idx + 1, frozenset({rename.idx}))
        checked += 1
    assert checked, "the directory workload deletes no directory checkpoint"


def test_register_makes_the_file_durable_before_committing_it(studies: dict[str, explore.Study]) -> None:
    # Found by the explorer (both models): import_checkpoint of a file the user had just written registered it
    # as it was in the page cache; a power cut could then leave a committed record over a torn or missing file.
    study = studies["versions"]
    p = study.point_after("import_checkpoint in place")
    user = [
        op.idx
        for op in study.ops[:p]
        if op.note.startswith("ckpt/pretrained.pt") and op.kind in ("create", "write")
    ]
    assert len(user) >= 3
    for model in (Ordered(study.ops), Weak(study.ops)):
        assert all(model.durable(p, i) for i in user)
    assert "listed-invalid" in _kinds(study, p, frozenset(user[-1:]))
