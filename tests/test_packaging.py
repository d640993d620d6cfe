"""The built distribution works on its own: a missing package file or entry point fails here.

Builds the sdist and, from it, the wheel (``python -m build``, as a release would), installs the wheel into a
fresh virtualenv and runs the CLI and a tiny fit from there, in a directory outside the source tree. The new
venv has no pip and no dependencies of its own: a ``.pth`` file puts this environment's site-packages after
its own, so torch and Lightning are reused (not downloaded), while ``lightning_genesis_ckpt`` itself can only
come from the wheel (the editable install's hook lives in a ``.pth`` file there, which a ``.pth`` entry does
not run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)

FIT = textwrap.dedent(
    """
    import sys
    import torch
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_genesis_ckpt
    from lightning_genesis_ckpt import CheckpointStore, GenesisCheckpoint

    print("package:", lightning_genesis_ckpt.__file__)


    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[GenesisCheckpoint("ckpts", verbose=False)],
    )
    trainer.fit(Tiny(), data)
    print("records:", [r.name for r in CheckpointStore("ckpts", verbose=False).records()])
    """
)


def run(cmd: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_wheel_from_sdist_installs_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # --no-isolation: build with this environment's setuptools instead of downloading one.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], cwd=tmp_path)
    (sdist,) = dist.glob("lightning_genesis_ckpt-*.tar.gz")
    (wheel,) = dist.glob("lightning_genesis_ckpt-*.whl")

    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_genesis_ckpt").rglob("*.py"))
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    assert [m for m in modules if m not in in_wheel] == [], "modules missing from the wheel"
    assert "lightning_genesis_ckpt/py.typed" in in_wheel
    with tarfile.open(sdist) as tf:
        in_sdist = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    assert [m for m in modules if m not in in_sdist] == [], "modules missing from the sdist"
    assert {"pyproject.toml", "README.md"} <= in_sdist

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
        ).stdout.strip()
    )
    (site / "dev-env-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cli = str(venv / "bin" / "genesis-ckpt")
    assert "usage: genesis-ckpt" in run([cli, "--help"], cwd=work, env=env).stdout

    (work / "fit.py").write_text(FIT)
    out = run([str(python), "fit.py"], cwd=work, env=env).stdout
    package_file = Path(out.split("package: ", 1)[1].split("\n", 1)[0])
    assert package_file.is_relative_to(site), f"imported {package_file}, not the installed wheel in {site}"
    assert "records: ['checkpoint_epoch_0.pth', 'checkpoint_epoch_1.pth']" in out, out

    listing = run([cli, "ls", "ckpts", "--verify"], cwd=work, env=env).stdout
    assert "checkpoint_epoch_1.pth" in listing and "ok" in listing, listing
