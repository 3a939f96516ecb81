"""The transfer recipe's second stage: after the linear probe, a short low-learning-rate
fine-tune of the network's top blocks - on cached activations, and kept only where it
pays on the validation split.

fastai's ``fine_tune`` trains the head on a frozen backbone, then unfreezes with
discriminative rates. On a 2-core CPU a full backward pass of even a small network costs
~15x the probe (docs/bench-transfer.md), so this stage cuts the network at a block boundary
instead: the frozen bottom runs once over the training images (and their mirror images)
and the validation images, its output is kept, and only the top blocks + the head train on
it - on the ordinary :class:`~imgcls.engine.trainer.Trainer`, like the probe. BatchNorm
in the top blocks keeps its pretrained statistics (a few hundred images would make worse
ones); its affine weights train.

The cut needs to know how a family's ``forward_features`` runs, so it is written for the
families with that structure: timm's EfficientNet (incl. Lite), MobileNetV3 and ResNet.
Other models skip the stage with a one-line reason (the probe's result stands).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from imgcls.data.loaders import Batches
from imgcls.data.records import Split
from imgcls.data.transforms import Preprocessing
from imgcls.engine.callbacks import BestModel, Callback, TrainState
from imgcls.engine.device import autocast, chunked
from imgcls.engine.finetune import _bn_eval_hook, _is_bn
from imgcls.engine.trainer import Trainer

# activations cached for the stage at most (bytes; float16): beyond it the stage is skipped
MAX_CACHE_BYTES = 3 * 2**30
# training images above which the stage is skipped: with this many images the probe's
# features are already strong and one epoch of the top blocks costs minutes on a CPU
MAX_TRAIN_IMAGES = 20_000
# the probe's validation accuracy from which nothing is left to gain
MAX_PROBE_ACC = 0.995
# What trains, and how: the last block group + the head, 4 one-cycle epochs of Adam at 1e-3 for
# both. Chosen on a grid over the two photo sets of docs/bench-transfer.md (1-2 block groups,
# 3-6 epochs, lr 3e-4-2e-3, block rate 0.1-1x the head's): on signdigits every setting beat the
# probe (95.0% -> 96.4-98.8%), on hymenoptera none did (the probe is kept); two block groups cost
# 10x the time (depthwise convolutions at 14x14) for no gain.
TOP_BLOCKS, TOP_EPOCHS, TOP_LR, TOP_BLOCK_LR = 1, 4, 1e-3, 1.0


@dataclass
class TopSplit:
    """A network cut into a frozen ``bottom`` (image -> activation) and a trainable ``top``
    (activation -> logits) at a block boundary; ``top(bottom(x)) == model(x)``."""

    model: nn.Module
    bottom: Callable[[torch.Tensor], torch.Tensor]
    top: nn.Module
    name: str  # what trains, e.g. "blocks.5-6, conv_head, classifier"


class _Top(nn.Module):
    """The top blocks and the head, as one module for the Trainer (the parameters are the
    model's own objects: training this trains the model)."""

    def __init__(self, blocks: list[nn.Module], tail: Callable[..., torch.Tensor], head_modules: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head_modules = nn.ModuleList(head_modules)  # registered so the optimizer sees them
        self._tail = tail  # (h, pre_logits) -> logits or the classifier's input features

    def forward(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        for b in self.blocks:
            h = b(h)
        return self._tail(h, pre_logits)


def split_top(model: nn.Module, n_blocks: int = TOP_BLOCKS) -> TopSplit | None:
    """Cut ``model`` before its last ``n_blocks`` block groups, or None for a family this
    does not know (see the module docstring)."""
    kind = type(model).__name__
    if kind == "EfficientNet" and all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        blocks = list(model.blocks)
        n = max(1, min(n_blocks, len(blocks) - 1))
        bottom_blocks = nn.Sequential(*blocks[:-n])

        def bottom(x: torch.Tensor) -> torch.Tensor:
            return bottom_blocks(model.bn1(model.conv_stem(x)))

        def tail(h: torch.Tensor, pre_logits: bool) -> torch.Tensor:
            return model.forward_head(model.bn2(model.conv_head(h)), pre_logits=pre_logits)

        top = _Top(blocks[-n:], tail, [model.conv_head, model.bn2, model.get_classifier()])
        first = len(blocks) - n
        return TopSplit(model, bottom, top, f"blocks.{first}-{len(blocks) - 1}, conv_head, classifier")
    if kind == "MobileNetV3" and all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks")):
        blocks = list(model.blocks)
        n = max(1, min(n_blocks, len(blocks) - 1))
        bottom_blocks = nn.Sequential(*blocks[:-n])

        def bottom(x: torch.Tensor) -> torch.Tensor:
            return bottom_blocks(model.bn1(model.conv_stem(x)))

        head = [m for m in (getattr(model, "conv_head", None), getattr(model, "norm_head", None),
                            model.get_classifier()) if isinstance(m, nn.Module)]
        top = _Top(blocks[-n:], lambda h, pre_logits: model.forward_head(h, pre_logits=pre_logits), head)
        first = len(blocks) - n
        return TopSplit(model, bottom, top, f"blocks.{first}-{len(blocks) - 1}, head")
    if kind == "ResNet" and all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        n = max(1, min(n_blocks, 3))

        def bottom(x: torch.Tensor) -> torch.Tensor:
            x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
            for layer in layers[:-n]:
                x = layer(x)
            return x

        top = _Top(layers[-n:], lambda h, pre_logits: model.forward_head(h, pre_logits=pre_logits),
                   [model.get_classifier()])
        return TopSplit(model, bottom, top, f"layer{5 - n}-4, fc")
    return None


@torch.no_grad()
def cache_activations(split: TopSplit, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], pre: Preprocessing,
                      device: torch.device, amp_dtype: torch.dtype | None, flip: bool = False,
                      channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The bottom's output for every image (and, with ``flip``, its mirror image), kept as
    float16 on the CPU (half the memory; the top computes in the run's precision)."""
    split.model.eval()
    acts, labels = [], []
    for x, y in batches:
        x = pre.normalize(x.to(device, non_blocking=device.type == "cuda"), channels_last)
        for v in ((x, x.flip(-1)) if flip else (x,)):
            with autocast(device, amp_dtype):  # each chunk to half precision on the CPU as it comes
                acts.append(chunked(lambda c: split.bottom(c).to("cpu", torch.float16), v, device))
            labels.append(y.cpu())
    return torch.cat(acts), torch.cat(labels)


@torch.no_grad()
def top_features(split: TopSplit, acts: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None,
                 batch_size: int = 256) -> torch.Tensor:
    """What the classifier sees (float32, on ``device``) for cached activations: the probe
    trains on these, so the stage's cache costs no second pass of the bottom."""
    split.model.eval()
    out = []
    for i in range(0, len(acts), batch_size):
        h = acts[i:i + batch_size].to(device).float()
        with autocast(device, amp_dtype):
            out.append(split.top(h, pre_logits=True).float().flatten(1))
    return torch.cat(out) if out else torch.empty(0, 0, device=device)


@dataclass
class TopStageResult:
    kept: bool
    why: str  # one line: what happened
    probe_val_acc: float
    val_acc: float | None = None
    state: TrainState | None = None
    train_s: float = 0.0
    blocks: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "why": self.why, "probe_val_acc": self.probe_val_acc, "val_acc": self.val_acc,
                "train_s": round(self.train_s, 2), "blocks": self.blocks}


def plan_top_stage(model: nn.Module, pre: Preprocessing, device: torch.device, amp_dtype: torch.dtype | None,
                   num_train: int, has_val: bool, multi_label: bool, views: int = 2,
                   channels_last: bool = True) -> tuple[TopSplit | None, str]:
    """Whether the stage can pay here, decided before the probe's pass over the images
    (which then keeps the activations): (the split, "") or (None, why it is skipped)."""
    if not has_val:
        return None, "no validation split to tell whether it pays"
    if multi_label:
        return None, "multi-label runs keep the probe"
    if num_train > MAX_TRAIN_IMAGES:
        return None, f"{num_train:,} training images: the probe's features suffice and an epoch would take minutes"
    split = split_top(model)
    if split is None:
        return None, f"not available for {type(model).__name__} (EfficientNet, MobileNetV3 and ResNet only)"
    need = _activation_bytes(split, pre, device, amp_dtype, channels_last) * num_train * views
    if need > MAX_CACHE_BYTES:
        return None, f"its cached activations would take {need / 2**30:.1f} GB"
    return split, ""


def fit_top_cached(split: TopSplit, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                   settings: Any, device: torch.device, amp_dtype: torch.dtype | None, probe_val_acc: float,
                   batch_size: int = 64, epochs: int = TOP_EPOCHS, lr: float = TOP_LR, block_lr: float = TOP_BLOCK_LR,
                   callbacks: list[Callback] | None = None, class_weights: torch.Tensor | None = None,
                   log: Callable[[str], None] | None = None) -> TopStageResult:
    """Fine-tune the top blocks (at ``lr * block_lr``) and the head (at ``lr``) for ``epochs``
    on cached bottom activations (``train`` / ``val``: activations and labels); keep the
    weights only if the best validation accuracy beats the probe's, else put the probe's
    weights back."""
    say = log or (lambda _m: None)
    if probe_val_acc >= MAX_PROBE_ACC:
        return TopStageResult(False, f"skipped: the probe already reaches {probe_val_acc:.1%} validation accuracy",
                              probe_val_acc, blocks=split.name)
    (x_tr, y_tr), (x_va, y_va) = train, val
    say(f"top-block fine-tune: {split.name} on the cached activations of {len(x_tr):,} views, {epochs} epochs")
    before = copy.deepcopy({k: v.detach().cpu() for k, v in split.top.state_dict().items()})
    hooks = [m.register_forward_pre_hook(_bn_eval_hook) for m in split.top.modules() if _is_bn(m)]
    for p in split.top.parameters():
        p.requires_grad_(True)
    head_ids = {id(p) for p in split.model.get_classifier().parameters()}
    body = [p for p in split.top.parameters() if id(p) not in head_ids]
    head = [p for p in split.top.parameters() if id(p) in head_ids]
    groups = [{"params": body, "lr": lr * block_lr, "name": "top_blocks"}, {"params": head, "lr": lr, "name": "head"}]
    s = replace(settings, epochs=epochs, lr=lr, mixup=0.0, cutmix=0.0, compile=False, warmup_epochs=0.5,
                schedule="onecycle")
    batches = Batches(Split(labels=y_tr, images=x_tr), max(1, min(batch_size, len(x_tr))), shuffle=True,
                      seed=s.seed, drop_last=len(x_tr) > batch_size)
    val_batches = Batches(Split(labels=y_va, images=x_va), 256)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(_Float(split.top), None, s, device, amp_dtype, callbacks=[BestModel(), *(callbacks or [])],
                          class_weights=class_weights, param_groups=groups)
        state = trainer.fit(batches, val_batches)
    finally:
        for h in hooks:
            h.remove()
    train_s = time.perf_counter() - t0
    acc = float(state.best.get("val_acc", 0.0))
    if acc > probe_val_acc:
        why = f"kept: validation accuracy {probe_val_acc:.2%} -> {acc:.2%} ({train_s:.1f}s)"
        say(f"top-block fine-tune: {why}")
        return TopStageResult(True, why, probe_val_acc, acc, state, train_s, split.name)
    split.top.load_state_dict(before)
    why = f"not kept: {acc:.2%} validation accuracy, the probe had {probe_val_acc:.2%} ({train_s:.1f}s)"
    say(f"top-block fine-tune: {why}")
    return TopStageResult(False, why, probe_val_acc, acc, state, train_s, split.name)


class _Float(nn.Module):
    """Cached float16 activations in, the top's computation in the run's precision."""

    def __init__(self, top: nn.Module):
        super().__init__()
        self.top = top

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.top(h.float())


@torch.no_grad()
def _activation_bytes(split: TopSplit, pre: Preprocessing, device: torch.device, amp_dtype: torch.dtype | None,
                      channels_last: bool) -> int:
    """float16 bytes of one image's cached activation (one dummy forward of the bottom)."""
    split.model.eval()
    x = torch.zeros(1, pre.in_chans, pre.img_size, pre.img_size, dtype=torch.uint8, device=device)
    with autocast(device, amp_dtype):
        h = split.bottom(pre.normalize(x, channels_last))
    return int(h.numel()) * 2
