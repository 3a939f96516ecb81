"""``imgcls train --unlabeled POOL``: semi-supervised training.

Two ingredients (``--semi``):

* ``pseudo`` - self-training: a teacher - the same model and recipe, trained on the labelled
  images only - predicts the unlabelled pool through the one Predictor; the images it labels
  with a confidence of at least ``--pseudo-threshold`` (0.95: FixMatch's threshold) join the
  training split with the teacher's label (this module, called by ``runs.train``); with
  ``--pseudo-rounds R`` the student of each round, trained afresh, is the next round's teacher;
* ``fixmatch`` - weak/strong-augmentation consistency on the pool inside the one training loop
  (engine/consistency.py, wired by the TrainingSession);
* ``both`` - the student of ``pseudo`` also trains with the consistency term.

The validation split stays labelled-only, so the reported accuracy is honest. With
``--time-budget`` each teacher gets :data:`TEACHER_SHARE` of what is left of it when it starts,
and the student what is left after the teachers and the pool predictions: the whole command
trains for the budget.
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

TEACHER_SHARE = 0.35  # of the --time-budget left when a teacher starts; the student gets what the teachers leave
MIN_SHARE = 0.2  # every model (teachers, student) trains at least this share of the budget, even after an overrun


def _merge(train: Split, pool: Split, keep: np.ndarray, labels: np.ndarray) -> Split:
    idx = torch.from_numpy(np.nonzero(keep)[0])
    pseudo = torch.from_numpy(labels[keep]).long()
    if train.in_memory:
        return Split(labels=torch.cat([train.labels, pseudo]), images=torch.cat([train.images, pool.images[idx]]))
    return Split(labels=torch.cat([train.labels, pseudo]), paths=train.paths + [pool.paths[i] for i in idx.tolist()])


def add_pseudo_labels(cfg: TrainConfig, data: ImageData, progress: bool = True) -> tuple[ImageData, TrainConfig]:
    """``data`` with the teacher's confident pseudo-labelled images added to its training
    split, and the config the student trains with (its share of ``--time-budget``).

    With ``--pseudo-rounds R`` above 1 this is self-training in rounds: the student of a round,
    trained from scratch on the labelled images and the previous teacher's pseudo-labels (a
    fresh start keeps a teacher's mistakes from being locked in, as in curriculum labelling,
    Cascante-Bonilla et al. 2021), is the next round's teacher and labels the whole pool again.
    Each teacher trains for :data:`TEACHER_SHARE` of the budget left when it starts."""
    t0 = time.perf_counter()
    pool, _ = pool_split(cfg.unlabeled)
    check_pool(data.train, pool, str(cfg.unlabeled))
    say = (lambda m: print(f"imgcls: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    budget = cfg.time_budget
    minutes_left = lambda: budget - (time.perf_counter() - t0) / 60  # noqa: E731 (with a budget only)
    tau = confidence_threshold(cfg.pseudo_threshold, cfg.label_smoothing, data.num_classes)
    rounds = cfg.pseudo_rounds
    train, notes = data.train, []
    for r in range(rounds):
        share = max(minutes_left() * TEACHER_SHARE, budget * MIN_SHARE) if budget else None
        teacher_cfg = cfg.model_copy(update={"unlabeled": None, **({"time_budget": round(share, 4)} if budget else {})})
        what = "the labelled images" if r == 0 else "the labelled and the last round's pseudo-labelled images"
        say(f"semi-supervised: training the teacher{f' of round {r + 1}/{rounds}' if rounds > 1 else ''} on "
            f"{len(train)} images ({what})" + (f" ({share:.2g} of the {budget:g} min budget)" if budget else ""))
        teacher_data = dataclasses.replace(data, train=train)
        teacher = Classifier.from_config(teacher_cfg, teacher_data)
        teacher.fit(teacher_data, teacher_cfg, progress=progress)
        skipped: dict[int, str] = {}
        with Predictor(teacher, device=cfg.device, precision=cfg.precision, workers=cfg.workers) as pred:
            logits, _ = pred.run(pool, progress=progress, skipped=skipped)
            probs = pred.probabilities(logits)
        keep = probs.max(1) >= tau
        keep[list(skipped)] = False
        train = _merge(data.train, pool, keep, probs.argmax(1))
        note = (f"semi-supervised: {int(keep.sum())} of {len(pool)} unlabelled images pseudo-labelled by the teacher"
                f"{f' of round {r + 1}' if rounds > 1 else ''} (confidence >= {tau:.3g}) joined the "
                f"{len(data.train)} labelled ones")
        say(note)
        notes.append(note)
    if budget:
        left = max(minutes_left(), budget * MIN_SHARE)
        cfg = cfg.model_copy(update={"time_budget": round(left, 4)})
        say(f"semi-supervised: the student trains for the {left:.2g} min left of the budget")
    return dataclasses.replace(data, train=train, notes=[*data.notes, *notes]), cfg
