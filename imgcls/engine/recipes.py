"""Recipes: named presets of TrainConfig values, chosen per data kind and device.

A recipe fills only the fields the user did not give (pydantic's ``model_fields_set``), so
``--recipe fast --epochs 5`` is the fast recipe with five epochs. A batch size given without
a learning rate moves the recipe's rate with it (:func:`scale_lr`), and epochs given without a
warm-up keep the recipe's warm-up share of the run. The resolved values, the
recipe's name included, are what a run saves in ``config.yaml``; loading that file back
reproduces the run without consulting the registry again.

Register your own with ``@RECIPES.register("name")`` on a function
``(ctx: RecipeContext) -> dict`` of TrainConfig field values; add its name to the
``recipe`` Literal in config.py to expose it as a flag value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from imgcls.registry import Registry

RECIPES: Registry = Registry("recipe")

# auto picks "fast" for small images in memory (or streamed from shards of decoded pixels)
# with at least this many training images;
# below it the plain defaults (a handful of images trains in seconds either way).
AUTO_FAST_MIN_IMAGES = 5000

# fast, digits: train about this many samples, whatever the set's size - one epoch of MNIST's
# 54,000 training images, ten of a 5,000-image set (docs/benchmarks.md, "one epoch of MNIST")
DIGITS_FAST_SAMPLES = 50_000


# transfer: the input side for photos smaller than the pretrained input is this multiple of
# their own side (rounded up to 32 px, at least TRANSFER_MIN_SIDE): signdigits' 100 px photos,
# Lite0 linear probe (docs/bench-transfer.md): 128 px 94.0%, 160 px 95.0%, 224 px 95.7% at
# 1 : 1.6 : 3.2 of the feature-extraction time
TRANSFER_UPSCALE = 1.6
TRANSFER_MIN_SIDE = 96


@dataclass
class RecipeContext:
    kind: str  # "digits", "small-colour", "photos" (ImageData.kind)
    num_train: int
    in_memory: bool
    device_type: str  # "cpu", "cuda", "mps"
    pretrained: bool = False  # --pretrained / --weights
    image_side: int | None = None  # typical (median) shorter side of the training images
    # streamed from shards of decoded pixels (`imgcls shard --resize`): no decoding per epoch,
    # so the stream keeps up with the fast recipe's step like memory does (docs/benchmarks.md)
    raw_stream: bool = False
    pretrained_side: int = 224  # the input side the pretrained weights were trained at
    fixed_side: bool = False  # the architecture takes only that side (ViT, Swin)


@RECIPES.register("default")
def default_recipe(ctx: RecipeContext) -> dict[str, Any]:
    """The TrainConfig defaults, unchanged: Adam 3e-3 one-cycle, batch 128, 3 epochs."""
    return {}


@RECIPES.register("reference")
def reference_recipe(ctx: RecipeContext) -> dict[str, Any]:
    """The classic Keras MNIST training, for side-by-side comparisons: the reference CNN,
    Adam at Keras' default 1e-3, batch 32, 10 epochs, constant rate, no augmentation, fp32."""
    return {"model": "reference_cnn", "epochs": 10, "batch_size": 32, "lr": 1e-3, "optimizer": "adam",
            "schedule": "constant", "warmup_epochs": 0.0, "augment": "none", "precision": "fp32",
            "label_smoothing": 0.0}


@RECIPES.register("fast")
def fast_recipe(ctx: RecipeContext) -> dict[str, Any]:
    """Shortest time to a good accuracy.

    digits: the reference CNN, Adam 1e-2 one-cycle at batch 128, label smoothing 0.1, light
    shifts, for about 50,000 samples (one epoch of MNIST);
    small colour images: the airbench network with its hyper-parameters (Nesterov SGD,
    momentum 0.85, label smoothing 0.2, linear warm-up/decay, alternating flips, lookahead,
    flip + shift TTA; 12 epochs at batch 512 on a CPU, 10 at 1024 on a GPU, the learning
    rate scaled with the batch);
    photos: one-cycle AdamW, 5 epochs, photo augmentation.
    """
    if ctx.kind == "digits":
        # MNIST on 2 AVX2 cores (2026-12-07, docs/benchmarks.md "One epoch of MNIST"): this, one
        # epoch, 99.10-99.21% test over 5 seeds (mean 99.16%) in ~10.4 s of training; the earlier
        # 2 epochs at 3e-3 without smoothing: 99.10% in 21 s, one epoch of it 98.79%; batch 64
        # at 6e-3 as accurate (99.00-99.25%) but 15% slower a sample, batch 256 below 99.1%
        epochs = max(1, math.ceil(DIGITS_FAST_SAMPLES / max(ctx.num_train, 1)))
        return {"model": "reference_cnn", "epochs": epochs, "batch_size": 128, "lr": 1e-2, "optimizer": "adam",
                "schedule": "onecycle", "warmup_epochs": round(0.3 * epochs, 2), "augment": "light",
                "label_smoothing": 0.1}
    if ctx.kind == "small-colour":
        # airbench94 trains 9.9 epochs at batch 1024; on a CPU (batch 512, bf16) 10 epochs gave
        # 93.98% CIFAR-10 test accuracy (docs/bench-speed.md), so it trains 12 there (~19 min on
        # 2 cores); warm-up stays 23% of the run
        gpu = ctx.device_type == "cuda"
        batch, epochs = (1024, 10) if gpu else (512, 12)
        return {"model": "airbench", "epochs": epochs, "batch_size": batch, **_airbench_sgd(batch),
                "schedule": "linear", "warmup_epochs": round(0.23 * epochs, 2), "label_smoothing": 0.2,
                "augment": "light", "hflip": True, "tta": "flip-shift", "lookahead": True}
    return {"epochs": 5, "batch_size": 64, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05,
            "schedule": "onecycle", "augment": "photo"}


@RECIPES.register("accurate")
def accurate_recipe(ctx: RecipeContext) -> dict[str, Any]:
    """Higher accuracy for more time: a stronger network or more epochs, EMA of weights,
    and (natural images) RandAugment + mixup/cutmix from timm."""
    if ctx.kind == "digits":
        return {"model": "airbench_small", "epochs": 4, "batch_size": 256, **_airbench_sgd(256),
                "schedule": "linear", "warmup_epochs": 0.8, "label_smoothing": 0.1, "augment": "light",
                "hflip": False, "tta": "none"}
    if ctx.kind == "small-colour":
        batch = 1024 if ctx.device_type == "cuda" else 512
        return {"model": "airbench", "epochs": 30, "batch_size": batch, **_airbench_sgd(batch),
                "schedule": "linear", "warmup_epochs": 6.0, "label_smoothing": 0.2, "augment": "standard",
                "hflip": True, "tta": "flip-shift", "lookahead": True}
    return {"epochs": 30, "batch_size": 64, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05,
            "schedule": "cosine", "warmup_epochs": 2.0, "augment": "photo", "label_smoothing": 0.1,
            "randaugment": "rand-m9-mstd0.5", "mixup": 0.2, "cutmix": 1.0, "ema": 0.999, "tta": "flip"}


@RECIPES.register("transfer")
def transfer_recipe(ctx: RecipeContext) -> dict[str, Any]:
    """A pretrained backbone: the linear probe on cached features - the frozen backbone runs
    once over the training images and their mirror images, then only the classifier trains
    (Adam 3e-3 one-cycle, 20 epochs of seconds) - at an input side chosen from the data.
    Full fine-tuning on a CPU was slower and less accurate on every set measured
    (docs/bench-transfer.md); give --freeze none (or --recipe default) for it."""
    return {"freeze": "backbone", "feature_cache": "auto", "epochs": 20, "batch_size": 128, "lr": 3e-3,
            "optimizer": "adam", "schedule": "onecycle", "warmup_epochs": 0.3, "img_size": transfer_side(ctx),
            "finetune_top": "auto"}


def transfer_side(ctx: RecipeContext) -> int:
    """The pretrained side, or less for smaller photos: TRANSFER_UPSCALE x their side,
    rounded up to 32 px. Architectures with a fixed input keep theirs."""
    side = ctx.pretrained_side
    if ctx.fixed_side or not ctx.image_side or ctx.image_side >= side:
        return side
    scaled = -(-int(ctx.image_side * TRANSFER_UPSCALE) // 32) * 32
    return max(TRANSFER_MIN_SIDE, min(side, scaled))


def explain_choice(name: str, ctx: RecipeContext, cfg) -> str:
    """One line: what the recipe does with this data, for the start of training and config.yaml."""
    images = f"{ctx.num_train:,} training images"
    if name == "transfer":
        if cfg.freeze == "backbone" and cfg.unfreeze_at is None and cfg.feature_cache != "off":
            what = "linear probe on cached features (with mirror images)" if cfg.hflip is not False \
                else "linear probe on cached features"
            if cfg.finetune_top == "auto":
                what += ", then the top blocks where they pay"
        else:
            what = "fine-tuning the pretrained network"
        seen = f", photos ~{ctx.image_side} px" if ctx.image_side else ""
        return f"{what}: {images}, pretrained backbone, {cfg.img_size} px input{seen}"
    epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    if name == "fast":
        where = "streamed as decoded pixels" if ctx.raw_stream and not ctx.in_memory else "held in memory"
        return f"fast: {images} {where} ({ctx.kind}), {epochs} of {cfg.model}"
    return f"{name}: {images} ({ctx.kind}), {epochs}"


def _airbench_sgd(batch_size: int) -> dict[str, Any]:
    """airbench94's optimiser for a mean (not summed) loss: its lr 11.5 and decay 0.0153
    'per 1024 examples' with momentum 0.85 come out as lr = 1.5 * batch/1024 and a
    PyTorch weight decay of 0.0153/11.5, independent of the batch size."""
    return {"optimizer": "sgd", "momentum": 0.85, "lr": round(1.5 * batch_size / 1024, 5),
            "weight_decay": round(0.0153 / 11.5, 6)}


def choose_recipe(ctx: RecipeContext) -> str:
    if ctx.pretrained:
        return "transfer"
    if (ctx.in_memory or ctx.raw_stream) and ctx.kind in ("digits", "small-colour") \
            and ctx.num_train >= AUTO_FAST_MIN_IMAGES:
        return "fast"
    return "default"


def resolve_recipe(cfg, ctx: RecipeContext):
    """A copy of ``cfg`` (TrainConfig) with the recipe's values in every field the user did
    not set, ``recipe`` set to the concrete name (never 'auto') and ``recipe_choice`` to the
    one-line explanation (:func:`explain_choice`)."""
    auto = cfg.recipe == "auto"
    name = choose_recipe(ctx) if auto else cfg.recipe
    explicit = cfg.model_fields_set
    if auto and name == "transfer" and (cfg.freeze == "none" and "freeze" in explicit or cfg.unfreeze_at):
        name = "default"  # the user asked for the backbone to train: full fine-tuning, as before
    values = RECIPES.get(name)(ctx)
    update = {k: v for k, v in values.items() if k not in explicit}
    if "batch_size" in explicit and "lr" in update and "batch_size" in values:
        update["lr"] = scale_lr(update["lr"], values["batch_size"], cfg.batch_size,
                                update.get("optimizer", cfg.optimizer))
    if "epochs" in explicit and "warmup_epochs" in update and values.get("epochs"):
        # the warm-up keeps its share of the run: airbench's 23%, the digits' 30%; a --epochs
        # below a warm-up counted in the recipe's epochs would otherwise never decay the rate
        update["warmup_epochs"] = round(update["warmup_epochs"] * cfg.epochs / values["epochs"], 3)
    out = cfg.model_copy(update={**update, "recipe": name})
    line = f"recipe {'auto → ' if auto else ''}{explain_choice(name, ctx, out)}"
    return out.model_copy(update={"recipe_choice": line})


def scale_lr(lr: float, from_batch: int, to_batch: int, optimizer: str) -> float:
    """The recipe's rate moved to another batch size: linearly for SGD (Goyal et al. 2017),
    by the square root for Adam-type optimisers (Malladi et al. 2022)."""
    ratio = to_batch / from_batch
    return float(f"{lr * (ratio if optimizer == 'sgd' else ratio ** 0.5):.4g}")
