"""Experiment loggers as training callbacks (``imgcls train --log tensorboard,mlflow``).

The CSV history (HistoryCSV) is always written into the run folder; these add TensorBoard
event files and MLflow runs. Each is a Callback, so the training loop knows nothing about
them; ``build_loggers`` turns the ``--log`` value into callbacks.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch

from imgcls.engine.callbacks import Callback, TrainState
from imgcls.errors import ImgclsError
from imgcls.registry import Registry

# name -> factory(run_dir: Path | None, params: dict) -> Callback
LOGGERS: Registry = Registry("logger")


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}


class TensorBoardLogger(Callback):
    """Scalars per epoch (``epoch/train_loss``, ``epoch/val_acc``, ``epoch/lr`` ...) and the
    running training loss/accuracy every ``every_n_steps`` optimizer steps."""

    def __init__(self, log_dir: str | Path, params: dict[str, Any] | None = None, every_n_steps: int = 20):
        if importlib.util.find_spec("tensorboard") is None:
            raise ImgclsError("--log tensorboard needs the tensorboard package", "pip install tensorboard")
        self.log_dir = Path(log_dir)
        self.params = dict(params or {})
        self.every = max(1, every_n_steps)
        self.writer = None

    def on_fit_start(self, state: TrainState, model: torch.nn.Module) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir))
        if self.params:
            text = "\n".join(f"| {k} | {v} |" for k, v in self.params.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + text, 0)

    def on_batch_end(self, state: TrainState) -> None:
        if state.step % self.every == 0 and state.running:
            for k, v in state.running.items():
                self.writer.add_scalar(f"step/train_{k}", v, state.step)

    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None:
        for k, v in _numeric(state.metrics).items():
            self.writer.add_scalar(f"epoch/{k}", v, state.epoch)
        self.writer.flush()

    def on_fit_end(self, state: TrainState, model: torch.nn.Module) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowLogger(Callback):
    """One MLflow run per training run: the config as params, epoch metrics with
    ``step=epoch``, history.csv as an artifact. Uses MLflow's own tracking configuration
    (MLFLOW_TRACKING_URI, else MLflow's default store)."""

    def __init__(self, run_dir: Path | None, params: dict[str, Any] | None = None, experiment: str = "imgcls"):
        if importlib.util.find_spec("mlflow") is None:
            raise ImgclsError("--log mlflow needs MLflow", "pip install mlflow (or mlflow-skinny)")
        self.run_dir = Path(run_dir) if run_dir else None
        self.params = dict(params or {})
        self.experiment = experiment
        self.run_id: str | None = None

    def on_fit_start(self, state: TrainState, model: torch.nn.Module) -> None:
        import mlflow

        try:
            mlflow.set_experiment(self.experiment)
            run = mlflow.start_run(run_name=self.run_dir.name if self.run_dir else None)
        except Exception as exc:  # MLflow raises many types for an unusable tracking store
            raise ImgclsError(f"--log mlflow cannot use the tracking store {mlflow.get_tracking_uri()}: "
                              f"{str(exc).splitlines()[0][:200]}",
                              "set MLFLOW_TRACKING_URI to your MLflow server or a store this MLflow supports") from None
        self.run_id = run.info.run_id
        if self.params:
            mlflow.log_params({k: ("" if v is None else v) for k, v in self.params.items()})

    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None:
        import mlflow

        mlflow.log_metrics(_numeric(state.metrics), step=state.epoch)

    def on_fit_end(self, state: TrainState, model: torch.nn.Module) -> None:
        import mlflow

        if self.run_id is None:
            return
        history = self.run_dir / "history.csv" if self.run_dir else None
        if history is not None and history.is_file():
            mlflow.log_artifact(str(history))
        mlflow.end_run()


@LOGGERS.register("csv")
def _csv(run_dir: Path | None, params: dict[str, Any]) -> Callback | None:
    return None  # history.csv is always written by HistoryCSV; accepted so "--log csv" is not an error


@LOGGERS.register("tensorboard")
def _tensorboard(run_dir: Path | None, params: dict[str, Any]) -> Callback:
    log_dir = run_dir / "tensorboard" if run_dir else Path("runs") / "tensorboard" / time.strftime("%Y%m%d-%H%M%S")
    return TensorBoardLogger(log_dir, params)


@LOGGERS.register("mlflow")
def _mlflow(run_dir: Path | None, params: dict[str, Any]) -> Callback:
    return MLflowLogger(run_dir, params)


def parse_log(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"tensorboard,mlflow"`` or a list -> names, each checked against LOGGERS."""
    if not value:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n and n.strip()]
    for n in names:
        if n not in LOGGERS:
            err = LOGGERS.unknown(n)
            raise ImgclsError(f"{err.message} (--log)", err.hint)
    return list(dict.fromkeys(names))


def build_loggers(value: str | list[str] | None, run_dir: str | Path | None,
                  params: dict[str, Any] | None = None) -> list[Callback]:
    run_dir = Path(run_dir) if run_dir else None
    made = [LOGGERS.get(n)(run_dir, dict(params or {})) for n in parse_log(value)]
    return [cb for cb in made if cb is not None]
