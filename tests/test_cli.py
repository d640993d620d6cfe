"""The genesis-ckpt CLI, run as a real subprocess (python -m lightning_genesis_ckpt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_genesis_ckpt import CheckpointStore
from lightning_genesis_ckpt.core.names import epoch_name

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lightning_genesis_ckpt", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "ck"
    store = CheckpointStore(str(d), verbose=False)
    for epoch, loss in enumerate([0.5, 0.2, 0.4, 0.3]):
        state = {
            "state_dict": {"w": torch.full((4,), float(epoch))},
            "loops": {},
            "optimizer_states": [],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.1},
        }
        store.save(
            epoch_name(epoch),
            state,
            role="epoch",
            epoch=epoch,
            global_step=10 * (epoch + 1),
            metrics={"val_loss": loss},
            monitor="val_loss",
        )
    store.copy(epoch_name(1), "best_model.pth")
    return d


def test_ls_table_and_json(store_dir: Path) -> None:
    out = cli("ls", str(store_dir))
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["name", "role", "epoch", "step", "metric", "size", "age", "status"]
    assert [r.split()[0] for r in rows] == [epoch_name(i) for i in range(4)] + ["best_model.pth"]
    assert all(r.split()[-1] == "ok" for r in rows)
    data = json.loads(cli("ls", str(store_dir), "--json").stdout)
    assert data[-1]["name"] == "best_model.pth" and data[-1]["metrics"] == {"val_loss": 0.2}


def test_verify_reports_corruption_with_exit_1(tmp_path: Path, store_dir: Path) -> None:
    assert cli("verify", str(store_dir)).returncode == 0
    d = tmp_path / "copy"
    import shutil

    shutil.copytree(store_dir, d)
    with open(d / epoch_name(2), "r+b") as f:
        f.seek(80)
        f.write(b"\xff\xff")
    out = cli("verify", str(d))
    assert out.returncode == 1
    assert f"corrupt  {epoch_name(2)}" in out.stdout and "4 ok, 1 bad" in out.stdout
    one = cli("verify", str(d / epoch_name(2)), "--json")
    assert one.returncode == 1 and json.loads(one.stdout)[0]["status"] == "corrupt"
    ls = cli("ls", str(d), "--verify", "--json")
    assert {r["name"]: r["status"] for r in json.loads(ls.stdout)}[epoch_name(2)] == "corrupt"
    assert ls.returncode == 1, "a listing that shows a problem says so in its exit code"
    os.remove(d / epoch_name(3))
    missing = cli("ls", str(d), "--json")
    assert {r["name"]: r["status"] for r in json.loads(missing.stdout)}[epoch_name(3)] == "missing"
    assert missing.returncode == 1


def test_inspect(store_dir: Path) -> None:
    out = cli("inspect", str(store_dir / "best_model.pth"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tensors"] == 1 and info["tensor_bytes"] == 16
    assert info["hparams"] == {"lr": "0.1"} and info["rng"] is False
    assert "torch" in info["versions"]


def test_resume_path_explains_skips(tmp_path: Path, store_dir: Path) -> None:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(store_dir, d)
    os.truncate(d / epoch_name(3), 50)
    out = cli("resume-path", str(d))
    assert out.returncode == 0, out.stderr
    assert f"skipped {epoch_name(3)}" in out.stdout
    assert f"would use {d / 'best_model.pth'}" in out.stdout or f"would use {d / epoch_name(2)}" in out.stdout
    data = json.loads(cli("resume-path", str(d), "--json").stdout)
    assert data["path"] == str(d / epoch_name(2)) and data["skipped"][0]["name"] == epoch_name(3)


def test_prune_dry_run_then_real(tmp_path: Path, store_dir: Path) -> None:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(store_dir, d)
    dry = cli("prune", str(d), "--keep-last", "1", "--keep-best", "1", "--dry-run", "--json")
    assert json.loads(dry.stdout) == {"dry_run": True, "removed": [epoch_name(0), epoch_name(2)]}
    assert (d / epoch_name(0)).exists()
    real = cli("prune", str(d), "--keep-last", "1", "--keep-best", "1")
    assert real.returncode == 0 and "removed 2" in real.stdout
    assert sorted(p.name for p in d.glob("*.pth")) == sorted(["best_model.pth", epoch_name(1), epoch_name(3)])


def test_prune_refuses_a_monitor_that_no_checkpoint_recorded(tmp_path: Path, store_dir: Path) -> None:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(store_dir, d)
    typo = cli("prune", str(d), "--keep-last", "1", "--keep-best", "1", "--monitor", "val_los")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "'val_los' is not a metric" in typo.stderr and "recorded: val_loss" in typo.stderr
    assert sorted(p.name for p in d.glob("*.pth")) == sorted(p.name for p in store_dir.glob("*.pth"))


def test_verify_and_inspect_of_one_file_never_read_its_neighbours(tmp_path: Path) -> None:
    # A folder of the user's, no manifest: one checkpoint, a README, and a damaged neighbour.
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pth")
    (tmp_path / "README.md").write_text("# my project\n")
    (tmp_path / "broken.pth").write_bytes(b"\x80\x02garbage")
    for command in ("verify", "inspect"):
        ok = cli(command, str(tmp_path / "model.pth"))
        assert ok.returncode == 0, ok.stderr
        assert ok.stderr == "", f"{command} read more than the file it was given: {ok.stderr}"
        stray = cli(command, str(tmp_path / "README.md"))
        assert stray.returncode == 2 and "Traceback" not in stray.stderr
        assert len(stray.stderr.strip().splitlines()) == 1
        assert "README.md is not a readable checkpoint" in stray.stderr and "broken.pth" not in stray.stderr
    assert not (tmp_path / "genesis_manifest.json").exists()


def test_export_never_creates_directories_the_user_did_not_name(tmp_path: Path, store_dir: Path) -> None:
    out = cli("export", str(store_dir / "best_model.pth"), str(tmp_path / "no_such_dir" / "m.safetensors"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "directory" in out.stderr and "no_such_dir" in out.stderr and "does not exist" in out.stderr
    assert not (tmp_path / "no_such_dir").exists()


def test_help_answers_without_importing_torch_fsspec_or_lightning() -> None:
    # --help of every command; what is imported is the cost (torch alone takes seconds), so that is checked.
    code = (
        "import sys\n"
        "from lightning_genesis_ckpt.cli import main\n"
        "for argv in (['--help'], *([c, '--help'] for c in "
        "('ls', 'verify', 'inspect', 'resume-path', 'prune', 'export'))):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "heavy = ('torch', 'fsspec', 's3fs', 'numpy', 'lightning', 'pytorch_lightning')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: genesis-ckpt" in out.stdout and "--keep-best" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ls", "/definitely/not/here"), "is not a directory"),
        (("verify", "/definitely/not/here"), "does not exist"),
        (("ls", "nosuchprotocol://bucket/x"), "cannot open"),
        (("ls", "x", "--storage-option", "novalue"), "key=value"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: tuple[str, ...], message: str) -> None:
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_inspect_of_garbage_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(1000))
    out = cli("inspect", str(bad))
    assert out.returncode == 2 and "bad.pth" in out.stderr and "corrupt" in out.stderr
    assert "Traceback" not in out.stderr


def test_export_safetensors_writes_the_weights_only(tmp_path: Path, store_dir: Path) -> None:
    from safetensors.torch import load_file

    out_file = tmp_path / "model.safetensors"
    out = cli("export", str(store_dir / "best_model.pth"), str(out_file), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["format"], report["size"]) == ("safetensors", out_file.stat().st_size)
    weights = load_file(str(out_file))
    assert list(weights) == ["w"] and torch.equal(weights["w"], torch.full((4,), 1.0))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--format", "torch.export"), "needs --model"),
        (("--format", "torch.export", "--model", "nomodule", "--input-shape", "1,4"), "package.module:Class"),
        (
            ("--format", "torch.export", "--model", "json:loads", "--input-shape", "1,4"),
            "not a torch.nn.Module",
        ),
        (("--format", "torch.export", "--model", "torch.nn:Linear", "--input-shape", "a,b"), "--input-shape"),
    ],
)
def test_export_bad_options_are_one_line_exit_2(
    tmp_path: Path, store_dir: Path, extra: tuple[str, ...], message: str
) -> None:
    out = cli("export", str(store_dir / "best_model.pth"), str(tmp_path / "m.pt2"), *extra)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m.pt2").exists()


def test_export_of_a_missing_file_names_it(tmp_path: Path) -> None:
    out = cli("export", str(tmp_path / "nope.pth"), str(tmp_path / "m.safetensors"))
    assert out.returncode == 2 and "nope.pth" in out.stderr and "Traceback" not in out.stderr


def test_commands_reach_an_object_store_through_storage_options(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from conftest import make_target

    target = make_target(request, tmp_path, "s3")
    store = target.store(verbose=False)
    for epoch in range(2):
        store.save(
            epoch_name(epoch),
            {"w": torch.full((4,), float(epoch))},
            role="epoch",
            epoch=epoch,
            global_step=epoch + 1,
        )
    options = [
        arg
        for k, v in target.storage_options.items()
        for arg in ("-o", f"{k}={json.dumps(v) if isinstance(v, dict) else v}")
    ]
    listed = cli("ls", target.url, "--verify", "--json", *options)
    assert listed.returncode == 0, listed.stderr
    assert [(r["name"], r["status"]) for r in json.loads(listed.stdout)] == [
        ("checkpoint_epoch_0.pth", "ok"),
        ("checkpoint_epoch_1.pth", "ok"),
    ]
    picked = cli("resume-path", target.url, "--json", *options)
    assert json.loads(picked.stdout)["path"] == f"{target.url}/checkpoint_epoch_1.pth"
    exported = cli("export", f"{target.url}/checkpoint_epoch_1.pth", f"{target.url}/w.safetensors", *options)
    assert exported.returncode == 0, exported.stderr
    # Without the options the same URL is a clear one-line error, not a traceback.
    denied = cli("ls", target.url)
    assert denied.returncode == 2 and "Traceback" not in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1


def test_prune_retires_the_interrupt_snapshot_by_the_callbacks_rule(tmp_path: Path) -> None:
    from lightning_genesis_ckpt import cli as cli_module

    d = str(tmp_path / "ck")
    store = CheckpointStore(d, verbose=False)
    store.save(epoch_name(0), {"w": torch.zeros(2)}, role="epoch", epoch=0, global_step=10)
    store.save("interrupt_checkpoint.pth", {"w": torch.ones(2)}, role="interrupt", epoch=1, global_step=15)
    assert cli_module.main(["prune", d, "--keep-last", "5"]) == 0
    assert "interrupt_checkpoint.pth" in CheckpointStore(d).manifest().records, (
        "nothing has more training yet"
    )
    store.save(epoch_name(1), {"w": torch.ones(2)}, role="epoch", epoch=1, global_step=20)
    assert cli_module.main(["prune", d, "--keep-last", "5"]) == 0
    assert "interrupt_checkpoint.pth" not in CheckpointStore(d).manifest().records
