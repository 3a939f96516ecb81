"""Fine-tuning a pretrained network: freezing, BatchNorm kept in eval mode while frozen,
discriminative (per-stage) learning rates, gradual unfreezing, and the feature cache
that trains a linear probe on backbone features computed once.

"Backbone" is everything but the final classifier (``model.get_classifier()``, the
timm interface that imgcls' own models share). Stages come from timm's
``group_matcher(coarse=True)`` (stem, blocks..., head-conv), so the same code serves
ResNets, EfficientNets, ConvNeXts and ViTs; other models fall back to their top-level
children.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from imgcls.data.loaders import Batches
from imgcls.data.records import Split
from imgcls.data.transforms import Preprocessing
from imgcls.engine.callbacks import Callback, TrainState
from imgcls.engine.device import autocast, chunked
from imgcls.engine.trainer import Trainer
from imgcls.errors import ImgclsError


# ---------------------------------------------------------------------- parts of a model
def head_params(model: nn.Module) -> list[nn.Parameter]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise ImgclsError(f"{type(model).__name__} has no separate classifier layer to keep trainable",
                          "use a timm architecture, reference_cnn or a layer list ending in a dense layer")
    return list(head.parameters())


def backbone_stages(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Backbone parameters in stages, input side first (the head's are left out)."""
    head_ids = {id(p) for p in head_params(model)}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
    groups: dict[int, list[tuple[str, nn.Parameter]]] = {}
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        layer_of = group_parameters(model, matcher(coarse=True), reverse=True)  # name -> stage id
        for n, p in named:
            groups.setdefault(int(layer_of.get(n, max(layer_of.values(), default=0))), []).append((n, p))
    else:
        order: dict[str, int] = {}
        for n, p in named:
            top = n.split(".")[0]
            groups.setdefault(order.setdefault(top, len(order)), []).append((n, p))
    return [groups[k] for k in sorted(groups)]


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _bn_eval_hook(module: nn.Module, _args: Any) -> None:
    # A frozen BatchNorm must normalise with its pretrained running statistics and not
    # update them, whatever model.train() said; a forward pre-hook does that without
    # replacing modules (which would orphan the parameters the optimizer holds).
    module.training = False


class Freezer:
    """Freezes / unfreezes backbone stages in place: requires_grad off and BatchNorm in
    eval mode for frozen ones. Parameters stay the same objects, so one optimizer built
    over all of them keeps working while stages are unfrozen."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stages = backbone_stages(model)
        self._hooks: dict[int, list[Any]] = {}
        self.frozen: set[int] = set()

    def _bn_modules(self, stage: int) -> list[nn.Module]:
        names = {n.rsplit(".", 1)[0] for n, _ in self.stages[stage]}
        return [m for n, m in self.model.named_modules() if n in names and _is_bn(m)]

    def freeze(self, stages: Iterable[int] | None = None) -> None:
        for i in (range(len(self.stages)) if stages is None else stages):
            if i in self.frozen:
                continue
            for _, p in self.stages[i]:
                p.requires_grad_(False)
            self._hooks[i] = [m.register_forward_pre_hook(_bn_eval_hook) for m in self._bn_modules(i)]
            self.frozen.add(i)

    def unfreeze(self, stages: Iterable[int]) -> list[int]:
        done = []
        for i in stages:
            if i not in self.frozen:
                continue
            for _, p in self.stages[i]:
                p.requires_grad_(True)
            for h in self._hooks.pop(i, []):
                h.remove()
            self.frozen.discard(i)
            done.append(i)
        return done

    def unfreeze_top(self, n: int) -> list[int]:
        """Unfreeze the top ``n`` stages (output side), the ULMFiT order."""
        top = list(range(len(self.stages)))[::-1][:max(0, n)]
        return self.unfreeze(top)

    def release(self) -> None:
        """Drop every hook and make all parameters trainable again (after training)."""
        self.unfreeze(sorted(self.frozen))

    def stage_name(self, i: int) -> str:
        first = self.stages[i][0][0]
        return first.rsplit(".", 1)[0]


# ---------------------------------------------------------------------- learning rates
def finetune_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, backbone_lr: float = 1.0,
                          layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: the head at ``lr``, the backbone at ``lr * backbone_lr``, and with
    ``layer_decay`` each stage below the top another factor lower (discriminative learning
    rates, fastai's slice(lo, hi) / BEiT's layer decay). Every parameter is included, frozen
    or not, so gradual unfreezing needs no new optimizer (frozen ones get no gradient and
    are skipped by the optimizer). No weight decay on biases and norm weights."""
    stages = backbone_stages(model)
    n = len(stages)
    groups: list[dict[str, Any]] = []

    def add(params: list[tuple[str, nn.Parameter]], scale: float, name: str) -> None:
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        for ps, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "_no_decay")):
            if ps:
                groups.append({"params": ps, "lr": lr * scale, "weight_decay": wd, "name": name + suffix,
                               "lr_scale": scale})

    for i, stage in enumerate(stages):
        depth = n - 1 - i  # 0 for the stage next to the head
        scale = backbone_lr * (layer_decay ** depth if layer_decay else 1.0)
        add(stage, scale, f"backbone_{i}")
    head_ids = {id(p) for p in head_params(model)}
    add([(n_, p) for n_, p in model.named_parameters() if id(p) in head_ids], 1.0, "head")
    return groups


# ---------------------------------------------------------------------- gradual unfreezing
class GradualUnfreeze(Callback):
    """From epoch ``start`` on, unfreeze the backbone from the top: one more stage per
    epoch (``all_at_once=False``, ULMFiT) or everything at once (fastai's fine_tune)."""

    def __init__(self, freezer: Freezer, start: int, all_at_once: bool = False,
                 log: Callable[[str], None] | None = None):
        self.freezer, self.start, self.all_at_once, self.log = freezer, start, all_at_once, log

    def on_epoch_start(self, state: TrainState) -> None:
        if state.epoch < self.start or not self.freezer.frozen:
            return
        n = len(self.freezer.stages) if self.all_at_once else state.epoch - self.start + 1
        done = self.freezer.unfreeze_top(n)
        if done and self.log:
            names = ", ".join(self.freezer.stage_name(i) for i in sorted(done))
            left = len(self.freezer.frozen)
            self.log(f"epoch {state.epoch}: unfroze {names} ({left} backbone stage(s) still frozen)")


# ---------------------------------------------------------------------- feature cache
@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], pre: Preprocessing,
                     device: torch.device, amp_dtype: torch.dtype | None, flip: bool = False,
                     channels_last: bool = True, on_batch: Callable[[int], None] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits features (what the classifier sees) of every image, computed once.

    ``batches`` is any iterable of uint8 ``(N, C, H, W)`` image batches with labels
    (a :class:`~imgcls.data.loaders.Batches`, or a decode-once cache). With ``flip`` each
    image also yields the features of its mirror image, a second "view" for training.
    Returns float32 features ``(N * views, D)`` on ``device`` and labels.
    """
    model.eval()
    feats, labels = [], []
    for x, y in batches:
        x = pre.normalize(x.to(device, non_blocking=device.type == "cuda"), channels_last)
        views = (x, x.flip(-1)) if flip else (x,)
        for v in views:
            with autocast(device, amp_dtype):
                f = chunked(lambda c: model.forward_head(model.forward_features(c), pre_logits=True), v, device)
            feats.append(f.float().flatten(1))
            labels.append(y.to(device))
        if on_batch is not None:
            on_batch(len(y))
    if not feats:
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


@dataclass
class CachedHeadResult:
    state: TrainState
    extract_s: float
    head_s: float
    views: int
    feature_dim: int
    notes: list[str] = field(default_factory=list)
    # with a top split: the cached activations below the top blocks, ((train, labels), (val, labels)),
    # for the transfer recipe's second stage (engine/finetune_top.py)
    activations: tuple | None = None
    top_stage: Any = None  # its TopStageResult, when it ran


class FeatureDropout:
    """The classifier's own dropout, which the cached features skipped, applied to each
    batch of features with the trainer's generator (so it is reproducible and resumable)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        keep = (torch.rand(x.shape, generator=gen) >= self.p).to(x.device)
        return x * keep / (1.0 - self.p)


def fit_head_cached(model: nn.Module, train: Iterable, val: Iterable | None, pre: Preprocessing, settings: Any,
                    device: torch.device, amp_dtype: torch.dtype | None, callbacks: list[Callback],
                    batch_size: int = 128, flip: bool = True, log: Callable[[str], None] | None = None,
                    channels_last: bool = True, class_weights: torch.Tensor | None = None,
                    split: Any = None) -> CachedHeadResult:
    """Linear probe on cached features: the frozen backbone runs once over the training
    (and validation) images, then only the classifier trains - on the ordinary
    :class:`~imgcls.engine.trainer.Trainer`, with its optimizer, schedule and callbacks,
    over batches of feature vectors - for ``settings.epochs`` epochs. With ``split`` (a
    :class:`~imgcls.engine.finetune_top.TopSplit`) the pass keeps the activations below the
    top blocks too, and the features are computed from them (one pass for both stages)."""
    say = log or (lambda _m: None)
    model.to(device)
    t0 = time.perf_counter()
    say("feature cache: running the frozen backbone once over the training images"
        + (" and their mirror images" if flip else "") + (" and the validation images" if val is not None else ""))
    activations = None
    if split is not None and val is not None:
        from imgcls.engine.finetune_top import cache_activations, top_features

        a_tr, y_tr = cache_activations(split, train, pre, device, amp_dtype, flip=flip, channels_last=channels_last)
        a_va, y_va = cache_activations(split, val, pre, device, amp_dtype, channels_last=channels_last)
        x_tr, x_va = top_features(split, a_tr, device, amp_dtype), top_features(split, a_va, device, amp_dtype)
        y_tr, y_va = y_tr.to(device), y_va.to(device)
        activations = ((a_tr, y_tr.cpu()), (a_va, y_va.cpu()))
    else:
        x_tr, y_tr = extract_features(model, train, pre, device, amp_dtype, flip=flip, channels_last=channels_last)
        x_va, y_va = (extract_features(model, val, pre, device, amp_dtype, channels_last=channels_last)
                      if val is not None else (None, None))
    extract_s = time.perf_counter() - t0
    views = 2 if flip else 1
    say(f"feature cache: {len(x_tr):,} training vectors ({len(x_tr) // views:,} images x {views} view(s)) of "
        f"{x_tr.shape[1]:,} features in {extract_s:.1f}s; training the classifier on cached features")
    t1 = time.perf_counter()
    state = train_head(model, x_tr, y_tr, x_va, y_va, settings, device, callbacks, batch_size, class_weights)
    head_s = time.perf_counter() - t1
    say(f"feature cache: classifier trained for {len(state.history)} epoch(s) in {head_s:.1f}s")
    return CachedHeadResult(state=state, extract_s=extract_s, head_s=head_s, views=views,
                            feature_dim=int(x_tr.shape[1]), activations=activations)


def train_head(model: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor | None,
               y_va: torch.Tensor | None, settings: Any, device: torch.device, callbacks: list[Callback],
               batch_size: int = 128, class_weights: torch.Tensor | None = None,
               head: nn.Module | None = None) -> TrainState:
    """Train ``head`` (default: ``model.get_classifier()``) on cached feature vectors, on the
    ordinary Trainer; also what cross-validation runs per fold (engine/crossval.py)."""
    s = replace(settings, mixup=0.0, cutmix=0.0, compile=False)  # mixing is for images, not features
    feats = Batches(Split(labels=y_tr.cpu(), images=x_tr.cpu()), max(1, min(batch_size, len(x_tr))), shuffle=True,
                    seed=s.seed, drop_last=True)
    val_feats = Batches(Split(labels=y_va.cpu(), images=x_va.cpu()), 4096) if x_va is not None else None
    drop = float(getattr(model, "drop_rate", 0.0) or 0.0)  # the head dropout the cache skipped
    trainer = Trainer(head if head is not None else model.get_classifier(), None, s, device, None,
                      batch_augment=FeatureDropout(drop) if drop else None,
                      callbacks=callbacks, class_weights=class_weights)
    # The head's steps are tiny (a (B, D) x (D, K) matmul): on the CPU one thread is ~30x faster
    # than two when the cores are shared (2 ms vs 63 ms per step measured on the 2-core box;
    # OpenMP threads spin-wait for each other); ops this small gain nothing from a second thread.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return trainer.fit(feats, val_feats)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- one plan for fit()
@dataclass
class FineTunePlan:
    """What Classifier.fit does differently when fine-tuning."""

    freezer: Freezer | None = None
    param_groups: list[dict[str, Any]] | None = None
    callbacks: list[Callback] = field(default_factory=list)
    use_cache: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # for the training summary / model card

    def finish(self) -> None:
        """After training: no hooks left behind, every parameter trainable again."""
        if self.freezer is not None:
            self.freezer.release()


def plan_finetune(model: nn.Module, *, pretrained: bool, freeze: str = "none", unfreeze_at: int | None = None,
                  unfreeze: str = "gradual", backbone_lr: float | None = None, layer_decay: float | None = None,
                  feature_cache: str = "auto", lr: float = 3e-3, weight_decay: float = 0.0, epochs: int = 1,
                  log: Callable[[str], None] | None = None) -> FineTunePlan | None:
    """None when nothing special applies (training from scratch with one learning rate)."""
    if freeze not in ("none", "backbone"):
        raise ImgclsError(f"unknown --freeze '{freeze}'", "use none or backbone")
    if unfreeze_at is not None and freeze != "backbone":
        raise ImgclsError("--unfreeze-at needs a frozen backbone", "add --freeze backbone")
    frozen_all_run = freeze == "backbone" and (unfreeze_at is None or unfreeze_at > epochs)
    if feature_cache == "on" and not frozen_all_run:
        raise ImgclsError("--feature-cache on needs a backbone frozen for the whole run",
                          "add --freeze backbone (without --unfreeze-at), or use --feature-cache auto")
    if freeze == "none" and backbone_lr is None and layer_decay is None and not pretrained:
        return None
    plan = FineTunePlan()
    plan.settings = {"freeze": freeze, "unfreeze_at": unfreeze_at, "unfreeze": unfreeze,
                     "feature_cache": False, "pretrained": pretrained}
    if freeze == "backbone":
        head_params(model)  # a clear error for models without a separate classifier
        plan.freezer = Freezer(model)
        plan.freezer.freeze()
        if frozen_all_run and feature_cache in ("auto", "on"):
            if not (callable(getattr(model, "forward_head", None)) and callable(getattr(model, "forward_features", None))):
                if feature_cache == "on":
                    raise ImgclsError(f"{type(model).__name__} cannot split features from its classifier",
                                      "use --feature-cache off")
            else:
                plan.use_cache = True
                plan.settings["feature_cache"] = True
                return plan
        if unfreeze_at is not None:
            plan.callbacks.append(GradualUnfreeze(plan.freezer, unfreeze_at, all_at_once=unfreeze == "all", log=log))
    scale = backbone_lr if backbone_lr is not None else (0.1 if pretrained else 1.0)
    plan.param_groups = finetune_param_groups(model, lr, weight_decay, scale, layer_decay)
    plan.settings.update({"backbone_lr": scale, "layer_decay": layer_decay})
    return plan
