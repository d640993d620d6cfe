"""Lightning's own example scripts, with GenesisCheckpoint as their only checkpoint callback, run to the end.

``examples/lightning/`` holds Lightning's ``autoencoder.py``, ``backbone_image_classifier.py`` and the demos
Transformer script, changed only where marked ``# genesis:`` (synthetic data, the callback). Each runs as a
user runs it, in its own process, a few batches long, including the final ``test(ckpt_path="best")``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import ROOT

import lightning_genesis_ckpt as genesis
from lightning_genesis_ckpt import CheckpointStore

EXAMPLES = ROOT / "examples" / "lightning"
TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.limit_predict_batches=2",
    "--trainer.enable_progress_bar=false",
    "--data.batch_size=8",
]


def run_example(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(cwd),
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def loaded_paths(proc: subprocess.CompletedProcess[str]) -> list[str]:
    prefix = "Loaded model weights from the checkpoint at "
    return [
        line.split(prefix, 1)[1].strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if prefix in line
    ]


def test_autoencoder_example_and_its_export(tmp_path: Path) -> None:
    proc = run_example("autoencoder.py", tmp_path, *TINY)
    ckpts = tmp_path / "checkpoints" / "autoencoder"
    # No monitor: "best" is the newest checkpoint, as with ModelCheckpoint's default.
    newest = str(ckpts / "checkpoint_epoch_1.pth")
    assert loaded_paths(proc) == [newest, newest]  # test(ckpt_path="best"), predict(ckpt_path="best")
    assert "test_loss" in proc.stdout
    CheckpointStore(str(ckpts)).verify("checkpoint_epoch_1.pth")

    # LightningCLI checkpoints carry _instantiator in their hyperparameters: export builds the model the way
    # load_from_checkpoint does.
    spec = importlib.util.spec_from_file_location("genesis_example_autoencoder", EXAMPLES / "autoencoder.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(EXAMPLES))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    hparams = torch.load(newest, weights_only=True)["hyper_parameters"]
    assert hparams["_instantiator"].endswith("instantiate_module")
    out = genesis.export(
        newest,
        str(tmp_path / "ae.pt2"),
        "torch.export",
        model=module.LitAutoEncoder,
        example_input=torch.rand(2, 784),
    )
    program = torch.export.load(out).module()
    reference = module.LitAutoEncoder.load_from_checkpoint(newest).eval()
    x = torch.rand(2, 784)  # the traced batch size
    with torch.no_grad():
        assert torch.equal(program(x), reference(x))


def test_backbone_example_with_the_callback_from_a_yaml_config(tmp_path: Path) -> None:
    proc = run_example(
        "backbone_image_classifier.py", tmp_path, "--config", str(EXAMPLES / "genesis.yaml"), *TINY
    )
    ckpts = tmp_path / "checkpoints" / "backbone"
    best = str(ckpts / "best_model.pth")
    assert loaded_paths(proc) == [best, best]
    record = CheckpointStore(str(ckpts)).manifest().get("best_model.pth")
    assert record is not None and record.monitor == "valid_loss_epoch" and record.metric() is not None
    # LightningCLI saved the resolved config: the callback with its init_args, as a user would commit it.
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    (callback,) = saved["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_genesis_ckpt.GenesisCheckpoint"
    assert callback["init_args"]["preemption_signals"] == ["SIGTERM", "SIGUSR1"]


def test_transformer_demo(tmp_path: Path) -> None:
    proc = run_example("transformer.py", tmp_path)
    assert "test_loss" in proc.stdout
    store = CheckpointStore(str(tmp_path / "checkpoints" / "transformer"))
    assert sorted(store.manifest().records) == [
        "best_model.pth",
        "checkpoint_epoch_0.pth",
        "checkpoint_epoch_1.pth",
    ]
