"""Events on the training loop. Progress, history, checkpoints and early stopping hang
here instead of being flags threaded through the loop (the fastai/Ultralytics idea)."""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainState:
    epochs: int
    steps_per_epoch: int
    epoch: int = 0  # 1-based while running
    step: int = 0  # global optimizer steps
    batch_in_epoch: int = 0
    seen: int = 0  # images this epoch
    running: dict[str, float] = field(default_factory=dict)  # loss / acc so far this epoch
    metrics: dict[str, float] = field(default_factory=dict)  # last epoch's summary
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    stop: bool = False
    stop_reason: str = ""
    epoch_start: float = 0.0
    fit_start: float = 0.0
    # this epoch's running sums (device tensors, updated in place), read by checkpoints
    loss_sum: Any = None
    correct: Any = None
    loss: Any = None  # the last step's loss (a device tensor; read it only where a sync is fine)
    lr: float | None = None  # set by a callback before a step (the LR finder)
    unlabeled_used: Any = 0  # FixMatch: this epoch's unlabelled images above the threshold (device tensor)
    unlabeled_seen: int = 0

    def end_epoch(self, metrics: dict[str, float], train_time: float) -> None:
        """Record an epoch's metrics, adding its wall time (validation included) and the
        training images/s, as the last epoch's summary and in the history."""
        metrics["epoch_time"] = time.perf_counter() - self.epoch_start
        metrics["img_per_s"] = self.seen / max(train_time, 1e-9)
        self.metrics = metrics
        self.history.append(metrics)


def val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Validation loss and accuracy of float logits."""
    return {"val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "val_acc": float((logits.argmax(1) == labels).float().mean())}


class Callback:
    def on_fit_start(self, state: TrainState, model: torch.nn.Module) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_batch_start(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_train_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None: ...  # before validation
    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None: ...
    def on_fit_end(self, state: TrainState, model: torch.nn.Module) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def __getattribute__(self, name: str):
        if name.startswith("on_"):
            cbs = object.__getattribute__(self, "callbacks")
            return lambda *a, **k: [getattr(cb, name)(*a, **k) for cb in cbs] and None
        return object.__getattribute__(self, name)


def _is_better(metrics: dict[str, float], best: dict[str, float]) -> bool:
    """Higher validation accuracy wins; a tie goes to the lower validation loss."""
    if not best:
        return True
    key = "val_map" if "val_map" in metrics else "val_acc"  # multi-label: mean average precision
    acc, loss = metrics.get(key, -math.inf), metrics.get("val_loss", math.inf)
    if acc != best.get(key):
        return acc > best.get(key, -math.inf)
    return loss < best.get("val_loss", math.inf)


class BestModel(Callback):
    """Keep the weights of the best validation epoch (Keras' restore_best_weights), hand
    them to ``on_improve`` (which writes the run's model file), and load them back into
    the model when training ends."""

    def __init__(self, on_improve: Callable[[torch.nn.Module, dict[str, float]], None] | None = None):
        self.on_improve = on_improve
        self.state_dict: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None:
        if "val_acc" not in state.metrics:
            self.state_dict = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            state.best = dict(state.metrics)
            return
        if _is_better(state.metrics, state.best):
            state.best = dict(state.metrics)
            self.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if self.on_improve:
                self.on_improve(model, state.best)

    def on_fit_end(self, state: TrainState, model: torch.nn.Module) -> None:
        if self.state_dict is not None:
            model.load_state_dict(self.state_dict)

    # what a checkpoint needs to resume (engine/checkpoint.py); the name `state_dict` is
    # taken by the kept weights, hence these two
    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        return {"best_weights": self.state_dict}

    def load_state_dict_from_checkpoint(self, d: dict[str, Any]) -> None:
        self.state_dict = d["best_weights"]


class EarlyStopping(Callback):
    """Stop when neither validation accuracy rose nor validation loss fell by more than
    ``min_delta`` for ``patience`` epochs."""

    def __init__(self, patience: int, min_delta: float = 1e-3):
        self.patience, self.min_delta = patience, min_delta
        self.best_acc, self.best_loss = -math.inf, math.inf
        self.bad_epochs = 0

    def on_fit_start(self, state: TrainState, model: torch.nn.Module) -> None:
        # counters are per fit (a resumed run's are restored by the checkpoint after this)
        self.best_acc, self.best_loss, self.bad_epochs = -math.inf, math.inf, 0

    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None:
        acc = state.metrics.get("val_map", state.metrics.get("val_acc", state.metrics["train_acc"]))
        loss = state.metrics.get("val_loss", state.metrics["train_loss"])
        if acc > self.best_acc or loss < self.best_loss - self.min_delta:
            self.best_acc, self.best_loss = max(acc, self.best_acc), min(loss, self.best_loss)
            self.bad_epochs = 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            state.stop = True
            state.stop_reason = (f"early stopping: no validation improvement for {self.patience} epoch(s) "
                                 f"(best accuracy {state.best.get('val_acc', self.best_acc):.4f} "
                                 f"at epoch {int(state.best.get('epoch', 0))})")


    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        return {"best_acc": self.best_acc, "best_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict_from_checkpoint(self, d: dict[str, Any]) -> None:
        self.best_acc, self.best_loss, self.bad_epochs = d["best_acc"], d["best_loss"], d["bad_epochs"]


class HistoryCSV(Callback):
    """One row per epoch in ``history.csv``, flushed every epoch."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None:
        self.write(state.history)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """The whole history (also a run's merged stages: engine/session.py)."""
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


class ProgressBar(Callback):
    """A rich progress bar per epoch (loss, accuracy, images/s, time left) and one
    summary line per epoch. On a non-terminal (CI logs) only the summary lines print."""

    def __init__(self, console: Any = None, refresh_s: float = 0.25):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.refresh_s = refresh_s
        self._progress = None
        self._task = None
        self._last = 0.0

    def on_fit_start(self, state: TrainState, model: torch.nn.Module) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=True,
            disable=not self.console.is_terminal,
        )
        self._progress.start()

    def on_epoch_start(self, state: TrainState) -> None:
        self._task = self._progress.add_task("train", total=state.steps_per_epoch,
                                             epoch=f"{state.epoch}/{state.epochs}", stats="")
        self._last = 0.0

    def on_batch_end(self, state: TrainState) -> None:
        now = time.perf_counter()
        if now - self._last < self.refresh_s and state.batch_in_epoch < state.steps_per_epoch:
            self._progress.update(self._task, completed=state.batch_in_epoch)
            return
        self._last = now
        r = state.running
        ips = state.seen / max(now - state.epoch_start, 1e-9)
        self._progress.update(self._task, completed=state.batch_in_epoch,
                              stats=f"loss {r.get('loss', 0):.4f} acc {r.get('acc', 0):.4f} {ips:,.0f} img/s")

    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None:
        self._progress.remove_task(self._task)
        m = state.metrics
        parts = [f"epoch {state.epoch}/{state.epochs}", f"loss {m['train_loss']:.4f}", f"acc {m['train_acc']:.4f}"]
        if "val_acc" in m:
            parts += [f"val_loss {m['val_loss']:.4f}", f"val_acc {m['val_acc']:.4f}"]
        if "val_map" in m:
            parts += [f"val_mAP {m['val_map']:.4f}"]
        parts += [f"{m['img_per_s']:,.0f} img/s", f"{m['epoch_time']:.1f}s"]
        star = " *" if state.best.get("epoch") == m["epoch"] and "val_acc" in m else ""
        self.console.print("  ".join(parts) + star, highlight=False, soft_wrap=True)
        if state.stop_reason:
            self.console.print(state.stop_reason, highlight=False, soft_wrap=True)

    def on_fit_end(self, state: TrainState, model: torch.nn.Module) -> None:
        if self._progress is not None:
            self._progress.stop()
