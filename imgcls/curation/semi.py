"""``imgcls train --unlabeled POOL``: semi-supervised training.

Two ingredients (``--semi``):

* ``pseudo`` - self-training: a teacher - the same model and recipe, trained on the labelled
  images only - predicts the unlabelled pool through the one Predictor; the images it labels
  with a confidence of at least ``--pseudo-threshold`` (0.95: FixMatch's threshold) join the
  training split with the teacher's label (this module, called by ``runs.train``); with
  ``--pseudo-rounds R`` the student of each round, trained afresh, is the next round's teacher;
  with ``--pseudo-balance`` every class keeps as many (its most confident; :func:`select_pseudo`);
  with ``--pseudo-student teacher`` the student starts from the last teacher's weights;
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
from imgcls.engine.model_hooks import start_from
from imgcls.engine.predictor import Predictor

__all__ = ["add_pseudo_labels", "check_pool", "select_pseudo", "TEACHER_SHARE"]

TEACHER_SHARE = 0.35  # of the --time-budget left when a teacher starts; the student gets what the teachers leave
MIN_SHARE = 0.2  # every model (teachers, student) trains at least this share of the budget, even after an overrun


def _how(keep: np.ndarray, probs: np.ndarray, tau: float) -> str:
    if not keep.any():
        return f"none at confidence >= {tau:.3g}"
    counts = np.bincount(probs.argmax(1)[keep], minlength=probs.shape[1])
    return (f"class-balanced: {counts.max()} per class at most, {counts.min()} at least; threshold {tau:.3g} set "
            f"the total; lowest confidence kept {probs.max(1)[keep].min():.3g}")


def _merge(train: Split, pool: Split, keep: np.ndarray, labels: np.ndarray) -> Split:
    idx = torch.from_numpy(np.nonzero(keep)[0])
    pseudo = torch.from_numpy(labels[keep]).long()
    if train.in_memory:
        return Split(labels=torch.cat([train.labels, pseudo]), images=torch.cat([train.images, pool.images[idx]]))
    return Split(labels=torch.cat([train.labels, pseudo]), paths=train.paths + [pool.paths[i] for i in idx.tolist()])


def select_pseudo(probs: np.ndarray, tau: float, balance: bool = False,
                  exclude: list[int] | tuple[int, ...] = ()) -> np.ndarray:
    """Which pool images get the teacher's label: a boolean mask over ``probs`` (N x C).

    Without ``balance``, every image whose top probability is at least ``tau``. With it,
    class-balanced selection (CBST, Zou et al. 2018): the threshold only sets the total T, and
    every class keeps its ceil(T / C) most confident predictions (all of them when the teacher
    predicts it fewer times), so the classes the teacher finds easy do not crowd out the hard
    ones (on CIFAR-10 the thresholded set came out 3.5:1 imbalanced). ``exclude``: pool rows
    that could not be read."""
    conf, pred = probs.max(1), probs.argmax(1)
    ok = np.ones(len(probs), bool)
    ok[list(exclude)] = False
    keep = (conf >= tau) & ok
    if not balance or not keep.any():
        return keep
    per_class = -(-int(keep.sum()) // probs.shape[1])
    keep = np.zeros(len(probs), bool)
    for c in range(probs.shape[1]):
        idx = np.nonzero((pred == c) & ok)[0]
        keep[idx[np.argsort(-conf[idx], kind="stable")[:per_class]]] = True
    return keep


def add_pseudo_labels(cfg: TrainConfig, data: ImageData,
                      progress: bool = True) -> tuple[ImageData, TrainConfig, dict[str, torch.Tensor] | None]:
    """``data`` with the teacher's confident pseudo-labelled images added to its training
    split, the config the student trains with (its share of ``--time-budget``), and the weights
    the student starts from: the last teacher's with ``--pseudo-student teacher``, else None.

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
    train, notes, init = data.train, [], None
    warm = cfg.pseudo_student == "teacher"
    for r in range(rounds):
        share = max(minutes_left() * TEACHER_SHARE, budget * MIN_SHARE) if budget else None
        teacher_cfg = cfg.model_copy(update={"unlabeled": None, **({"time_budget": round(share, 4)} if budget else {})})
        what = "the labelled images" if r == 0 else "the labelled and the last round's pseudo-labelled images"
        say(f"semi-supervised: training the teacher{f' of round {r + 1}/{rounds}' if rounds > 1 else ''} on "
            f"{len(train)} images ({what})" + (f" ({share:.2g} of the {budget:g} min budget)" if budget else ""))
        teacher_data = dataclasses.replace(data, train=train)
        teacher = Classifier.from_config(teacher_cfg, teacher_data)
        if init is not None:  # --pseudo-student teacher: round r's teacher goes on from round r-1's
            start_from(teacher.model, init)
        teacher.fit(teacher_data, teacher_cfg, progress=progress)
        skipped: dict[int, str] = {}
        with Predictor(teacher, device=cfg.device, precision=cfg.precision, workers=cfg.workers) as pred:
            logits, _ = pred.run(pool, progress=progress, skipped=skipped)
            probs = pred.probabilities(logits)
        keep = select_pseudo(probs, tau, cfg.pseudo_balance, exclude=list(skipped))
        if warm:
            init = {k: v.detach().clone() for k, v in teacher.model.state_dict().items()}
        train = _merge(data.train, pool, keep, probs.argmax(1))
        note = (f"semi-supervised: {int(keep.sum())} of {len(pool)} unlabelled images pseudo-labelled by the teacher"
                f"{f' of round {r + 1}' if rounds > 1 else ''} "
                f"({_how(keep, probs, tau) if cfg.pseudo_balance else f'confidence >= {tau:.3g}'}) joined the "
                f"{len(data.train)} labelled ones")
        say(note)
        notes.append(note)
    if cfg.recipe_choice:  # the recipe was chosen for the labelled images; the student trains on more
        cfg = cfg.model_copy(update={"recipe_choice": f"{cfg.recipe_choice} (chosen for the {len(data.train):,} "
                                                      f"labelled images; the student trains on {len(train):,})"})
    if budget:
        left = max(minutes_left(), budget * MIN_SHARE)
        cfg = cfg.model_copy(update={"time_budget": round(left, 4)})
        say(f"semi-supervised: the student trains for the {left:.2g} min left of the budget"
            + (", from the teacher's weights" if warm else ""))
    elif warm:
        say("semi-supervised: the student starts from the teacher's weights")
    return dataclasses.replace(data, train=train, notes=[*data.notes, *notes]), cfg, init
