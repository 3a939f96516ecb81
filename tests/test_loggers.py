"""Experiment loggers are training callbacks: TensorBoard event files, MLflow runs."""

from __future__ import annotations

import pytest

from imgcls import ImgclsError, train


def _train(tiny_npz, tmp_path, log):
    return train({"data": str(tiny_npz), "epochs": 2, "batch_size": 16, "out": str(tmp_path), "name": "r",
                  "seed": 0, "log": log}, progress=False)


def test_tensorboard_event_files(tiny_npz, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _train(tiny_npz, tmp_path, "tensorboard")
    assert (result.run_dir / "history.csv").is_file()  # CSV is always written
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"epoch/train_loss", "epoch/val_acc", "epoch/lr"} <= set(tags)
    losses = acc.Scalars("epoch/train_loss")
    assert [e.step for e in losses] == [1, 2]
    assert losses[0].value == pytest.approx(result.classifier.history[0]["train_loss"], rel=1e-5)


def test_mlflow_run(tiny_npz, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database store otherwise
    result = _train(tiny_npz, tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
    assert run.info.run_name == "r" and run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["optimizer"] == "adam"
    hist = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in hist] == [1, 2]
    assert hist[-1].value == pytest.approx(result.classifier.history[-1]["val_acc"])


def test_unknown_logger_fails_before_training(tiny_npz, tmp_path):
    with pytest.raises(ImgclsError, match="unknown logger 'tensorbord'.*did you mean 'tensorboard'"):
        _train(tiny_npz, tmp_path, "csv,tensorbord")
    assert not (tmp_path / "r").exists()


def test_cli_log_flag(tiny_npz, tmp_path, capsys):
    from imgcls.cli import main

    assert main(["train", "--data", str(tiny_npz), "--epochs", "1", "--out", str(tmp_path), "--name", "c",
                 "--log", "tensorboard"]) == 0
    assert any((tmp_path / "c" / "tensorboard").iterdir())
