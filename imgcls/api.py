"""The Python API. The CLI, the web service and reports are thin layers over this.

    from imgcls import Classifier
    clf = Classifier.create("reference_cnn", num_classes=10, in_chans=1, img_size=28)
    clf.fit("digits", epochs=3)
    clf.evaluate("digits")["accuracy"]
    clf.predict(["seven.png"], top_k=3)
    clf.save("my_model"); clf = Classifier.load("my_model")
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgcls import __version__
from imgcls.artifact import load_weights, read_card, save_model
from imgcls.config import TrainConfig
from imgcls.data.balance import plan_balance
from imgcls.data.cache import CacheSpec
from imgcls.data.decode import images_in_folder
from imgcls.data.loaders import BalancedOrder, Batches
from imgcls.data.prepare import decode_data
from imgcls.data.records import ImageData, Split
from imgcls.data.sources import _to_nchw_uint8, load_data, with_classes
from imgcls.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, BatchAugment, BatchResizedCrop,
                                    Preprocessing, augment_preset, photo_train_transform)
from imgcls.engine import distributed as D
from imgcls.engine.callbacks import BestModel, Callback, EarlyStopping, HistoryCSV, ProgressBar
from imgcls.engine.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint, preflight_run_dir
from imgcls.engine.device import precision_name, resolve_device, resolve_precision
from imgcls.engine.finetune import fit_head_cached, plan_finetune
from imgcls.engine.lr_find import LRFindResult, lr_find
from imgcls.engine.recipes import RecipeContext, resolve_recipe
from imgcls.engine.speed import EMA, AdaptiveThreads, Lookahead, configure_threads, tune_cpu_allocator
from imgcls.engine.reproducibility import data_fingerprint, environment, seed_everything, set_deterministic
from imgcls.engine.trainer import FitSettings, Trainer, predict_logits
from imgcls.errors import ImgclsError
from imgcls.evaluation.metrics import classification_metrics
from imgcls.models import MODEL_DEFAULTS, count_params, create_model, model_from_config


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def library_versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"imgcls": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _data_stats(images: torch.Tensor, in_chans: int, max_images: int = 10_000) -> tuple[tuple, tuple]:
    """Per-channel mean/std of (a sample of) uint8 training images, after channel conversion."""
    x = images[:: max(1, len(images) // max_images)].float() / (65535.0 if images.dtype == torch.uint16 else 255.0)
    if x.shape[1] != in_chans:
        x = x.mean(1, keepdim=True).expand(-1, in_chans, -1, -1) if in_chans == 3 else x.mean(1, keepdim=True)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when the file was unreadable
    probabilities: list[float] = field(repr=False, default_factory=list)
    error: str | None = None  # why the image could not be read (it has no prediction)

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        d = {"source": self.source, "label": self.label,
             "top": [{"class": c, "probability": round(p, 6)} for c, p in self.top]}
        if self.error:
            d["error"] = self.error
        return d


class Classifier:
    """A model together with its classes and preprocessing: everything needed to train,
    evaluate, predict and be saved and loaded again."""

    def __init__(self, model: torch.nn.Module, *, architecture: str, classes: list[str],
                 preprocessing: Preprocessing, model_kwargs: dict[str, Any] | None = None,
                 card: dict[str, Any] | None = None):
        self.model = model
        self.architecture = architecture
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.model_kwargs = dict(model_kwargs or {})
        self.card: dict[str, Any] = dict(card or {})
        self.temperature: float = float(self.card.get("temperature", 1.0))
        self.path: Path | None = None  # the folder it was loaded from: exports (model.onnx) live there

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, architecture: str = "reference_cnn", num_classes: int | None = None,
               classes: list[str] | None = None, in_chans: int | None = None,
               img_size: int | None = None, seed: int | None = None, **model_kwargs: Any) -> Classifier:
        """A new, randomly initialised model (``seed`` makes the initial weights reproducible)."""
        if seed is not None:
            seed_everything(seed)
        if classes is None:
            if num_classes is None:
                raise ImgclsError("Classifier.create needs num_classes or classes", "e.g. num_classes=10")
            classes = [str(i) for i in range(num_classes)]
        elif num_classes is not None and num_classes != len(classes):
            raise ImgclsError(f"num_classes={num_classes} but {len(classes)} class names were given",
                              "give one or make them agree")
        if len(classes) < 2:
            raise ImgclsError("a classifier needs at least two classes", "give num_classes >= 2")
        defaults = MODEL_DEFAULTS.get(architecture, {})
        in_chans = in_chans or defaults.get("in_chans", 3)
        img_size = img_size or defaults.get("img_size", 224)
        model = create_model(architecture, len(classes), in_chans=in_chans, img_size=img_size, **model_kwargs)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
        pre = Preprocessing(img_size=img_size, in_chans=in_chans, mean=mean, std=std)
        return cls(model, architecture=architecture, classes=classes, preprocessing=pre, model_kwargs=model_kwargs)

    @classmethod
    def from_pretrained(cls, architecture: str, num_classes: int | None = None, classes: list[str] | None = None,
                        weights: str | Path | None = None, in_chans: int = 3, img_size: int | None = None,
                        seed: int | None = None, **model_kwargs: Any) -> Classifier:
        """A timm architecture with pretrained weights (from ``weights``, a local .safetensors /
        .pth state dict, else timm's hub download) and a new head for ``classes``. The
        pretrained mean/std, input size, interpolation and crop become the preprocessing."""
        from imgcls.models.pretrained import create_pretrained

        if seed is not None:
            seed_everything(seed)  # the new head's initial weights
        if classes is None:
            if num_classes is None:
                raise ImgclsError("Classifier.from_pretrained needs num_classes or classes", "e.g. num_classes=2")
            classes = [str(i) for i in range(num_classes)]
        model, info = create_pretrained(architecture, len(classes), in_chans=in_chans, weights=weights, **model_kwargs)
        pre = Preprocessing(img_size=img_size or info.input_size, in_chans=in_chans, mean=info.mean, std=info.std,
                            resize="shorter_side", crop_pct=info.crop_pct, interpolation=info.interpolation)
        return cls(model, architecture=architecture, classes=classes, preprocessing=pre, model_kwargs=model_kwargs,
                   card={"pretrained": info.to_card()})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ------------------------------------------------------------------ data plumbing
    def _check_classes(self, data: ImageData) -> ImageData:
        """``data`` relabelled to the model's class order (its classes may be a subset)."""
        if data.classes != self.classes and set(data.classes) <= set(self.classes):
            return with_classes(data, self.classes)
        if data.classes != self.classes:
            raise ImgclsError(
                f"the data's classes {data.classes[:6]}{'…' if len(data.classes) > 6 else ''} differ from the "
                f"model's {self.classes[:6]}{'…' if len(self.classes) > 6 else ''}",
                "use data with the same class names")
        return data

    def _batches(self, split: Split, batch_size: int, *, train: bool = False, seed: int = 0,
                 aug: AugmentSpec | None = None, workers: int | None = None, device=None,
                 crop: bool = True, order=None, batch_transform=None,
                 skipped: dict[int, str] | None = None) -> Batches:
        pre = self.preprocessing
        pin = device is not None and device.type == "cuda"
        if split.in_memory:
            # decoded-once photos are stored img_size / crop_pct square: centre-crop them
            # (training with the photo preset crops at random on the device instead)
            big = pre.resize == "shorter_side" and split.images.shape[-1] > pre.img_size
            return Batches(split, batch_size, shuffle=train, seed=seed, drop_last=train, pin_memory=pin,
                           order=order, center_crop=pre.img_size if (big and crop) else None,
                           transform=batch_transform, workers=workers)
        transform = photo_train_transform(pre, aug) if (train and aug) else pre.pil_transform()
        spec = CacheSpec.for_preprocessing(pre)  # same reduced JPEG decode as the cache
        return Batches(split, batch_size, shuffle=train, seed=seed, transform=transform, channels=pre.in_chans,
                       size=pre.img_size, workers=workers, pin_memory=pin, drop_last=train, order=order,
                       min_side=spec.side if pre.resize == "shorter_side" else None, skipped=skipped)

    # ------------------------------------------------------------------ training
    def fit(self, data: Any, *, epochs: int = 3, batch_size: int = 128, lr: float | str = 3e-3,
            optimizer: str = "adam", weight_decay: float = 0.0, momentum: float = 0.9,
            schedule: str = "onecycle", warmup_epochs: float = 0.3, label_smoothing: float = 0.0,
            augment: str = "auto", hflip: bool | None = None, patience: int | None = None,
            val_split: float = 0.1, seed: int = 0, device: str = "auto", precision: str = "auto",
            workers: int | None = None, run_dir: str | Path | None = None, progress: bool = True,
            callbacks: list[Callback] | None = None, deterministic: bool = False,
            checkpoint_every: float | None = None, resume: dict[str, Any] | None = None,
            strict: bool = False, balance: str = "auto", cache: bool = True, freeze: str = "none",
            unfreeze_at: int | None = None, unfreeze: str = "gradual", backbone_lr: float | None = None,
            layer_decay: float | None = None, feature_cache: str = "auto",
            log: str | list[str] | None = None, mixup: float = 0.0,
            cutmix: float = 0.0, randaugment: str | None = None, ema: float = 0.0, tta: str = "auto",
            compile: bool = False, threads: int | None = None, lookahead: bool = False) -> dict[str, Any]:
        """Train on ``data`` (a folder, CSV/TSV manifest, .npz, dataset name, arrays or
        ImageData); keeps the weights of the best validation epoch. Returns a summary
        (history, best epoch, time).

        Image files are decoded once, before the first epoch, into a disk cache
        (``cache=False``: in memory only); unreadable files are skipped and listed in
        ``run_dir/skipped.csv`` (``strict=True``: an error). ``balance``: auto | none |
        weights | sampler, see :mod:`imgcls.data.balance`.

        Under torchrun every process calls this: ``batch_size`` is the global batch, split
        evenly over the processes. With ``run_dir``, ``run_dir/checkpoint.pt`` is written
        every epoch (and every ``checkpoint_every`` minutes); ``resume`` (a loaded checkpoint)
        continues from it. ``log``: extra experiment logs, e.g. "tensorboard" or "tensorboard,mlflow"
        (written by the main process only).

        Fine-tuning (engine/finetune.py): ``freeze="backbone"`` trains only the classifier
        (on features cached once, unless ``feature_cache="off"``); ``unfreeze_at`` unfreezes
        the backbone from that epoch (``unfreeze`` "gradual" or "all"); ``backbone_lr`` and
        ``layer_decay`` give the backbone lower learning rates.

        Speed options (docs/speed.md): ``lr="auto"`` runs the learning-rate finder first;
        ``mixup``/``cutmix``/``randaugment`` (timm), ``ema`` (decay per step), ``lookahead``,
        ``tta`` (auto | none | flip | flip-shift), ``compile`` (torch.compile), ``threads``."""
        ctx = D.setup(device)
        (set_deterministic if deterministic else seed_everything)(seed)
        data = self._check_classes(load_data(data, val_split=val_split, seed=seed))
        fingerprint = data_fingerprint(data) if deterministic or (resume or {}).get("data_fingerprint") else None
        if resume is not None and resume.get("data_fingerprint") and resume["data_fingerprint"] != fingerprint:
            raise ImgclsError("the data changed since the checkpoint was written (its fingerprint differs)",
                              "resume with the same data, or start a new run")
        dev = ctx.device if ctx.enabled else resolve_device(device)
        local_batch = D.local_batch_size(batch_size, ctx)
        amp = resolve_precision(precision, dev)
        configure_threads(threads)
        if dev.type == "cpu":
            tune_cpu_allocator()
        pre = self.preprocessing
        # preprocessing follows the data: statistics of in-memory images, photo-style resize for files
        if data.train.in_memory and not self.card.get("pretrained"):
            pre.mean, pre.std = _data_stats(data.train.images, pre.in_chans)
        run_dir = Path(run_dir) if run_dir else None
        writer = run_dir if ctx.is_main else None  # only rank 0 writes files and prints
        files = None
        if not data.train.in_memory:
            if not self.card.get("pretrained"):  # pretrained: the crop of its pretrained config
                pre.resize, pre.crop_pct = "shorter_side", 0.875
            files = decode_data(data, pre, strict=strict, cache=cache, workers=workers,
                                progress=progress and ctx.is_main, report_dir=writer, announce=ctx.is_main)
            data = files.data
            empty = [c for c, n in zip(self.classes, data.train.class_counts(self.num_classes)) if n == 0]
            if empty:
                raise ImgclsError(f"class '{empty[0]}' has no readable training images",
                                  "add images to it, or leave it out with --classes")
        aug = augment_preset(augment, data.kind, hflip)
        aug.randaugment = randaugment
        plan = plan_balance(data.train.labels, self.classes, balance)
        if (plan.mode != "none" or plan.ratio >= 3) and ctx.is_main:
            print(f"imgcls: {plan.describe()}", file=sys.stderr)
        order = BalancedOrder(data.train.labels, seed) if plan.mode == "sampler" else None
        # photos from the decode cache: random resized crops per image in loader workers on a
        # CPU (in parallel with the training step), per batch on the device elsewhere
        photo_crop = files is not None and aug.preset == "photo"
        in_workers = photo_crop and dev.type == "cpu"
        train_b = self._batches(data.train, local_batch, train=True, seed=seed, aug=aug, workers=workers, device=dev,
                                crop=not photo_crop, order=order,
                                batch_transform=BatchResizedCrop(pre.img_size, aug.scale, hflip=aug.hflip)
                                if in_workers else None)
        val_b = self._batches(data.val, max(256, local_batch), workers=workers, device=dev) if data.val is not None else None
        if ctx.enabled:  # each process reads its share (engine/distributed.py)
            train_b.shard(ctx.rank, ctx.world_size, even=True)
            if val_b is not None:
                val_b.shard(ctx.rank, ctx.world_size, even=False)
        if in_workers:
            batch_aug = None
        elif photo_crop:
            batch_aug = BatchResizedCrop(pre.img_size, aug.scale, hflip=aug.hflip)
        else:
            alternate = data.train.in_memory and aug.hflip  # flips by the loader, alternating per epoch
            if alternate:
                aug.flip_order = "alternate"
                train_b.alternate_flips(seed)
            batch_aug = BatchAugment(aug.translate, aug.hflip and not alternate, randaugment) \
                if data.train.in_memory and (aug.preset != "none" or randaugment) else None
        lr_found = None
        if lr == "auto":
            lr_found = lr_find(self.model, pre, train_b, dev, amp, optimizer=optimizer, weight_decay=weight_decay,
                               momentum=momentum, label_smoothing=label_smoothing, batch_augment=batch_aug,
                               seed=seed)
            lr = lr_found.suggestion
        # flip TTA by default only for small colour images trained with flips (cheap there)
        tta = ("flip" if aug.hflip and data.kind == "small-colour" else "none") if tta == "auto" else tta

        best = BestModel(on_improve=(lambda m, b: self._save_to(writer, best_metrics=b)) if writer else None)
        cbs: list[Callback] = [best]
        if ema:
            cbs.insert(0, EMA(ema))
        if lookahead:
            cbs.insert(0, Lookahead())
        if threads is None and dev.type == "cpu":
            cbs.append(AdaptiveThreads())
        if patience:
            cbs.append(EarlyStopping(patience))
        if writer:
            cbs.append(HistoryCSV(writer / "history.csv"))
        if progress and ctx.is_main:
            cbs.append(ProgressBar())
        cbs += callbacks or []
        ckpt = None
        if run_dir is not None:
            ckpt = Checkpoint(run_dir, checkpoint_every, resume=resume,
                              extra={"data_fingerprint": fingerprint} if fingerprint else None)
            cbs.append(ckpt)
        settings = FitSettings(epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                               momentum=momentum, schedule=schedule, warmup_epochs=warmup_epochs,
                               label_smoothing=label_smoothing, seed=seed, compile=compile, mixup=mixup,
                               cutmix=cutmix)
        self.card["tta"] = tta
        if log and ctx.is_main:  # experiment loggers (tensorboard, mlflow) are callbacks too
            from dataclasses import asdict

            from imgcls.engine.loggers import build_loggers

            cbs += build_loggers(log, writer, {"architecture": self.architecture, "data": data.name,
                                               "batch_size": batch_size, "augment": aug.preset, **asdict(settings)})
        say = _stderr_console().print if progress and ctx.is_main else None
        ft = plan_finetune(self.model, pretrained=bool(self.card.get("pretrained")), freeze=freeze,
                           unfreeze_at=unfreeze_at, unfreeze=unfreeze, backbone_lr=backbone_lr,
                           layer_decay=layer_decay,
                           feature_cache="off" if ctx.enabled and feature_cache == "auto" else feature_cache,
                           lr=lr, weight_decay=weight_decay, epochs=epochs, log=say)
        scale = {"processes": ctx.world_size, "backend": ctx.backend or None, "global_batch": batch_size,
                 "per_process_batch": local_batch, "lr": lr,
                 "lr_scaling": "none: --lr is for the global batch, which does not change with the process count"}
        if resume is not None and ctx.is_main and progress:
            _stderr_console().print(f"resuming {run_dir} at epoch {resume['epoch']}, batch {resume['batch_in_epoch']}"
                                    f"/{resume['steps_per_epoch']} (checkpoint of {resume.get('created', '?')})",
                                    highlight=False, soft_wrap=True)
        if ctx.enabled and ctx.is_main and progress:
            _stderr_console().print(f"data parallel: {ctx.world_size} processes ({ctx.backend}), global batch "
                                    f"{batch_size} = {ctx.world_size} x {local_batch}, lr {lr:g} (for the global batch)",
                                    highlight=False, soft_wrap=True)
        t0 = time.perf_counter()
        cached = None
        try:
            if ft is not None and ft.use_cache:
                # seconds of head training: no checkpoints and no model file per improved epoch (those
                # writes took longer than the training); the run folder gets the best model when fit returns
                best.on_improve = None
                # the features come from eval-view batches
                eval_train = self._batches(data.train, max(256, local_batch), workers=workers, device=dev)
                cached = fit_head_cached(self.model, eval_train, val_b, pre, settings, dev, amp,
                                         [c for c in cbs if c is not ckpt], batch_size=local_batch,
                                         flip=aug.hflip, log=say, class_weights=plan.weight_tensor())
                state = cached.state
                if writer:
                    self._save_to(writer, best_metrics=state.best)
            else:
                trainer = Trainer(self.model, pre, settings, dev, amp, batch_augment=batch_aug,
                                  callbacks=cbs + (ft.callbacks if ft else []), dist=ctx,
                                  class_weights=plan.weight_tensor(), param_groups=ft.param_groups if ft else None,
                                  tta=tta)
                if ckpt is not None:
                    ckpt.attach(trainer)
                state = trainer.fit(train_b, val_b)
        finally:
            if ft is not None:
                ft.finish()
        train_time = time.perf_counter() - t0
        if ctx.enabled:
            scale["weights_sha256_all_ranks"] = D.check_in_sync(self.model, ctx)
        self.model.to("cpu").to(memory_format=torch.contiguous_format)
        summary = {
            "data": data.name, "data_notes": data.notes, "train_images": len(data.train),
            "val_images": len(data.val) if data.val is not None else 0,
            "epochs_run": len(state.history), "best_epoch": int(state.best.get("epoch", len(state.history))),
            "best": {k: v for k, v in state.best.items() if k != "epoch"}, "train_time_s": round(train_time, 2),
            "device": str(dev), "precision": precision_name(amp), "augment": aug.to_dict(),
            "batch_size": batch_size, "stopped_early": state.stop_reason or None,
            "val_split": val_split, "seed": seed, "distributed": scale,
            "resumed_from_epoch": int(resume["epoch"]) if resume else None, "balance": plan.to_dict(),
            "lr": lr, "tta": tta, "threads": torch.get_num_threads(),
        }
        if ft is not None:
            summary["finetune"] = dict(ft.settings)
        if cached is not None:
            summary["finetune"].update({"extract_s": round(cached.extract_s, 2), "head_train_s": round(cached.head_s, 2),
                                        "cached_views": cached.views, "feature_dim": cached.feature_dim})
        if lr_found is not None:
            summary["lr_find"] = {"suggestion": lr_found.suggestion, "min_loss_lr": lr_found.min_loss_lr}
        if files is not None:
            summary["files"] = files.to_dict(files.csv_path)
        if deterministic:
            summary["reproducibility"] = {"deterministic": True, "seed": seed, "environment": environment(dev),
                                          "data_fingerprint": fingerprint}
        self.card["training"] = summary
        self.history = state.history
        return summary

    def _setup(self, data: Any, batch_size: int, *, augment: str = "auto", hflip: bool | None = None,
               randaugment: str | None = None, val_split: float = 0.1, seed: int = 0, device: str = "auto",
               precision: str = "auto", workers: int | None = None, threads: int | None = None):
        """Data, device, precision, augmentation and batches for training (fit, find_lr)."""
        data = self._check_classes(load_data(data, val_split=val_split, seed=seed))
        dev = resolve_device(device)
        amp = resolve_precision(precision, dev)
        configure_threads(threads)
        pre = self.preprocessing
        # preprocessing follows the data: statistics of in-memory images, photo-style resize for files
        if data.train.in_memory and not self.card.get("pretrained"):
            pre.mean, pre.std = _data_stats(data.train.images, pre.in_chans)
        if not data.train.in_memory:
            pre.resize, pre.crop_pct = "shorter_side", 0.875
        aug = augment_preset(augment, data.kind, hflip)
        aug.randaugment = randaugment
        train_b = self._batches(data.train, batch_size, train=True, seed=seed, aug=aug, workers=workers, device=dev)
        val_b = self._batches(data.val, max(256, batch_size), workers=workers, device=dev) if data.val is not None else None
        batch_aug = BatchAugment(aug.translate, aug.hflip, randaugment) \
            if data.train.in_memory and (aug.preset != "none" or randaugment) else None
        return data, dev, amp, aug, train_b, val_b, batch_aug

    def find_lr(self, data: Any, *, batch_size: int = 128, optimizer: str = "adam", weight_decay: float = 0.0,
                momentum: float = 0.9, label_smoothing: float = 0.0, augment: str = "auto",
                hflip: bool | None = None, val_split: float = 0.1, seed: int = 0, device: str = "auto",
                precision: str = "auto", workers: int | None = None, threads: int | None = None,
                steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0) -> LRFindResult:
        """Learning-rate range test on a copy of this model (its weights stay as they are)."""
        seed_everything(seed)
        data, dev, amp, aug, train_b, _, batch_aug = self._setup(
            data, batch_size, augment=augment, hflip=hflip, val_split=val_split, seed=seed, device=device,
            precision=precision, workers=workers, threads=threads)
        try:
            return lr_find(self.model, self.preprocessing, train_b, dev, amp, optimizer=optimizer,
                           weight_decay=weight_decay, momentum=momentum, label_smoothing=label_smoothing,
                           batch_augment=batch_aug, start_lr=start_lr, end_lr=end_lr, steps=steps, seed=seed,
                           channels_last=dev.type != "mps")
        except ValueError as exc:
            raise ImgclsError(f"learning-rate finder: {exc}", "check --start-lr / --end-lr / --steps") from None

    # ------------------------------------------------------------------ inference
    def _logits(self, split: Split, batch_size: int = 256, device: str = "auto", precision: str = "auto",
                workers: int | None = None, progress: bool = False,
                skipped: dict[int, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dev = resolve_device(device)
        amp = resolve_precision(precision, dev)
        self.model.to(dev)
        bar = None
        if progress and len(split) > 4 * batch_size:
            from rich.progress import Progress

            bar = Progress(transient=True, console=_stderr_console())
            task = bar.add_task("predicting", total=len(split))
            bar.start()
        try:
            return predict_logits(self.model, self._batches(split, batch_size, workers=workers, device=dev,
                                                            skipped=skipped),
                                  self.preprocessing, dev, amp, channels_last=dev.type != "mps",
                                  on_batch=(lambda n: bar.advance(task, n)) if bar else None,
                                  tta=self.card.get("tta", "none"))
        finally:
            if bar is not None:
                bar.stop()
            self.model.to("cpu")

    def eval_data(self, data: Any, split: str | None = None, strict: bool = False, cache: bool = True,
                  announce: bool = True) -> tuple[ImageData, str, Split, list]:
        """The data (validation split held out exactly as in training), the split's name, the
        split to evaluate on (test if there is one, else validation, or ``split``), decoded,
        and the files that could not be read."""
        training = self.card.get("training", {})
        data = load_data(data, val_split=training.get("val_split", 0.1), seed=training.get("seed", 0))
        data = self._check_classes(data)
        if split is None:
            split, part = data.eval_split()
        else:
            part = getattr(data, split, None)
            if part is None or not len(part):
                raise ImgclsError(f"the data has no '{split}' split", "use --split train, val or test")
        skipped = []
        if not part.in_memory:
            only = dataclasses.replace(data, **({"train": None, "val": None, "test": None} | {split: part}))
            files = decode_data(only, self.preprocessing, strict=strict, cache=cache, splits=(split,), announce=announce)
            part, skipped = getattr(files.data, split), files.skipped
        return data, split, part, skipped

    def calibrate(self, data: Any, batch_size: int = 256, device: str = "auto") -> dict[str, Any]:
        """Temperature scaling: fit ``self.temperature`` on the data's validation split (held
        out as in training) so probabilities match accuracy; ``save()`` stores it in
        model.json. Predicted classes do not change. Returns ECE/NLL before and after."""
        from imgcls.evaluation.calibration import temperature_scaling

        _, _, part, _ = self.eval_data(data, "val")
        logits, labels = self._logits(part, batch_size, device)
        self.temperature, info = temperature_scaling(logits, labels)
        self.card["calibration"] = info
        return info

    def evaluate(self, data: Any, split: str | None = None, batch_size: int = 256, device: str = "auto",
                 precision: str = "auto", strict: bool = False, cache: bool = True,
                 announce: bool = True) -> dict[str, Any]:
        """Metrics on the data's test split (else its validation split, held out as in
        training); ``split`` picks one explicitly. Unreadable image files are skipped and
        counted in ``skipped_files`` (``strict``: an error)."""
        data, split, part, skipped = self.eval_data(data, split, strict=strict, cache=cache, announce=announce)
        logits, labels = self._logits(part, batch_size, device, precision)
        m = classification_metrics(logits / self.temperature, labels, self.classes)
        m["split"], m["data"] = split, data.name
        if skipped:
            m["skipped_files"] = [{"path": str(p), "reason": r} for _, p, r in skipped]
        return m

    def predict_proba(self, images: Any, batch_size: int = 64, device: str = "auto", precision: str = "auto",
                      workers: int | None = None, progress: bool = False, backend: str = "torch",
                      strict: bool = False) -> tuple[np.ndarray, list[str]]:
        """Class probabilities ``(N, num_classes)`` and the source name of each image.
        ``backend``: torch, onnx (the run's exported model.onnx) or auto (see imgcls.export.runtime).
        An image file that cannot be read gets a row of NaN (``predict`` says why);
        ``strict``: an error naming it instead."""
        probs, sources, _ = self._proba(images, batch_size, device, precision, workers, progress, backend, strict)
        return probs, sources

    def _proba(self, images: Any, batch_size: int, device: str, precision: str, workers: int | None,
               progress: bool, backend: str, strict: bool) -> tuple[np.ndarray, list[str], dict[int, str]]:
        split, sources = self._as_split(images)
        skipped: dict[int, str] | None = None if strict else {}
        if backend != "torch":
            from imgcls.export.runtime import backend_proba

            probs = backend_proba(self, split, backend, batch_size, device, precision, workers, progress, skipped)
        else:
            logits, _ = self._logits(split, batch_size, device, precision, workers, progress, skipped)
            probs = F.softmax(logits / self.temperature, dim=1).numpy()
        skipped = skipped or {}
        if skipped:
            probs[sorted(skipped)] = np.nan  # a blank stand-in image went through the model: no prediction
        return probs, sources, skipped

    def predict(self, images: Any, top_k: int = 1, batch_size: int = 64, device: str = "auto",
                precision: str = "auto", workers: int | None = None, progress: bool = False,
                backend: str = "torch", strict: bool = False) -> list[Prediction]:
        """Top-k classes for image files, folders (recursively), PIL images or arrays. A file
        that cannot be read gets a Prediction with ``error`` set and no classes (``strict``:
        an error naming it instead)."""
        probs, sources, skipped = self._proba(images, batch_size, device, precision, workers, progress, backend,
                                              strict)
        k = max(1, min(top_k, self.num_classes))
        out = []
        for n, (src, p) in enumerate(zip(sources, probs)):
            if n in skipped:
                out.append(Prediction(src, [], [], error=skipped[n]))
                continue
            idx = np.argsort(-p)[:k]
            out.append(Prediction(src, [(self.classes[i], float(p[i])) for i in idx], p.tolist()))
        return out

    def explain(self, images: Any, method: str = "gradcam", target: Any = None, layer: str | None = None,
                **opts: Any) -> list:
        """Heatmaps of what drove the predictions, with faithfulness scores: see
        :func:`imgcls.explain.explain` (methods: gradcam, gradcam++, ig, occlusion, lime, shap)."""
        from imgcls.explain import explain

        return explain(self, images, method=method, target=target, layer=layer, **opts)

    def _as_split(self, images: Any) -> tuple[Split, list[str]]:
        from PIL import Image

        from imgcls.data.decode import to_mode

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        if isinstance(images, np.ndarray):
            x = images
            if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4)):
                x = x[None]  # one (H,W) or (H,W,C) image
            t = _to_nchw_uint8(x, "images")
            return Split(labels=torch.zeros(len(t), dtype=torch.long), images=t), \
                [f"array[{i}]" for i in range(len(t))]
        if isinstance(images, torch.Tensor):
            return self._as_split(images.cpu().numpy())
        paths: list[Path] = []
        pil: list[torch.Tensor] = []
        names: list[str] = []
        tf = self.preprocessing.pil_transform()
        for item in images:
            if isinstance(item, Image.Image):
                pil.append(tf(to_mode(item, self.preprocessing.in_chans)))
                names.append(f"image[{len(names)}]")
                continue
            p = Path(item)
            if p.is_dir():
                found = images_in_folder(p)
                paths += found
                names += [str(f) for f in found]
            elif p.is_file():
                paths.append(p)
                names.append(str(p))
            else:
                raise ImgclsError(f"image not found: {p}", "check the path")
        if pil and paths:
            raise ImgclsError("mixing PIL images and file paths in one call", "predict them in two calls")
        if pil:
            return Split(labels=torch.zeros(len(pil), dtype=torch.long), images=torch.stack(pil)), names
        if not paths:
            raise ImgclsError("no images given", "give image files, folders, PIL images or arrays")
        return Split(labels=torch.zeros(len(paths), dtype=torch.long), paths=paths), names

    # ------------------------------------------------------------------ persistence
    def build_card(self, best_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        card = {k: v for k, v in self.card.items() if k not in ("format", "format_version", "weights_sha256")}
        card.update({
            "architecture": self.architecture, "model_kwargs": self.model_kwargs,
            "num_classes": self.num_classes, "classes": self.classes,
            "in_chans": self.preprocessing.in_chans, "img_size": self.preprocessing.img_size,
            "preprocessing": self.preprocessing.to_dict(), "temperature": self.temperature,
            "num_params": count_params(self.model), "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if best_metrics is not None:
            card.setdefault("metrics", {})["best_val"] = {k: v for k, v in best_metrics.items()}
        return card

    def _save_to(self, folder: Path, best_metrics: dict[str, Any] | None = None) -> None:
        save_model(folder, self.model, self.build_card(best_metrics))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.card = save_model(folder, self.model, self.build_card())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Classifier:
        card = read_card(folder)
        pre = Preprocessing.from_dict(card["preprocessing"])
        try:
            model = create_model(card["architecture"], int(card["num_classes"]), in_chans=pre.in_chans,
                                 img_size=pre.img_size, **card.get("model_kwargs", {}))
        except ImgclsError as exc:
            raise ImgclsError(f"cannot rebuild the model of {folder}: {exc.message}", exc.hint) from None
        state = load_weights(folder, card)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ImgclsError(f"the weights in {folder} do not fit architecture '{card['architecture']}' "
                              f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)",
                              "the files do not belong together; retrain or restore them")
        model.eval()
        clf = cls(model, architecture=card["architecture"], classes=card["classes"], preprocessing=pre,
                  model_kwargs=card.get("model_kwargs"), card=card)
        clf.path = Path(folder) if Path(folder).is_dir() else Path(folder).parent
        return clf


# ---------------------------------------------------------------------- runs
def next_run_dir(out: str | Path, name: str | None = None, base: str = "train") -> Path:
    """``out/train``, ``out/train2``, ... (or ``out/NAME`` when a name is given)."""
    out = Path(out)
    if name:
        return out / name
    i = 1
    while True:
        cand = out / (base if i == 1 else f"{base}{i}")
        if not cand.exists():
            return cand
        i += 1


@dataclass
class TrainResult:
    run_dir: Path
    classifier: Classifier
    metrics: dict[str, Any]
    summary: dict[str, Any]


def train(config: TrainConfig | dict[str, Any] | None = None, progress: bool = True,
          resume: str | Path | None = None) -> TrainResult:
    """Everything ``imgcls train`` does: data, model, fit, evaluate, and a run folder with
    model.safetensors, model.json, config.yaml, history.csv, metrics.json and
    checkpoint.pt. ``resume``: a run folder to continue from its checkpoint (with its own
    config.yaml unless ``config`` is given). Under torchrun every process calls this;
    rank 0 alone writes the run folder."""
    if resume is not None and config is None:
        config = resume_config(resume)
    if config is None:
        raise ImgclsError("no training config given", "pass a TrainConfig, a dict, or resume=RUN_FOLDER")
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not cfg.data:
        raise ImgclsError("no data given", "pass --data FOLDER|FILE.npz|NAME (e.g. --data digits)")
    joined_here = D.launched_by_torchrun() and not D.current().enabled
    ctx = D.setup(cfg.device)
    try:
        result = _train(cfg, ctx, progress, Path(resume) if resume is not None else None)
        D.barrier(ctx)  # rank 0 evaluates and saves while the others wait, then all leave together
        return result
    finally:
        if joined_here:
            D.cleanup()


def resume_config(run_dir: str | Path) -> TrainConfig:
    """The config a run folder was trained with (its config.yaml)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ImgclsError(f"{run_dir} is not a run folder (no config.yaml)",
                          "give the folder `imgcls train` printed, e.g. --resume runs/train")
    return TrainConfig.from_yaml(path)


def _on_rank0(ctx: D.DistContext, fn):
    """Run ``fn`` on rank 0 and hand its result - or its ImgclsError - to every rank,
    so a refusal (bad folder, full disk) stops all processes with the same message."""
    out, err = None, None
    if ctx.is_main:
        try:
            out = fn()
        except ImgclsError as exc:
            err = (exc.message, exc.hint)
    out, err = D.broadcast_object((out, err), ctx)
    if err:
        raise ImgclsError(*err)
    return out


def _train(cfg: TrainConfig, ctx: D.DistContext, progress: bool, resume: Path | None) -> TrainResult:
    if cfg.deterministic:
        set_deterministic(cfg.seed)
    ckpt = _on_rank0(ctx, lambda: load_checkpoint(resume / CHECKPOINT)) if resume is not None else None
    if cfg.log:  # a typo in --log should fail before anything is trained or written
        from imgcls.engine.loggers import parse_log

        parse_log(cfg.log)
    data = load_data(cfg.data, val_split=cfg.val_split, seed=cfg.seed, classes=cfg.classes)
    if resume is None:  # a resumed run keeps the values its config.yaml already holds
        cfg = resolve_recipe(cfg, recipe_context(cfg, data))
    arch, model_kwargs = model_from_config(cfg.model)  # a layer list is checked when built, before training
    clf, in_chans, img_size = _new_classifier(cfg, data, arch, model_kwargs)
    clf.preprocessing = dataclasses.replace(clf.preprocessing, intensity=cfg.intensity, bit_depth=cfg.bit_depth,
                                            frames=cfg.frames)  # decode settings travel in model.json
    resolved = cfg.model_copy(update={"img_size": img_size, "in_chans": in_chans})

    def make_run_dir() -> str:
        run_dir = resume if resume is not None else next_run_dir(cfg.out, cfg.name)
        try:
            run_dir.mkdir(parents=True, exist_ok=bool(cfg.name) or resume is not None)
        except OSError as exc:
            raise ImgclsError(f"cannot create run folder {run_dir}: {exc.strerror}", "choose another --out") from None
        preflight_run_dir(run_dir, clf.model)  # unwritable or full: fail now, not after hours of training
        if resume is None:
            resolved.to_yaml(run_dir / "config.yaml")
        return str(run_dir)

    run_dir = Path(_on_rank0(ctx, make_run_dir))
    summary = clf.fit(data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                      weight_decay=cfg.weight_decay, momentum=cfg.momentum, schedule=cfg.schedule,
                      warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing, augment=cfg.augment,
                      hflip=cfg.hflip, patience=cfg.patience, val_split=cfg.val_split, seed=cfg.seed,
                      device=cfg.device, precision=cfg.precision, workers=cfg.workers, run_dir=run_dir,
                      progress=progress, deterministic=cfg.deterministic, checkpoint_every=cfg.checkpoint_every,
                      resume=ckpt, strict=cfg.strict, balance=cfg.balance, cache=cfg.cache,
                      freeze=cfg.freeze, unfreeze_at=cfg.unfreeze_at, unfreeze=cfg.unfreeze,
                      backbone_lr=cfg.backbone_lr, layer_decay=cfg.layer_decay, feature_cache=cfg.feature_cache,
                      log=cfg.log, mixup=cfg.mixup, cutmix=cfg.cutmix, randaugment=cfg.randaugment, ema=cfg.ema,
                      tta=cfg.tta, compile=cfg.compile, threads=cfg.threads, lookahead=cfg.lookahead)
    summary["recipe"] = cfg.recipe
    if not ctx.is_main:
        return TrainResult(run_dir=run_dir, classifier=clf, metrics={}, summary=summary)
    # unreadable files were reported by fit already
    metrics = clf.evaluate(data, device=str(ctx.device) if ctx.enabled else cfg.device, precision=cfg.precision,
                           cache=cfg.cache, announce=False)
    clf.card["metrics"] = {"best_val": summary["best"], metrics["split"]: _headline(metrics)}
    clf.save(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps({"training": summary, "evaluation": metrics}, indent=2) + "\n")
    return TrainResult(run_dir=run_dir, classifier=clf, metrics=metrics, summary=summary)


def _new_classifier(cfg: TrainConfig, data: ImageData, arch: str | None = None,
                    model_kwargs: dict[str, Any] | None = None) -> tuple[Classifier, int, int]:
    """A fresh or pretrained classifier for a training config; returns it with its in_chans and img_size."""
    if arch is None:
        arch, model_kwargs = model_from_config(cfg.model)
    model_kwargs = model_kwargs or {}
    defaults = MODEL_DEFAULTS.get(arch, {})
    in_chans = cfg.in_chans or data.channels
    if cfg.pretrained or cfg.weights:
        clf = Classifier.from_pretrained(arch, classes=data.classes, weights=cfg.weights, in_chans=in_chans,
                                         img_size=cfg.img_size, seed=cfg.seed, **model_kwargs)
        return clf, in_chans, clf.preprocessing.img_size
    img_size = cfg.img_size or (data.native_size if data.train.in_memory else None) or defaults.get("img_size", 224)
    clf = Classifier.create(arch, classes=data.classes, in_chans=in_chans, img_size=img_size, seed=cfg.seed,
                            **model_kwargs)
    return clf, in_chans, img_size


def recipe_context(cfg: TrainConfig, data: ImageData) -> RecipeContext:
    return RecipeContext(kind=data.kind, num_train=len(data.train) if data.train is not None else 0,
                         in_memory=bool(data.train is not None and data.train.in_memory),
                         device_type=resolve_device(cfg.device).type)


def find_lr(config: TrainConfig | dict[str, Any], steps: int = 100, start_lr: float = 1e-7,
            end_lr: float = 10.0) -> tuple[LRFindResult, TrainConfig]:
    """What ``imgcls lr-find`` does: the model and data of a training config (recipe
    resolved), then the learning-rate range test. Returns the result and resolved config."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not cfg.data:
        raise ImgclsError("no data given", "pass --data FOLDER|FILE.npz|NAME (e.g. --data digits)")
    data = load_data(cfg.data, val_split=cfg.val_split, seed=cfg.seed, classes=cfg.classes)
    cfg = resolve_recipe(cfg, recipe_context(cfg, data))
    clf, _, _ = _new_classifier(cfg, data)
    res = clf.find_lr(data, batch_size=cfg.batch_size, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                      momentum=cfg.momentum, label_smoothing=cfg.label_smoothing, augment=cfg.augment,
                      hflip=cfg.hflip, val_split=cfg.val_split, seed=cfg.seed, device=cfg.device,
                      precision=cfg.precision, workers=cfg.workers, threads=cfg.threads, steps=steps,
                      start_lr=start_lr, end_lr=end_lr)
    return res, cfg


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k in ("accuracy", "loss", "num_images", "top3_accuracy",
                                                 "top5_accuracy", "macro_avg")}
