"""``imgcls train --unlabeled POOL``: semi-supervised training by pseudo-labels (self-training).

A teacher - the same model and recipe, trained on the labelled images only - predicts the
unlabelled pool through the one Predictor; the images it labels with a confidence of at least
``--pseudo-threshold`` (0.95: FixMatch's threshold) join the training split with the teacher's
label, and the run trains its model on the union through the one TrainingSession. The
validation split stays labelled-only, so the reported accuracy is honest.

Not done (yet): FixMatch's weak/strong-augmentation consistency within one loop, and an EMA
teacher that improves during the run; this is the cheap first step of the issue.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

from imgcls.api import Classifier
from imgcls.config import TrainConfig
from imgcls.curation.rank import pool_split
from imgcls.data.records import ImageData, Split
from imgcls.engine.predictor import Predictor
from imgcls.errors import ImgclsError


def check_pool(train: Split, pool: Split, where: str) -> None:
    """Refuse a pool that cannot join the training split (before any training)."""
    if train.in_memory != pool.in_memory:
        raise ImgclsError(f"--unlabeled {where} is {'arrays' if pool.in_memory else 'image files'} but the labelled "
                          f"data is {'arrays' if train.in_memory else 'image files'}", "give the same kind for both")
    if train.in_memory:
        if pool.images.shape[1:] != train.images.shape[1:]:
            raise ImgclsError(f"--unlabeled {where} images are {tuple(pool.images.shape[1:])}, the labelled ones "
                              f"{tuple(train.images.shape[1:])} (C, H, W)", "give unlabelled images of the same shape")


def _merge(train: Split, pool: Split, keep: np.ndarray, labels: np.ndarray) -> Split:
    idx = torch.from_numpy(np.nonzero(keep)[0])
    pseudo = torch.from_numpy(labels[keep]).long()
    if train.in_memory:
        return Split(labels=torch.cat([train.labels, pseudo]), images=torch.cat([train.images, pool.images[idx]]))
    return Split(labels=torch.cat([train.labels, pseudo]), paths=train.paths + [pool.paths[i] for i in idx.tolist()])


def add_pseudo_labels(cfg: TrainConfig, data: ImageData, progress: bool = True) -> ImageData:
    """``data`` with the teacher's confident pseudo-labelled images added to its training split."""
    pool, _ = pool_split(cfg.unlabeled)
    check_pool(data.train, pool, str(cfg.unlabeled))
    say = (lambda m: print(f"imgcls: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    say(f"semi-supervised: training the teacher on the {len(data.train)} labelled images")
    teacher = Classifier.from_config(cfg, data)
    teacher.fit(data, cfg.model_copy(update={"unlabeled": None}), progress=progress)
    skipped: dict[int, str] = {}
    with Predictor(teacher, device=cfg.device, precision=cfg.precision, workers=cfg.workers) as pred:
        logits, _ = pred.run(pool, progress=progress, skipped=skipped)
        probs = pred.probabilities(logits)
    keep = probs.max(1) >= cfg.pseudo_threshold
    keep[list(skipped)] = False
    merged = _merge(data.train, pool, keep, probs.argmax(1))
    note = (f"semi-supervised: {int(keep.sum())} of {len(pool)} unlabelled images pseudo-labelled by the teacher "
            f"(confidence >= {cfg.pseudo_threshold}) joined the {len(data.train)} labelled ones")
    say(note)
    return dataclasses.replace(data, train=merged, notes=[*data.notes, note])
