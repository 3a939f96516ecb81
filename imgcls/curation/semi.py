"""``imgcls train --unlabeled POOL``: semi-supervised training.

Two ingredients (``--semi``):

* ``pseudo`` - self-training: a teacher - the same model and recipe, trained on the labelled
  images only - predicts the unlabelled pool through the one Predictor; the images it labels
  with a confidence of at least ``--pseudo-threshold`` (0.95: FixMatch's threshold) join the
  training split with the teacher's label (this module, called by ``runs.train``);
* ``fixmatch`` - weak/strong-augmentation consistency on the pool inside the one training loop
  (engine/consistency.py, wired by the TrainingSession);
* ``both`` - the student of ``pseudo`` also trains with the consistency term.

The validation split stays labelled-only, so the reported accuracy is honest. With
``--time-budget`` the teacher gets :data:`TEACHER_SHARE` of it, and the student what is left
after the teacher and the pool prediction: the whole command trains for the budget.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch

from imgcls.api import Classifier
from imgcls.config import TrainConfig
from imgcls.data.pool import check_pool, pool_split
from imgcls.data.records import ImageData, Split
from imgcls.engine.consistency import confidence_threshold
from imgcls.engine.predictor import Predictor

__all__ = ["add_pseudo_labels", "check_pool", "TEACHER_SHARE"]

TEACHER_SHARE = 0.35  # of --time-budget: the teacher; the rest (less the pool prediction) the student
MIN_STUDENT_SHARE = 0.2  # the student trains at least this share of the budget even if the teacher overran


def _merge(train: Split, pool: Split, keep: np.ndarray, labels: np.ndarray) -> Split:
    idx = torch.from_numpy(np.nonzero(keep)[0])
    pseudo = torch.from_numpy(labels[keep]).long()
    if train.in_memory:
        return Split(labels=torch.cat([train.labels, pseudo]), images=torch.cat([train.images, pool.images[idx]]))
    return Split(labels=torch.cat([train.labels, pseudo]), paths=train.paths + [pool.paths[i] for i in idx.tolist()])


def add_pseudo_labels(cfg: TrainConfig, data: ImageData, progress: bool = True) -> tuple[ImageData, TrainConfig]:
    """``data`` with the teacher's confident pseudo-labelled images added to its training
    split, and the config the student trains with (its share of ``--time-budget``)."""
    t0 = time.perf_counter()
    pool, _ = pool_split(cfg.unlabeled)
    check_pool(data.train, pool, str(cfg.unlabeled))
    say = (lambda m: print(f"imgcls: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    budget = cfg.time_budget
    teacher_cfg = cfg.model_copy(update={"unlabeled": None,
                                         **({"time_budget": budget * TEACHER_SHARE} if budget else {})})
    say(f"semi-supervised: training the teacher on the {len(data.train)} labelled images"
        + (f" ({budget * TEACHER_SHARE:.2g} of the {budget:g} min budget)" if budget else ""))
    teacher = Classifier.from_config(teacher_cfg, data)
    teacher.fit(data, teacher_cfg, progress=progress)
    skipped: dict[int, str] = {}
    with Predictor(teacher, device=cfg.device, precision=cfg.precision, workers=cfg.workers) as pred:
        logits, _ = pred.run(pool, progress=progress, skipped=skipped)
        probs = pred.probabilities(logits)
    tau = confidence_threshold(cfg.pseudo_threshold, cfg.label_smoothing, data.num_classes)
    keep = probs.max(1) >= tau
    keep[list(skipped)] = False
    merged = _merge(data.train, pool, keep, probs.argmax(1))
    note = (f"semi-supervised: {int(keep.sum())} of {len(pool)} unlabelled images pseudo-labelled by the teacher "
            f"(confidence >= {tau:.3g}) joined the {len(data.train)} labelled ones")
    say(note)
    if budget:
        left = max(budget - (time.perf_counter() - t0) / 60, budget * MIN_STUDENT_SHARE)
        cfg = cfg.model_copy(update={"time_budget": round(left, 4)})
        say(f"semi-supervised: the student trains for the {left:.2g} min left of the budget")
    return dataclasses.replace(data, train=merged, notes=[*data.notes, note]), cfg
