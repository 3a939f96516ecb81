"""The training loop, readable top to bottom.

Everything that is not the loop itself (progress output, history, best-model keeping,
early stopping, logging, checkpoints, the LR finder, weight averaging) is a callback.
Data arrives as uint8 image batches; they are moved to the device, augmented and
normalised there, so the same code serves 2 CPU cores and a GPU. The same loop trains a
classifier head on cached backbone features (``pre=None``: the batches are feature
vectors, engine/finetune.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.data.transforms import BatchAugment, Preprocessing
from imgcls.engine import distributed as D
from imgcls.engine.callbacks import Callback, CallbackList, TrainState, val_metrics
from imgcls.engine.device import autocast
from imgcls.engine.device_data import maybe_on_device
from imgcls.engine.mixing import mix_loss, num_outputs
from imgcls.engine.multilabel import build_loss, exact_matches
from imgcls.engine.multilabel import val_metrics as multilabel_val_metrics
from imgcls.engine.model_hooks import init_from_data, maybe_compile
from imgcls.engine.optim import build_optimizer, build_scheduler
from imgcls.engine.tta import tta_forward


@dataclass
class FitSettings:
    epochs: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "onecycle"
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.0
    seed: int = 0
    compile: bool = False  # torch.compile the model for the loop
    mixup: float = 0.0  # timm Mixup / CutMix alphas
    cutmix: float = 0.0
    multi_label: bool = False  # targets are multi-hot rows: a sigmoid per class (engine/multilabel.py)
    loss: str = "auto"  # multi-label: bce or asl
    pos_weight: str = "none"  # multi-label bce: auto weights each label's positives by its rarity
    time_budget_s: float | None = None  # stop after this many seconds of fit; the LR schedule follows the clock


class TimeBudget:
    """Seconds of training a run may take (``--time-budget``, validation included), from
    the start of :meth:`Trainer.fit`. ``fraction`` drives the LR schedule (warm-up and decay
    end with the budget, engine/optim.py); ``spent`` stops training after the batch that
    crossed it. ``--epochs`` stays an upper bound. A resumed run goes on from the seconds its
    checkpoint had spent (``elapsed`` is saved, ``spend`` sets it back), so its schedule
    continues where it stopped instead of winding back to the warm-up."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spend(self, seconds: float) -> None:
        """Count ``seconds`` as already spent (a resumed run's earlier training)."""
        self.start -= float(seconds)

    def fraction(self) -> float:
        return min(1.0, self.elapsed() / self.seconds)

    def spent(self) -> bool:
        return self.fraction() >= 1.0


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=device.type == "cuda")


def _prepare(x: torch.Tensor, pre: Preprocessing | None, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = _to_device(x, device)
    return x if pre is None else pre.normalize(x, channels_last)  # (B, C, S, S) float; features as they are


@torch.no_grad()
def predict_logits(model: nn.Module, batches, pre: Preprocessing | None, device: torch.device,
                   amp_dtype: torch.dtype | None, channels_last: bool = True,
                   on_batch: Callable[[int], None] | None = None,
                   tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels for every image of ``batches``, in order: the
    per-epoch validation of a model in training (prediction from a trained model goes
    through engine/predictor.py; both apply TTA through the one ``tta_forward``)."""
    model.eval()
    outs, labels = [], []
    for x, y in batches:
        if on_batch is not None:
            on_batch(len(y))
        x = _prepare(x, pre, device, channels_last)
        with autocast(device, amp_dtype):
            out = tta_forward(model, x, tta)
        outs.append(out.float().cpu())
        labels.append(y.cpu())
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


class Trainer:
    def __init__(self, model: nn.Module, pre: Preprocessing | None, settings: FitSettings, device: torch.device,
                 amp_dtype: torch.dtype | None, batch_augment: BatchAugment | None = None,
                 callbacks: list[Callback] | None = None, channels_last: bool = True,
                 class_weights: torch.Tensor | None = None, dist: D.DistContext | None = None,
                 param_groups: list[dict] | None = None, tta: str = "none", fixmatch=None):
        self.model, self.pre, self.s = model, pre, settings
        self.device, self.amp_dtype = device, amp_dtype
        self.augment = batch_augment
        self.callbacks = CallbackList(callbacks or [])
        self.channels_last = channels_last and pre is not None
        self.class_weights = class_weights.to(device) if class_weights is not None else None
        self.tta = tta  # test-time augmentation for the per-epoch validation
        self.dist = dist or D.SINGLE  # multi-process data parallel (engine/distributed.py)
        self.param_groups = param_groups  # optional per-group lr / weight decay (fine-tuning)
        self.fixmatch = fixmatch  # engine/consistency.FixMatch: weak/strong consistency on an unlabelled pool

    def _setup(self, train) -> TrainState:
        s, model, dev = self.s, self.model, self.device
        model.to(dev)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.train_batches = maybe_on_device(train, dev)  # in-memory data on the GPU once, when it fits
        if self.pre is not None:
            init_from_data(model, self.train_batches, self.pre, dev)  # data-dependent init (airbench whitening)
        self.net = maybe_compile(D.wrap(model, self.dist), s.compile)  # DDP when several processes
        self.mix = mix_loss(s.mixup, s.cutmix, s.label_smoothing, num_outputs(model), s.multi_label) \
            if s.mixup or s.cutmix else None
        self.criterion = build_loss(s.loss, s.label_smoothing, self.class_weights, train.split.labels,
                                    s.pos_weight).to(dev) if s.multi_label else None
        steps = len(self.train_batches)
        self.budget = TimeBudget(s.time_budget_s) if s.time_budget_s else None
        self.opt = build_optimizer(model, s.optimizer, s.lr, s.weight_decay, s.momentum, groups=self.param_groups,
                                   eager=not s.compile)
        self.sched = build_scheduler(self.opt, s.schedule, s.epochs * steps, int(round(s.warmup_epochs * steps)),
                                     progress=self.budget.fraction if self.budget else None)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        # augmentation draws: reproducible per seed (and independent per process); callbacks
        # that save / restore the whole training state read opt, sched, scaler and gen
        self.gen = torch.Generator().manual_seed(s.seed + 1_000_003 * self.dist.rank)
        return TrainState(epochs=s.epochs, steps_per_epoch=steps, fit_start=time.perf_counter())

    def fit(self, train, val=None) -> TrainState:
        state = self._setup(train)
        train = self.train_batches
        self.callbacks.on_fit_start(state, self.model)  # a resumed run restores epoch, position and sums here
        first_epoch, skip = max(1, state.epoch), state.batch_in_epoch
        start_val = getattr(val, "prefetch", None)
        if callable(start_val):
            # streamed validation: fork its loader workers now, next to the training ones. Forked
            # at the first validation instead, they share the trainer's pages copy-on-write, and
            # the next epoch's first step pays ~120k page faults (0.5 s of a 0.7 s epoch of 245
            # photos on 2 cores, bench/shards.py recipe --data hymenoptera).
            start_val(val.epoch)
        for epoch in range(first_epoch, self.s.epochs + 1):
            if state.stop:  # a resumed run that had already stopped early
                break
            resumed = epoch == first_epoch and skip > 0
            if not resumed:
                state.batch_in_epoch, state.seen = 0, 0
                state.loss_sum = torch.zeros((), device=self.device)
                state.correct = torch.zeros((), device=self.device, dtype=torch.long)
                state.unlabeled_used, state.unlabeled_seen = torch.zeros((), device=self.device), 0
            state.epoch, state.epoch_start = epoch, time.perf_counter()
            train.set_epoch(epoch)
            train.skip = skip if resumed else 0
            self.callbacks.on_epoch_start(state)
            hook = getattr(self.model, "on_epoch_start", None)  # e.g. airbench freezes its whitening bias
            if callable(hook) and not self.dist.enabled:
                hook(epoch)
            self._train_epoch(train, state)
            train_time = time.perf_counter() - state.epoch_start
            prefetch = getattr(train, "prefetch", None)  # streamed shards: read ahead while validating
            if callable(prefetch) and epoch < self.s.epochs and not state.stop:
                prefetch(epoch + 1)
            self.callbacks.on_train_epoch_end(state, self.model)
            state.end_epoch(self._epoch_metrics(state, val), train_time)
            self.callbacks.on_epoch_end(state, self.model)
            if state.stop:
                break
        self.callbacks.on_fit_end(state, self.model)
        return state

    def _train_epoch(self, train, state: TrainState) -> None:
        s, dev, opt = self.s, self.device, self.opt
        self.model.train()
        loss_sum, correct = state.loss_sum, state.correct  # updated in place below
        for x, y in train:
            self.callbacks.on_batch_start(state)
            x, y = _to_device(x, dev), _to_device(y, dev)
            if self.augment is not None:
                x = self.augment(x, self.gen)
            x = _prepare(x, self.pre, dev, self.channels_last)
            if self.mix is not None:
                x, soft = self.mix(x, y)
                y = y[:len(x)]
            if self.fixmatch is not None:  # + the strong views of mu x B unlabelled images, one forward
                x, u_label, u_mask = self._fixmatch_batch(x)
            with autocast(dev, self.amp_dtype):
                out = self.net(x)
                if self.fixmatch is not None:
                    out, u_out = out[:len(y)], out[len(y):]
                if self.criterion is not None:  # multi-label: multi-hot (or mixed) targets
                    loss = self.criterion(out.float(), y if self.mix is None else soft, smoothed=self.mix is not None)
                else:
                    loss = F.cross_entropy(out.float(), y, weight=self.class_weights,
                                           label_smoothing=s.label_smoothing) if self.mix is None \
                        else self.mix.loss(out.float(), soft, self.class_weights)
                if self.fixmatch is not None:
                    loss = loss + self.fixmatch.loss(u_out, u_label, u_mask)
                    state.unlabeled_used += u_mask.sum()
                    state.unlabeled_seen += len(u_mask)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
            self.sched.step()
            # running sums stay on the device: no host sync per step on a GPU
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum() if self.criterion is None else exact_matches(out, y)
            state.loss = loss.detach()
            state.step += 1
            state.batch_in_epoch += 1
            state.seen += len(y)
            state.running = {"loss": float(loss_sum) / state.seen, "acc": float(correct) / state.seen} \
                if dev.type == "cpu" or state.batch_in_epoch % 20 == 0 else state.running
            self.callbacks.on_batch_end(state)
            if self.budget is not None and not state.stop and self.budget.spent():
                state.stop = True
                state.stop_reason = (f"time budget of {self.budget.seconds / 60:g} min spent after {state.step} steps "
                                     f"(epoch {state.epoch}, batch {state.batch_in_epoch}/{state.steps_per_epoch})")
            if state.stop:  # a callback ended training mid-epoch (the LR finder's divergence, the time budget)
                break

    def _fixmatch_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (normalised labelled batch) with the strong views of the next unlabelled batch
        appended, and the pseudo-labels and confidence mask of their weak views (the model in
        training mode, no gradients)."""
        fm, dev = self.fixmatch, self.device
        weak, strong = fm.views(self.gen, dev)
        with torch.no_grad(), autocast(dev, self.amp_dtype):
            label, mask = fm.targets(self.net(_prepare(weak, self.pre, dev, self.channels_last)), fm.threshold)
        return torch.cat([x, _prepare(strong, self.pre, dev, self.channels_last)]), label, mask

    def _epoch_metrics(self, state: TrainState, val) -> dict[str, float]:
        loss_sum, correct, seen = state.loss_sum, state.correct, state.seen
        if self.dist.enabled:  # epoch metrics over all processes' images
            loss_sum, correct, seen = D.sum_across([loss_sum, correct, seen], self.dist, self.device)
        metrics = {"epoch": state.epoch, "train_loss": float(loss_sum) / max(seen, 1),
                   "train_acc": float(correct) / max(seen, 1), "lr": self.opt.param_groups[0]["lr"]}
        if self.fixmatch is not None:  # share of this epoch's unlabelled images above the threshold
            metrics["unlabeled_mask"] = float(state.unlabeled_used) / max(float(state.unlabeled_seen), 1.0)
        if val is None or not len(val.split):
            return metrics
        logits, labels = predict_logits(self.model, val, self.pre, self.device, self.amp_dtype, self.channels_last,
                                        tta=self.tta)
        multi = self.criterion is not None
        if self.dist.enabled:  # each process saw its share of the validation images
            mine = [F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum") / logits.shape[1]
                    if multi else F.cross_entropy(logits, labels, reduction="sum"),
                    exact_matches(logits, labels) if multi else (logits.argmax(1) == labels).sum(),
                    len(labels)] if len(labels) else [0.0, 0, 0]
            vloss, vcorrect, vn = D.sum_across(mine, self.dist, self.device)
            metrics["val_loss"], metrics["val_acc"] = vloss / max(vn, 1), vcorrect / max(vn, 1)
        else:
            metrics.update(multilabel_val_metrics(logits, labels) if multi else val_metrics(logits, labels))
        return metrics
