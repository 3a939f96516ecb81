"""Crash-safe checkpoints and resume, as a training callback.

``checkpoint.pt`` in the run folder holds everything needed to continue a run exactly:
model, optimizer, scheduler and grad-scaler states, every random generator (torch, CUDA,
numpy, Python and the augmentation generator, per process), the position in the epoch
(batches done, so the sampler skips them; for data streamed from shards, each rank's and
loader worker's shard positions, so the stream continues there: data/streaming.py
``StreamBatches.position``) and the state of the other callbacks (best
weights, early-stopping counters). It is written atomically (temporary file + fsync +
rename): a crash at any moment leaves the previous checkpoint intact. It is read back
with ``torch.load(weights_only=True)``: only tensors and plain containers, never
arbitrary pickled objects.

Written at the end of every epoch, every ``every_min`` minutes inside an epoch, and when
SIGTERM / SIGINT (Ctrl-C) arrives - then training stops with :class:`TrainingInterrupted`
telling how to resume. With several processes all of them take these decisions at the
same step (one tiny all-reduce), and rank 0 alone writes.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.artifact import atomic_write
from imgcls.engine import distributed as D
from imgcls.engine.callbacks import Callback, TrainState
from imgcls.errors import ImgclsError
from imgcls.models.pretrained import is_pickle_refusal, load_weights_only, looks_like_plain_pickle, pickled_objects

CHECKPOINT = "checkpoint.pt"
FORMAT = "imgcls-checkpoint"
FORMAT_VERSION = 1


class TrainingInterrupted(ImgclsError):
    """Training stopped on a signal after saving a checkpoint (not a failure)."""

    def __init__(self, message: str, hint: str, signum: int):
        super().__init__(message, hint)
        self.signum = signum


# ---------------------------------------------------------------------- RNG states
def rng_state(gen: torch.Generator | None) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "python": random.getstate(),
             "augment": gen.get_state() if gen is not None else None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if gen is not None and state.get("augment") is not None:
        gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- safe loading
def _start_again_hint(path: Path) -> str:
    run = path.parent
    return (f"it cannot be resumed: start the run again, with the same imgcls train command plus --exist-ok "
            f"to replace {run}, or with a new --name")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; anything else (a pickled object,
    a truncated or foreign file) is refused with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ImgclsError(f"no checkpoint at {path}", "give a run folder written by `imgcls train` (it holds "
                          f"{CHECKPOINT} once an epoch has finished)")
    try:
        ckpt = load_weights_only(path)
    except pickle.UnpicklingError as exc:
        if is_pickle_refusal(exc):
            raise ImgclsError(f"refused {path}: it contains pickled Python objects, which imgcls never loads "
                              f"(they can run arbitrary code{pickled_objects(exc)}), so it was not loaded",
                              "use only checkpoints written by imgcls; do not load files from untrusted "
                              "sources") from None
        raise ImgclsError(f"cannot read checkpoint {path}: the file is damaged or truncated",
                          _start_again_hint(path)) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError):
        if looks_like_plain_pickle(path):
            raise ImgclsError(f"refused {path}: it is a pickle file, not a checkpoint imgcls wrote; it was not "
                              "loaded", "use only checkpoints written by imgcls; do not load files from untrusted "
                              "sources") from None
        # (torch's own text, e.g. "PytorchStreamReader failed reading zip archive: failed finding
        # central directory. This is an internal miniz error...", says no more than this)
        raise ImgclsError(f"cannot read checkpoint {path}: the file is damaged or truncated",
                          _start_again_hint(path)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ImgclsError(f"{path} is not an imgcls checkpoint", "give a run folder written by `imgcls train`")
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise ImgclsError(f"{path} was written by a newer imgcls", "upgrade imgcls to resume it")
    return ckpt


def preflight_run_dir(run_dir: Path, model: torch.nn.Module, margin_mb: float = 20.0) -> None:
    """Refuse to start when the run folder cannot take the files training will write:
    a test write (permissions, read-only disks) and a free-space check against the
    checkpoint (weights + optimizer moments + best weights), the model file and one
    temporary copy during atomic replacement."""
    probe = Path(run_dir) / ".imgcls-write-test"
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ImgclsError(f"cannot write to run folder {run_dir}: {exc.strerror or exc}",
                          "choose another --out, or free space / fix the folder's permissions") from None
    finally:
        probe.unlink(missing_ok=True)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = 6 * weights + 2 * weights + margin_mb * 2**20  # checkpoint ~4x (+ a tmp copy) + model file (+ tmp)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ImgclsError(f"not enough disk space for run folder {run_dir}: {free / 2**20:,.0f} MB free, about "
                          f"{need / 2**20:,.0f} MB needed for checkpoints and weights",
                          "free some space or choose another --out")


def _resume_hint(run_dir: Path) -> str:
    return f"continue it with: imgcls train --resume {run_dir}"


# ---------------------------------------------------------------------- the callback
class Checkpoint(Callback):
    """Saves ``run_dir/checkpoint.pt`` (see module doc) and, given ``resume`` (a loaded
    checkpoint dict), restores it when training starts. ``attach(trainer)`` before fit:
    the trainer exposes its optimizer, scheduler, scaler, generator and callbacks."""

    def __init__(self, run_dir: str | Path | None, every_min: float | None = None,
                 resume: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 handle_signals: bool = True, sync_every: int = 10):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.every_s = every_min * 60 if every_min else None
        self.resume = resume
        self.extra = dict(extra or {})  # e.g. the data fingerprint, checked on resume
        self.handle_signals = handle_signals
        self.sync_every = sync_every
        self.trainer = None
        self.last_save = 0.0
        self.saves = 0
        self._signal: int | None = None
        self._signal_at = 0.0
        self._old_handlers: dict[int, Any] = {}
        # seconds trained before the checkpoint resumed from (train_time_s and the resumed epoch's
        # epoch_time / img_per_s count them too)
        self.time_before = float((resume or {}).get("train_time_s") or 0.0)
        self._epoch_before = 0.0

    def attach(self, trainer) -> Checkpoint:
        self.trainer = trainer
        return self

    @property
    def path(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        # a second Ctrl-C stops at once, without the checkpoint. Not within 2 s of the first:
        # under torchrun the launcher forwards the terminal's SIGINT again right away.
        if self._signal is not None and signum == signal.SIGINT and time.monotonic() - self._signal_at > 2:
            raise KeyboardInterrupt
        if self._signal is None:
            self._signal, self._signal_at = signum, time.monotonic()

    def _install(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _uninstall(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # ------------------------------------------------------------------ state
    def _callback_states(self) -> dict[str, Any]:
        return {f"{i}:{type(cb).__name__}": cb.state_dict_for_checkpoint()
                for i, cb in enumerate(self.trainer.callbacks.callbacks) if hasattr(cb, "state_dict_for_checkpoint")}

    def state_dict(self, state: TrainState, model: torch.nn.Module, epoch_done: bool) -> dict[str, Any]:
        t = self.trainer
        ctx = t.dist
        rng = D.gather_object(rng_state(t.gen), ctx)  # every process's generators, by rank
        mid_epoch = not epoch_done and state.loss_sum is not None
        # each process's running sums of the epoch so far: its own images, summed over ranks at
        # the epoch's end (rank 0's alone, given to every rank, changed the resumed epoch's row)
        sums = D.gather_object([float(state.loss_sum), int(state.correct), int(state.seen)] if mid_epoch
                               else [0.0, 0, 0], ctx)
        now = time.perf_counter()
        # a streamed split's place in the epoch (per rank and loader worker: data/streaming.py),
        # so that resuming reads only what was not trained on yet
        where = getattr(t.train_batches, "position", None) if mid_epoch else None
        positions = D.gather_object(where() if callable(where) else None, ctx)
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # where to continue: the next epoch, or the batches already done in this one
            "epoch": state.epoch + 1 if epoch_done else state.epoch,
            "batch_in_epoch": 0 if epoch_done else state.batch_in_epoch,
            "seen": 0 if epoch_done else state.seen, "loss_sum": sums[0][0], "correct": sums[0][1],
            "rank_sums": sums,  # [loss_sum, correct, seen] by rank (loss_sum / correct above: rank 0's)
            "train_time_s": self.time_before + now - state.fit_start,
            "epoch_time_s": 0.0 if epoch_done else now - state.epoch_start,
            "running": {} if epoch_done else dict(state.running),
            "step": state.step, "epochs": state.epochs, "steps_per_epoch": state.steps_per_epoch,
            "history": [dict(h) for h in state.history], "best": dict(state.best),
            "stop": state.stop, "stop_reason": state.stop_reason,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(), "scaler": t.scaler.state_dict(),
            "rng": rng, "world_size": ctx.world_size, "callbacks": self._callback_states(),
            "data_position": positions,
            # --time-budget: the seconds spent so far, so a resumed run's clock (and LR schedule) goes on
            "budget_spent_s": t.budget.elapsed() if getattr(t, "budget", None) is not None else None,
            **self.extra,
        }

    def save(self, state: TrainState, model: torch.nn.Module, epoch_done: bool) -> None:
        ckpt = self.state_dict(state, model, epoch_done)  # collective: every rank takes part
        self.last_save = time.monotonic()
        if self.path is None or not self.trainer.dist.is_main:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda p: torch.save(ckpt, p))
        except OSError as exc:
            raise ImgclsError(f"cannot write checkpoint {self.path}: {exc.strerror or exc}",
                              "free disk space or fix the folder's permissions; the previous checkpoint "
                              "is intact") from None
        self.saves += 1

    def _restore(self, state: TrainState, model: torch.nn.Module) -> None:
        ck, t = self.resume, self.trainer
        n = int(ck.get("world_size", 1))
        if n != t.dist.world_size:
            run = self.run_dir if self.run_dir is not None else "RUN"
            # (--devices cannot be combined with --resume: the run's config.yaml says how many)
            how = f"torchrun --nproc-per-node {n} -m imgcls train --resume {run}" if n > 1 \
                else f"imgcls train --resume {run}, not under torchrun"
            raise ImgclsError(f"the checkpoint was written by {n} process{'es' if n > 1 else ''}, this run has "
                              f"{t.dist.world_size}", f"resume it with {n}: {how}")
        if ck["steps_per_epoch"] != state.steps_per_epoch or ck["epochs"] != state.epochs:
            raise ImgclsError("the checkpoint does not match this run's data or schedule "
                              f"({ck['steps_per_epoch']} steps x {ck['epochs']} epochs saved, "
                              f"{state.steps_per_epoch} x {state.epochs} now)",
                              "resume with the run's own config.yaml and the same data")
        model.load_state_dict(ck["model"])
        t.opt.load_state_dict(ck["optimizer"])
        t.sched.load_state_dict(ck["scheduler"])
        t.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"][t.dist.rank], t.gen)
        states = ck.get("callbacks", {})
        for i, cb in enumerate(t.callbacks.callbacks):
            key = f"{i}:{type(cb).__name__}"
            if key in states and hasattr(cb, "load_state_dict_from_checkpoint"):
                cb.load_state_dict_from_checkpoint(states[key])
        state.epoch, state.batch_in_epoch, state.seen = ck["epoch"], ck["batch_in_epoch"], ck["seen"]
        load = getattr(t.train_batches, "load_position", None)
        positions = ck.get("data_position") or []
        if callable(load) and ck["batch_in_epoch"] and t.dist.rank < len(positions):
            load(positions[t.dist.rank])  # (else: the epoch's stream is replayed and trained batches dropped)
        state.step, state.history, state.best = ck["step"], list(ck["history"]), dict(ck["best"])
        state.stop, state.stop_reason, state.running = ck["stop"], ck["stop_reason"], dict(ck["running"])
        dev = t.device
        if ck.get("budget_spent_s") is not None and getattr(t, "budget", None) is not None:
            t.budget.spend(ck["budget_spent_s"])
        mine = (ck.get("rank_sums") or [])[t.dist.rank:t.dist.rank + 1]  # (older checkpoints: rank 0's)
        loss_sum, correct, seen = mine[0] if mine else (ck["loss_sum"], ck["correct"], ck["seen"])
        state.seen = int(seen)
        state.loss_sum = torch.tensor(loss_sum, device=dev, dtype=torch.float32)
        state.correct = torch.tensor(correct, device=dev, dtype=torch.long)
        self._epoch_before = float(ck.get("epoch_time_s") or 0.0) if ck["batch_in_epoch"] else 0.0
        self.resume = None

    # ------------------------------------------------------------------ events
    def on_fit_start(self, state: TrainState, model: torch.nn.Module) -> None:
        if self.trainer is None:
            raise RuntimeError("Checkpoint.attach(trainer) must be called before fit")
        if self.resume is not None:
            self._restore(state, model)
        self.last_save = time.monotonic()
        self._install()

    def on_epoch_start(self, state: TrainState) -> None:
        if self._epoch_before:  # the resumed epoch: its time before the interruption counts
            state.epoch_start -= self._epoch_before
            self._epoch_before = 0.0

    def on_batch_end(self, state: TrainState) -> None:
        ctx = self.trainer.dist
        if ctx.enabled and state.step % self.sync_every:
            return  # several processes agree only every few steps (a host sync on GPUs)
        due = self.every_s is not None and time.monotonic() - self.last_save >= self.every_s
        stop, due = D.any_across([self._signal is not None, due and ctx.is_main], ctx, self.trainer.device)
        if not (stop or due) or state.batch_in_epoch >= state.steps_per_epoch:
            return  # (the epoch-end checkpoint follows right away)
        self.save(state, self.trainer.model, epoch_done=False)
        if stop:
            self._interrupted(state)

    def on_epoch_end(self, state: TrainState, model: torch.nn.Module) -> None:
        self.save(state, model, epoch_done=True)
        ctx = self.trainer.dist
        stop = D.any_across([self._signal is not None], ctx, self.trainer.device)[0]
        if stop and not state.stop and state.epoch < state.epochs:
            self._interrupted(state)

    def on_fit_end(self, state: TrainState, model: torch.nn.Module) -> None:
        self._uninstall()

    def _interrupted(self, state: TrainState) -> None:
        self._uninstall()
        D.barrier(self.trainer.dist)  # every process stops once rank 0's checkpoint is on disk
        signum = self._signal or signal.SIGTERM
        name = signal.Signals(signum).name
        where = f"epoch {state.epoch}, batch {state.batch_in_epoch}/{state.steps_per_epoch}"
        if self.path is None:
            raise TrainingInterrupted(f"training stopped by {name} at {where}", "no run folder, so nothing was saved",
                                      signum)
        raise TrainingInterrupted(f"training stopped by {name} at {where}; checkpoint saved to {self.path}",
                                  _resume_hint(self.run_dir), signum)
