"""TrainingSession: what ``Classifier.fit`` does, as small named steps.

    session = TrainingSession(bundle, cfg, run_dir=..., resume=...)
    summary = session.run(data)          # or session.find_lr(data)

Steps, in order: ``start`` (process group, seeds, device, precision, threads), ``load``
(data relabelled to the model's classes, fingerprint), ``inputs`` (the data pipeline:
decode pass, augmentation, balance, shards, flips), ``callbacks``, ``finetune`` (freeze /
unfreeze / feature cache plan), ``train`` (one :class:`Trainer`, or the same Trainer on
cached features), ``summary``. The LR finder runs on the same inputs (``find_lr``), so it
measures the pipeline that ``fit`` trains on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from imgcls.bundle import ModelBundle
from imgcls.config import TrainConfig
from imgcls.data.pipeline import (TrainInputs, TrainSettings, derive_preprocessing, eval_batches, require_train,
                                  training_inputs, unlabeled_inputs)
from imgcls.data.groups import leak_hint
from imgcls.data.pool import check_pool, pool_split
from imgcls.data.records import ImageData
from imgcls.data.sources import load_data
from imgcls.engine import distributed as D
from imgcls.engine.averaging import EMA, Lookahead
from imgcls.engine.callbacks import BestModel, Callback, EarlyStopping, HistoryCSV, ProgressBar
from imgcls.engine.checkpoint import Checkpoint
from imgcls.engine.consistency import FixMatch, confidence_threshold
from imgcls.engine.device import precision_name, resolve_device, resolve_precision
from imgcls.engine.finetune import FineTunePlan, fit_head_cached, plan_finetune
from imgcls.engine.lr_find import LRFindResult, lr_find
from imgcls.engine.reproducibility import data_fingerprint, environment, seed_everything, set_deterministic
from imgcls.engine.threads import PROCESS_SAMPLE, AdaptiveThreads, configure_threads, tune_cpu_allocator
from imgcls.engine.multilabel import default_thresholds, tune_thresholds
from imgcls.engine.trainer import FitSettings, Trainer, predict_logits
from imgcls.errors import ImgclsError


def _say(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(msg, highlight=False, soft_wrap=True)


def fit_settings(cfg: TrainConfig, lr: float, multi_label: bool = False) -> FitSettings:
    return FitSettings(epochs=cfg.epochs, lr=lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                       momentum=cfg.momentum, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs,
                       label_smoothing=cfg.label_smoothing, seed=cfg.seed, compile=cfg.compile, mixup=cfg.mixup,
                       cutmix=cfg.cutmix, multi_label=multi_label, loss=cfg.loss, pos_weight=cfg.pos_weight,
                       time_budget_s=cfg.time_budget * 60 if cfg.time_budget else None)


@dataclass
class _Outcome:
    state: Any
    train_time: float
    cached: Any = None


class TrainingSession:
    def __init__(self, bundle: ModelBundle, cfg: TrainConfig, *, run_dir: str | Path | None = None,
                 progress: bool = True, callbacks: list[Callback] | None = None,
                 resume: dict[str, Any] | None = None):
        self.bundle, self.cfg, self.resume = bundle, cfg, resume
        self.run_dir = Path(run_dir) if run_dir else None
        self.progress, self.extra_callbacks = progress, list(callbacks or [])
        self._top_skipped = ""  # why the top-block stage did not run (finetune_top auto)
        self.pool = None  # --unlabeled with FixMatch: the unlabelled Split (check_unlabeled)
        self._loggers: list[Callback] = []  # experiment loggers (--log): they follow every fit of the run
        self._not_applied: list[str] = []  # flags cached features cannot apply (_not_on_cached_features)

    # ------------------------------------------------------------------ steps
    def start(self) -> None:
        """Process group, seeds, device, precision, threads. ``--deterministic`` fixes the
        thread count (the cores this process may use, or ``--threads``) instead of probing
        the idle cores: a thread count that follows machine load changes the results."""
        cfg = self.cfg
        self.ctx = D.setup(cfg.device)
        (set_deterministic if cfg.deterministic else seed_everything)(cfg.seed)
        self.device = self.ctx.device if self.ctx.enabled else resolve_device(cfg.device)
        self.amp = resolve_precision(cfg.precision, self.device)
        self.local_batch = D.local_batch_size(cfg.batch_size, self.ctx)
        configure_threads(cfg.threads, probe=not cfg.deterministic, since=PROCESS_SAMPLE)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.writer = self.run_dir if self.ctx.is_main else None  # only rank 0 writes files and prints
        self.say = _say(self.progress and self.ctx.is_main)

    def load(self, data: Any) -> ImageData:
        cfg = self.cfg
        data = require_train(load_data(data, val_split=cfg.val_split, seed=cfg.seed, group_by=cfg.group_by,
                                       task=cfg.task))
        self._task(data)
        data = self.bundle.check_classes(data)
        resume = self.resume or {}
        self.fingerprint = data_fingerprint(data) if cfg.deterministic or resume.get("data_fingerprint") else None
        if resume.get("data_fingerprint") and resume["data_fingerprint"] != self.fingerprint:
            raise ImgclsError("the data changed since the checkpoint was written (its fingerprint differs)",
                              "resume with the same data, or start a new run")
        return data

    def _task(self, data: ImageData) -> None:
        """The model's task follows its training data (model.json ``task``); a loss that
        does not fit the labels is refused."""
        cfg, multi = self.cfg, data.multi_label
        if multi and cfg.loss == "ce":
            raise ImgclsError("--loss ce is for one class per image; this data is multi-label",
                              "use --loss bce or --loss asl (or auto)")
        if not multi and cfg.loss in ("bce", "asl"):
            raise ImgclsError(f"--loss {cfg.loss} is for multi-label data; this data has one class per image",
                              "pass --task multi to train it multi-label, or use --loss ce (auto)")
        if not multi and cfg.pos_weight != "none":
            raise ImgclsError("--pos-weight is for multi-label data", "drop it, or pass --task multi")
        self.multi_label = multi
        self.bundle.card["task"] = "multi" if multi else "single"
        if not multi:
            self.bundle.card.pop("thresholds", None)

    def inputs(self, data: ImageData) -> TrainInputs:
        """The data pipeline's training and validation batches, for the bundle's preprocessing
        derived for this data (a new object, ``inputs.pre``: ``run`` gives it to the bundle)."""
        cfg, b = self.cfg, self.bundle
        pre = derive_preprocessing(b.preprocessing, data, b.pretrained)
        s = TrainSettings(augment=cfg.augment, hflip=cfg.hflip, randaugment=cfg.randaugment, balance=cfg.balance,
                          seed=cfg.seed, strict=cfg.strict, cache=cfg.cache, workers=cfg.workers,
                          shuffle_buffer=cfg.shuffle_buffer)
        inp = training_inputs(data, pre, s, self.local_batch, device=self.device, rank=self.ctx.rank,
                              world=self.ctx.world_size, progress=self.progress and self.ctx.is_main,
                              report_dir=self.writer, announce=self.ctx.is_main)
        if cfg.group_by is None and self.ctx.is_main and inp.data.val is not None and not inp.data.train.streamed:
            hint = leak_hint(inp.data.train.images, inp.data.val.images)  # near-duplicates across train/val
            if hint:
                print(f"imgcls: {hint}", file=sys.stderr)
        return inp

    def callbacks(self, inp: TrainInputs, lr: float) -> tuple[list[Callback], BestModel, Checkpoint | None]:
        cfg, writer = self.cfg, self.writer
        self._loggers = []
        best = BestModel(on_improve=(lambda m, b: self.bundle.write(writer, best_metrics=b)) if writer else None)
        averaging, stateful = self._stateful_callbacks()
        cbs: list[Callback] = [*averaging, best, *stateful]
        if writer:
            cbs.append(HistoryCSV(writer / "history.csv"))
        cbs += self._shared_callbacks()  # (the loggers join below: they need the inputs)
        if cfg.log and self.ctx.is_main:  # experiment loggers (tensorboard, mlflow) are callbacks too
            from imgcls.engine.loggers import build_loggers

            self._loggers = build_loggers(cfg.log, writer, {"architecture": self.bundle.architecture,
                                                            "data": inp.data.name, "batch_size": cfg.batch_size,
                                                            "augment": inp.aug.preset,
                                                            **asdict(fit_settings(cfg, lr, self.multi_label))})
            cbs += self._loggers
        ckpt = None
        if self.run_dir is not None:
            extra = {"data_fingerprint": self.fingerprint} if self.fingerprint else None
            ckpt = Checkpoint(self.run_dir, cfg.checkpoint_every, resume=self.resume, extra=extra)
            cbs.append(ckpt)
        return cbs, best, ckpt

    def _stateful_callbacks(self) -> tuple[list[Callback], list[Callback]]:
        """New instances of the callbacks that keep state across a fit: (weight averaging, which
        runs before BestModel; the rest). Each fit gets its own (the top-block stage as well:
        the probe's EMA or early-stopping counters would carry over into it)."""
        cfg = self.cfg
        averaging = [cb for cb, on in ((Lookahead, cfg.lookahead), (lambda: EMA(cfg.ema), bool(cfg.ema))) if on]
        rest: list[Callback] = []
        if cfg.threads is None and self.device.type == "cpu" and not cfg.deterministic:
            rest.append(AdaptiveThreads())  # follows machine load: never in a deterministic run
        if cfg.patience:
            rest.append(EarlyStopping(cfg.patience))
        return [cb() for cb in averaging], rest

    def _shared_callbacks(self) -> list[Callback]:
        """The progress bar, the caller's callbacks and the experiment loggers (the same ones for
        every fit of the run)."""
        return ([ProgressBar()] if self.say else []) + self.extra_callbacks + self._loggers

    def finetune(self, lr: float) -> FineTunePlan | None:
        cfg = self.cfg
        cache = "off" if self.ctx.enabled and cfg.feature_cache == "auto" else cfg.feature_cache
        return plan_finetune(self.bundle.model, pretrained=self.bundle.pretrained, freeze=cfg.freeze,
                             unfreeze_at=cfg.unfreeze_at, unfreeze=cfg.unfreeze, backbone_lr=cfg.backbone_lr,
                             layer_decay=cfg.layer_decay, feature_cache=cache, lr=lr,
                             weight_decay=cfg.weight_decay, epochs=cfg.epochs, log=self.say)

    def train(self, inp: TrainInputs, lr: float, tta: str, ft: FineTunePlan | None) -> _Outcome:
        cbs, best, ckpt = self.callbacks(inp, lr)
        settings, b = fit_settings(self.cfg, lr, self.multi_label), self.bundle
        t0 = time.perf_counter()
        try:
            if ft is not None and ft.use_cache:
                # seconds of head training: no checkpoints and no model file per improved epoch (those
                # writes took longer than the training); the run folder gets the best model at the end
                best.on_improve = None
                split = self._top_split(inp)
                cached = fit_head_cached(b.model, self._eval_train(inp), inp.val,
                                         b.preprocessing, settings, self.device, self.amp,
                                         [c for c in cbs if c is not ckpt], batch_size=self.local_batch,
                                         flip=inp.aug.hflip, log=self.say, class_weights=inp.balance.weight_tensor(),
                                         split=split)
                if split is not None and cached.activations is not None:
                    averaging, stateful = self._stateful_callbacks()  # fresh: nothing of the probe's carries over
                    self._top_stage(cached, split, settings, inp, [*averaging, *stateful, *self._shared_callbacks()])
                if self.writer:
                    b.write(self.writer, best_metrics=cached.state.best)
                return _Outcome(cached.state, time.perf_counter() - t0, cached)
            trainer = Trainer(b.model, b.preprocessing, settings, self.device, self.amp,
                              batch_augment=inp.batch_augment, callbacks=cbs + (ft.callbacks if ft else []),
                              dist=self.ctx, class_weights=inp.balance.weight_tensor(),
                              param_groups=ft.param_groups if ft else None, tta=tta,
                              fixmatch=self.fixmatch(inp))
            if ckpt is not None:
                ckpt.attach(trainer)
            state = trainer.fit(inp.train, inp.val)
            # a resumed run's time counts what it trained before the interruption (the checkpoint's)
            return _Outcome(state, time.perf_counter() - t0 + (ckpt.time_before if ckpt is not None else 0.0))
        finally:
            if ft is not None:
                ft.finish()

    def _top_split(self, inp: TrainInputs):
        """The transfer recipe's second stage, planned before the probe's pass (which then
        keeps the activations below the top blocks): the cut, or None with the reason said."""
        if self.cfg.finetune_top != "auto":
            return None
        from imgcls.engine.finetune_top import plan_top_stage

        has_val = inp.val is not None and len(inp.val.split) > 0
        split, why = plan_top_stage(self.bundle.model, self.bundle.preprocessing, self.device, self.amp,
                                    len(inp.data.train), has_val, self.multi_label, 2 if inp.aug.hflip else 1,
                                    self.device.type != "mps")
        if split is None and self.say:
            self.say(f"top-block fine-tune: skipped ({why})")
        self._top_skipped = why
        return split

    def _top_stage(self, cached, split, settings: FitSettings, inp: TrainInputs, cbs: list[Callback]) -> None:
        """Fine-tune the top blocks on the kept activations; where it pays on the validation
        split the run's state continues with the stage's epochs."""
        from imgcls.engine.finetune_top import fit_top_cached

        probe = cached.state
        res = fit_top_cached(split, *cached.activations, settings, self.device, self.amp,
                             float(probe.best.get("val_acc", 0.0)), batch_size=min(64, self.local_batch),
                             callbacks=cbs, class_weights=inp.balance.weight_tensor(), log=self.say)
        cached.top_stage, cached.activations = res, None  # the activations are not needed any more
        if res.kept and res.state is not None:
            n = len(probe.history)
            stage = [{**h, "epoch": h["epoch"] + n, "stage": "top_blocks"} for h in res.state.history]
            res.state.history = [{**h, "stage": "probe"} for h in probe.history] + stage
            res.state.best = {**res.state.best, "epoch": res.state.best.get("epoch", 0) + n}
            cached.state = res.state
            if self.writer:  # history.csv holds the epochs that metrics.json counts, its best epoch too
                HistoryCSV(self.writer / "history.csv").write(res.state.history)

    def check_unlabeled(self, data: ImageData) -> None:
        """With ``--unlabeled`` and FixMatch (``--semi fixmatch|both``): the pool, checked against
        the labelled data before anything trains; the refusals name the flag to change."""
        cfg = self.cfg
        self.pool = None
        if not cfg.unlabeled or not cfg.semi_parts()[1]:
            return
        why = "multi-label data" if self.multi_label else "streamed shards" if data.train.streamed else None
        if why:
            raise ImgclsError(f"--semi {cfg.semi} (FixMatch) does not train on {why}",
                              "use --semi pseudo, or train without --unlabeled")
        self.pool, _ = pool_split(cfg.unlabeled)
        check_pool(data.train, self.pool, str(cfg.unlabeled))

    def fixmatch(self, inp: TrainInputs) -> FixMatch | None:
        """The consistency term of the training loop on the unlabelled pool (engine/consistency.py)."""
        cfg = self.cfg
        if self.pool is None:
            return None
        u = unlabeled_inputs(self.pool, inp.pre, inp.aug, self.local_batch * cfg.mu, seed=cfg.seed,
                             strong=cfg.strong_augment, cache=cfg.cache, workers=cfg.workers, rank=self.ctx.rank,
                             world=self.ctx.world_size, progress=self.progress and self.ctx.is_main)
        tau = confidence_threshold(cfg.pseudo_threshold, cfg.label_smoothing, len(self.bundle.classes))
        if self.say:
            scaled = f" ({cfg.pseudo_threshold:g} x the {tau / cfg.pseudo_threshold:.2f} a label-smoothed model " \
                     "reaches)" if tau != cfg.pseudo_threshold else ""
            self.say(f"semi-supervised: FixMatch consistency on {len(self.pool):,} unlabelled images, "
                     f"{self.local_batch * cfg.mu} per step (mu {cfg.mu}), threshold {tau:.3g}{scaled}, "
                     f"strong view {cfg.strong_augment} + cutout")
        return FixMatch(u.batches, u.weak, u.strong, threshold=tau, weight=cfg.unlabeled_weight)

    def thresholds(self, inp: TrainInputs, tta: str) -> dict[str, Any]:
        """Per-class thresholds of a multi-label model, tuned on the validation split
        (``--threshold-target``; engine/multilabel.py), for model.json."""
        b = self.bundle
        if inp.val is None or not len(inp.val.split) or self.ctx.world_size > 1:
            why = "no validation split" if self.ctx.world_size == 1 else "data parallel run"
            return default_thresholds(b.classes, why)
        logits, labels = predict_logits(b.model, inp.val, b.preprocessing, self.device, self.amp,
                                        self.device.type != "mps", tta=tta)
        return tune_thresholds(labels.numpy(), torch.sigmoid(logits).numpy(), b.classes, self.cfg.threshold_target)

    def _eval_train(self, inp: TrainInputs):
        """The training images in eval view (the feature cache's input)."""
        return eval_batches(inp.data.train, self.bundle.preprocessing, max(256, self.local_batch),
                            workers=self.cfg.workers, device=self.device)

    # ------------------------------------------------------------------ the whole run
    def run(self, data: Any) -> dict[str, Any]:
        """Train on ``data``; returns the training summary (also in ``bundle.card``)."""
        cfg = self.cfg
        self.start()
        loaded = self.load(data)
        self.check_unlabeled(loaded)
        inp = self.inputs(loaded)
        self.bundle.preprocessing = inp.pre  # the model trains, and is saved, with what its batches were built for
        lr, found = cfg.lr, None
        if lr == "auto":
            found = self._lr_find(inp)
            lr = found.suggestion
        # flip TTA by default only for small colour images trained with flips (cheap there)
        tta = cfg.tta if cfg.tta != "auto" else "flip" if inp.aug.hflip and inp.data.kind == "small-colour" else "none"
        self.bundle.card["tta"] = tta
        ft = self.finetune(lr)
        if ft is not None and ft.use_cache and self.pool is not None:
            if cfg.semi != "auto":
                raise ImgclsError(f"--semi {cfg.semi} (FixMatch) needs the backbone to see augmented images; a "
                                  "frozen backbone trains a head on cached features",
                                  "use --semi pseudo (or auto), or --feature-cache off")
            self.pool = None  # auto: pseudo-labels only on cached features
        self._not_applied = self._not_on_cached_features(ft)
        self._announce()
        try:
            out = self.train(inp, lr, tta, ft)
            if self.multi_label:
                self.bundle.card["thresholds"] = self.thresholds(inp, tta)
        finally:  # the decode workers stop with the run, not when a garbage collection finds them
            for batches in (inp.train, inp.val):
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
        summary = self.summary(inp, out, lr, tta, ft, found)
        self.bundle.card["training"] = summary
        self.history = out.state.history
        return summary

    def _not_on_cached_features(self, ft: FineTunePlan | None) -> list[str]:
        """The image augmentations that cached features cannot have (each image passes the
        frozen backbone once, unaugmented), said once; config.yaml records them all the same.
        A note rather than a refusal: the transfer recipe chooses the probe for the user."""
        cfg = self.cfg
        if ft is None or not ft.use_cache:
            return []
        dropped = [f"--{k} {v:g}" for k, v in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if v]
        dropped += [f"--randaugment {cfg.randaugment}"] if cfg.randaugment else []
        if dropped and self.ctx.is_main:
            print(f"imgcls: {', '.join(dropped)} not applied: the classifier trains on cached features (each image "
                  "passes the frozen backbone once, unaugmented); add --feature-cache off to train with "
                  f"{'it' if len(dropped) == 1 else 'them'}", file=sys.stderr)
        return dropped

    def find_lr(self, data: Any, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0) -> LRFindResult:
        """The learning-rate range test on exactly the batches ``run`` would train on."""
        self.start()
        return self._lr_find(self.inputs(self.load(data)), steps, start_lr, end_lr)

    def _lr_find(self, inp: TrainInputs, steps: int = 100, start_lr: float = 1e-7,
                 end_lr: float = 10.0) -> LRFindResult:
        try:
            return lr_find(self.bundle.model, inp.pre, inp.train, self.device, self.amp,
                           fit_settings(self.cfg, start_lr, self.multi_label), batch_augment=inp.batch_augment,
                           start_lr=start_lr, end_lr=end_lr, steps=steps, channels_last=self.device.type != "mps")
        except ValueError as exc:
            raise ImgclsError(f"learning-rate finder: {exc}", "check --start-lr / --end-lr / --steps") from None

    def _announce(self) -> None:
        cfg, ctx, say = self.cfg, self.ctx, self.say
        if say and cfg.recipe_choice and self.resume is None:  # why this recipe (runs.train resolved it)
            say(cfg.recipe_choice)
        if say and self.resume is not None:
            r = self.resume
            say(f"resuming {self.run_dir} at epoch {r['epoch']}, batch {r['batch_in_epoch']}/{r['steps_per_epoch']} "
                f"(checkpoint of {r.get('created', '?')})")
        if say and ctx.enabled:
            say(f"data parallel: {ctx.world_size} processes ({ctx.backend}), global batch {cfg.batch_size} = "
                f"{ctx.world_size} x {self.local_batch}, lr {cfg.lr} (for the global batch)")

    def summary(self, inp: TrainInputs, out: _Outcome, lr: float, tta: str, ft: FineTunePlan | None,
                found: LRFindResult | None) -> dict[str, Any]:
        cfg, ctx, state, data = self.cfg, self.ctx, out.state, inp.data
        scale = {"processes": ctx.world_size, "backend": ctx.backend or None, "global_batch": cfg.batch_size,
                 "per_process_batch": self.local_batch, "lr": lr,
                 "lr_scaling": "none: --lr is for the global batch, which does not change with the process count"}
        if ctx.enabled:
            scale["weights_sha256_all_ranks"] = D.check_in_sync(self.bundle.model, ctx)
        self.bundle.model.to("cpu").to(memory_format=torch.contiguous_format)
        summary = {
            "data": data.name, "data_notes": data.notes, "train_images": len(data.train),
            "val_images": len(data.val) if data.val is not None else 0,
            "epochs_run": len(state.history), "best_epoch": int(state.best.get("epoch", len(state.history))),
            "best": {k: v for k, v in state.best.items() if k != "epoch"}, "train_time_s": round(out.train_time, 2),
            "device": str(self.device), "precision": precision_name(self.amp), "augment": inp.aug.to_dict(),
            "batch_size": cfg.batch_size, "stopped_early": state.stop_reason or None,
            "val_split": cfg.val_split, "group_by": cfg.group_by, "seed": cfg.seed, "distributed": scale,
            "resumed_from_epoch": int(self.resume["epoch"]) if self.resume else None,
            "balance": inp.balance.to_dict(), "lr": lr, "tta": tta, "threads": torch.get_num_threads(),
            "time_budget_min": cfg.time_budget,
        }
        if ft is not None:
            summary["finetune"] = dict(ft.settings)
        if out.cached is not None:
            c = out.cached
            summary["finetune"].update({"extract_s": round(c.extract_s, 2), "head_train_s": round(c.head_s, 2),
                                        "cached_views": c.views, "feature_dim": c.feature_dim,
                                        "not_applied": self._not_applied})
            if c.top_stage is not None:
                summary["finetune"]["top_blocks"] = c.top_stage.to_dict()
            elif self.cfg.finetune_top == "auto":
                summary["finetune"]["top_blocks"] = {"kept": False, "why": f"skipped: {self._top_skipped}"}
        if self.pool is not None:
            summary["fixmatch"] = {"unlabeled_images": len(self.pool), "mu": cfg.mu,
                                   "threshold": round(confidence_threshold(cfg.pseudo_threshold, cfg.label_smoothing,
                                                                           len(self.bundle.classes)), 4),
                                   "strong_augment": cfg.strong_augment, "weight": cfg.unlabeled_weight,
                                   "last_epoch_mask": state.history[-1].get("unlabeled_mask") if state.history else None}
        if found is not None:
            summary["lr_find"] = {"suggestion": found.suggestion, "min_loss_lr": found.min_loss_lr}
        if inp.files is not None:
            summary["files"] = inp.files.to_dict(inp.files.csv_path)
        if cfg.deterministic:
            summary["reproducibility"] = {"deterministic": True, "seed": cfg.seed, "environment":
                                          environment(self.device), "data_fingerprint": self.fingerprint}
        return summary

