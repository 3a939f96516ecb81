"""Fitting what :class:`~imgcls.engine.trust.Trust` reads: conformal sets on a calibration
split and the "unknown" threshold (plus the kNN feature bank) on a validation split. Used by
``Classifier.calibrate`` (``imgcls calibrate``) and by training (``--conformal``, ``--ood-method``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgcls.data.records import Split
from imgcls.engine.conformal import fit_conformal
from imgcls.engine.ood import DEFAULT_K, MAX_BANK, check_method, check_multi_label, fit_stats, fit_threshold, ood_scores
from imgcls.engine.trust_names import FEATURE_METHODS, feature_kind
from imgcls.engine.predictor import Predictor
from imgcls.engine.trust import softmax


def fit_sets(logits: np.ndarray, labels: np.ndarray, coverage: float, method: str, temperature: float,
             fitted_on: str) -> dict[str, Any]:
    """model.json's ``conformal`` section (the sets use this temperature, whatever is refitted later)."""
    c = fit_conformal(softmax(logits, temperature), labels, coverage, method)
    c.update(temperature=round(float(temperature), 6), fitted_on=fitted_on)
    return c


def training_features(predictor: Predictor, train: Split, max_images: int | None = MAX_BANK,
                      seed: int = 0, features: bool | str = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penultimate features (``features="layers"``: followed by the block statistics), labels
    and logits of (a seeded subsample of at most ``max_images``) training images."""
    if max_images is not None and len(train) > max_images:
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:max_images]
        train = train.subset(idx.sort().values)
    logits, labels, feats = predictor.run_outputs(train, features=features)
    return feats, labels, logits


def fit_unknown(predictor: Predictor, logits: np.ndarray, features: np.ndarray | None, method: str,
                accept: float, fitted_on: str, train: Split | None = None,
                seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """model.json's ``ood`` section: ``method``, and the threshold that accepts ``accept`` of
    the in-distribution images whose ``logits`` (and ``features``) are given. A feature score
    also returns its training statistics (``train`` is required for it), stored in
    ood_features.safetensors."""
    check_method(method)
    multi = predictor.bundle.multi_label
    if multi:
        check_multi_label(method)
    stats = None
    if method in FEATURE_METHODS:
        feats, labels, z = training_features(predictor, train, MAX_BANK, seed, feature_kind(method))
        stats = fit_stats(method, feats, labels, seed, predictor.bundle.model, z)
    t = predictor.bundle.temperature
    scores = ood_scores(method, logits, features, stats, DEFAULT_K, t, multi)
    section: dict[str, Any] = {"method": method, "threshold": fit_threshold(scores, accept),
                               "accept": accept, "temperature": round(float(t), 6), "fitted_on": fitted_on,
                               "num_images": int(len(scores))}
    if multi and method == "energy":
        section["score"] = "joint energy: -sum over labels of log(1 + exp(logit))"
    if method in ("knn", "layers"):
        section.update(k=DEFAULT_K, bank_images=int(len(stats["features"])))
    if method == "layers":
        from imgcls.engine.layer_stats import stat_layers

        names = {id(m): n for n, m in predictor.bundle.model.named_modules()}
        section["layers"] = [names[id(m)] for m in stat_layers(predictor.bundle.model)]
    return section, stats
