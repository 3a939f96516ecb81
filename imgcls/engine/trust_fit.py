"""Fitting what :class:`~imgcls.engine.trust.Trust` reads: conformal sets on a calibration
split and the "unknown" threshold (plus the kNN feature bank) on a validation split. Used by
``Classifier.calibrate`` (``imgcls calibrate``) and by training (``--conformal``, ``--ood-method``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgcls.data.records import Split
from imgcls.engine.conformal import fit_conformal
from imgcls.engine.ood import DEFAULT_K, MAX_BANK, check_method, check_multi_label, fit_threshold, make_bank, ood_scores
from imgcls.engine.predictor import Predictor
from imgcls.engine.trust import softmax


def fit_sets(logits: np.ndarray, labels: np.ndarray, coverage: float, method: str, temperature: float,
             fitted_on: str) -> dict[str, Any]:
    """model.json's ``conformal`` section (the sets use this temperature, whatever is refitted later)."""
    c = fit_conformal(softmax(logits, temperature), labels, coverage, method)
    c.update(temperature=round(float(temperature), 6), fitted_on=fitted_on)
    return c


def feature_bank(predictor: Predictor, train: Split, seed: int = 0) -> torch.Tensor:
    """Normalised penultimate features of (a seeded subsample of at most MAX_BANK) training images."""
    if len(train) > MAX_BANK:
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:MAX_BANK]
        train = train.subset(idx.sort().values)
    _, _, feats = predictor.run_outputs(train, features=True)
    return make_bank(feats)


def fit_unknown(predictor: Predictor, logits: np.ndarray, features: np.ndarray | None, method: str,
                accept: float, fitted_on: str, train: Split | None = None,
                seed: int = 0) -> tuple[dict[str, Any], torch.Tensor | None]:
    """model.json's ``ood`` section: ``method``, and the threshold that accepts ``accept`` of
    the in-distribution images whose ``logits`` (and ``features``) are given. kNN also
    returns the training feature bank (``train`` is required for it)."""
    check_method(method)
    multi = predictor.bundle.multi_label
    if multi:
        check_multi_label(method)
    bank = feature_bank(predictor, train, seed) if method == "knn" else None
    t = predictor.bundle.temperature
    scores = ood_scores(method, logits, features, bank, DEFAULT_K, t, multi)
    section: dict[str, Any] = {"method": method, "threshold": fit_threshold(scores, accept),
                               "accept": accept, "temperature": round(float(t), 6), "fitted_on": fitted_on,
                               "num_images": int(len(scores))}
    if multi and method == "energy":
        section["score"] = "joint energy: -sum over labels of log(1 + exp(logit))"
    if bank is not None:
        section.update(k=DEFAULT_K, bank_images=int(len(bank)))
    return section, bank
