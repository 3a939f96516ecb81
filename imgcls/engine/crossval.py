"""Out-of-fold predicted probabilities by K-fold cross-validation: every image gets the
probabilities of a model that never saw its label, what confident learning (cleanlab) needs.

Two roads, both on the spine:

* :func:`oof_from_features` - the fast path for a frozen pretrained backbone: its features
  are extracted once (``finetune.extract_features``, the feature cache's own function), then
  a fresh linear head per fold trains on the ordinary Trainer (``finetune.train_head``);
  seconds per fold.
* :func:`oof_by_training` - any model: per fold a fresh bundle trains through the one
  TrainingSession and the one Predictor gives the held-out fold's probabilities.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from imgcls.bundle import ModelBundle
from imgcls.config import TrainConfig
from imgcls.data.pipeline import eval_batches
from imgcls.data.records import ImageData, Split
from imgcls.engine.device import resolve_device, resolve_precision
from imgcls.engine.finetune import extract_features, train_head
from imgcls.engine.predictor import Predictor, softmax
from imgcls.engine.session import TrainingSession, fit_settings

Folds = list[tuple[np.ndarray, np.ndarray]]


def _lr(cfg: TrainConfig) -> float:
    return 3e-3 if cfg.lr == "auto" else float(cfg.lr)


@torch.no_grad()
def _head_probs(head: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    head.eval()
    return softmax(head(x).float().cpu().numpy())


def oof_from_features(bundle: ModelBundle, split: Split, cfg: TrainConfig, folds: Folds,
                      say: Callable[[str], None] | None = None) -> np.ndarray:
    """Out-of-fold probabilities ``(N, K)`` for a decoded (in-memory) ``split``: backbone
    features once, a fresh copy of the bundle's untrained head per fold."""
    device = resolve_device(cfg.device)
    amp = resolve_precision(cfg.precision, device)
    model, pre = bundle.model.to(device), bundle.preprocessing
    batches = eval_batches(split, pre, 256, workers=cfg.workers, device=device)
    x, y = extract_features(model, batches, pre, device, amp)
    x = x.cpu()
    if say:
        say(f"label issues: {len(x):,} feature vectors of {x.shape[1]:,}; a linear head per fold")
    init = copy.deepcopy(model.get_classifier()).cpu()
    settings = fit_settings(cfg, _lr(cfg))
    probs = np.zeros((len(x), bundle.num_classes), np.float32)
    for k, (tr, held) in enumerate(folds):
        head = copy.deepcopy(init).to(device)
        tr_t, held_t = torch.from_numpy(tr), torch.from_numpy(held)
        train_head(model, x[tr_t], y[tr_t].cpu(), None, None, settings, device, [],
                   batch_size=cfg.batch_size, head=head)
        probs[held] = _head_probs(head, x[held_t].to(device))
        if say:
            say(f"label issues: fold {k + 1}/{len(folds)} done")
    bundle.model.to("cpu")
    return probs


def oof_by_training(make_bundle: Callable[[ImageData], ModelBundle], data: ImageData, cfg: TrainConfig,
                    folds: Folds, say: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[int]]:
    """Out-of-fold probabilities ``(N, K)`` for ``data.train``: per fold a fresh model
    (``make_bundle``) trained through the TrainingSession on the other folds, its held-out
    fold predicted by the Predictor. No validation split: the held-out labels play no part.
    Also returns the indices of files that could not be read (their rows mean nothing)."""
    probs = np.zeros((len(data.train), data.num_classes), np.float32)
    bad: list[int] = []
    cfg = cfg.model_copy(update={"val_split": 0.0, "patience": None})
    for k, (tr, held) in enumerate(folds):
        part = dataclasses.replace(data, train=data.train.subset(torch.from_numpy(tr)), val=None, test=None,
                                   notes=[])
        bundle = make_bundle(part)
        TrainingSession(bundle, cfg, progress=False).run(part)
        with Predictor(bundle, device=cfg.device, precision=cfg.precision, workers=cfg.workers) as pred:
            skipped: dict[int, str] = {}
            logits, _ = pred.run(data.train.subset(torch.from_numpy(held)), skipped=skipped)
            probs[held] = pred.probabilities(logits)
            bad += [int(held[i]) for i in skipped]
        if say:
            say(f"label issues: fold {k + 1}/{len(folds)} trained and predicted")
    return probs, sorted(bad)
