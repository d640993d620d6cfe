"""Loggers with ``log_model`` upload our checkpoints: a real MLflow logger, offline (a local file store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_callback import fit

mlflow = pytest.importorskip("mlflow")


@pytest.mark.parametrize("log_model", ["all", True])
def test_mlflow_log_model_uploads_our_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_model: bool | str
) -> None:
    # MLflow 3 keeps the file store (no server, no database) behind this switch.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(
        experiment_name="genesis", tracking_uri=f"file:{tmp_path / 'mlruns'}", log_model=log_model
    )
    _, _, cb = fit(
        str(tmp_path / "ck"), 3, monitor="val_loss", keep_last=2, trainer_kwargs={"logger": logger}
    )
    artifacts = Path(mlflow.get_run(logger.run_id).info.artifact_uri.removeprefix("file://"))
    uploaded = sorted(p.parent.name for p in artifacts.glob("*/*.pth"))
    if log_model == "all":
        # Every commit was reported: each rolling checkpoint and best_model.pth went up as it was saved.
        assert {"checkpoint_epoch_0", "checkpoint_epoch_1", "checkpoint_epoch_2", "best_model"} <= set(
            uploaded
        )
    else:
        # log_model=True uploads at the end what the callback's attributes name then.
        names = {Path(p).stem for p in (cb.best_model_path, cb.last_model_path, *cb.best_k_models)}
        assert set(uploaded) == names
    meta = yaml.safe_load((artifacts / "best_model" / "metadata.yaml").read_text())
    assert meta["Checkpoint"]["monitor"] == "val_loss" and meta["original_filename"] == "best_model.pth"
    assert meta["score"] == pytest.approx(float(cb.best_model_score))
