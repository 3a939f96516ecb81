"""What a model knows about its own reliability, read from model.json: the OOD score method
and its "unknown" threshold (``card["ood"]``) and the conformal sets (``card["conformal"]``).
A multi-label model has OOD scores (per-label energy, or kNN) and an unknown threshold, but
no conformal sets (they are a single-label notion).

:class:`Trust` turns a batch of logits (and penultimate features, for kNN) into an
:class:`Assessment`; :func:`imgcls.engine.decisions.decide` writes it into each Prediction,
so every road (API, CLI, serve, page) answers alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgcls.engine.conformal import prediction_sets
from imgcls.engine.ood import DEFAULT_K, DEFAULT_OOD_METHOD, check_method, load_stats, ood_scores
from imgcls.engine.trust_names import FEATURE_METHODS, feature_kind
from imgcls.errors import ImgclsError

CALIBRATE_HINT = "add them: imgcls calibrate {run} --data DATA"


@dataclass
class Assessment:
    """Per image: the OOD score, whether it is rejected as unknown (None: no threshold) and
    the conformal set as a bool row over the classes (None: no sets)."""

    ood_scores: np.ndarray
    unknown: np.ndarray | None = None
    sets: np.ndarray | None = None


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def missing(bundle: Any, what: str) -> ImgclsError:
    """The one-line error for a model (e.g. trained before this existed) without ``what``."""
    run = bundle.path or "RUN"
    flag = {"conformal prediction sets": " --coverage 0.9", "unknown threshold": " --ood-method energy"}.get(what, "")
    return ImgclsError(f"the model in {run} has no {what} (trained before imgcls had them, or never calibrated)",
                       CALIBRATE_HINT.format(run=run) + flag)


class Trust:
    """``Trust(bundle)``; ``sets=False`` / ``reject=False`` switch those off, ``True`` requires
    them (an error naming ``imgcls calibrate`` when the model lacks them)."""

    def __init__(self, bundle: Any, sets: bool | None = None, reject: bool | None = None):
        card = bundle.card
        self.bundle = bundle
        self.multi_label = bool(getattr(bundle, "multi_label", False))
        self.ood: dict[str, Any] = dict(card.get("ood") or {"method": DEFAULT_OOD_METHOD})
        self.method = check_method(str(self.ood.get("method", DEFAULT_OOD_METHOD)))
        if self.multi_label and sets:  # conformal sets are single-label (a softmax over classes)
            bundle.refuse_multi_label("conformal prediction sets (--sets)")
        self.conformal: dict[str, Any] | None = card.get("conformal") if sets is not False and not self.multi_label \
            else None
        if sets and not self.conformal:
            raise missing(bundle, "conformal prediction sets")
        self.threshold = self.ood.get("threshold") if reject is not False else None
        if reject and self.threshold is None:
            raise missing(bundle, "unknown threshold")
        self._stats: dict[str, torch.Tensor] | None = getattr(bundle, "ood_features", None)

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    @property
    def features(self) -> bool | str:
        """What the score reads besides the logits: False, True (the penultimate features) or
        ``"layers"`` (those and the block statistics)."""
        return feature_kind(self.method)

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """The feature score's training statistics (ood_features.safetensors), read once."""
        if self._stats is None:
            self._stats = load_stats(self.bundle.path, self.method)
        return self._stats

    def scores(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        t = float(self.ood.get("temperature", self.bundle.temperature))
        stats = self.stats if self.needs_features else None
        return ood_scores(self.method, logits, features, stats, int(self.ood.get("k", DEFAULT_K)), t, self.multi_label)

    def sets(self, logits: np.ndarray) -> np.ndarray | None:
        if not self.conformal:
            return None
        c = self.conformal
        probs = softmax(logits, float(c.get("temperature", self.bundle.temperature)))
        return prediction_sets(probs, c.get("qhat"), c.get("method", "aps"), c.get("k_reg"), float(c.get("lambda", 0.0)))

    def assess(self, logits: np.ndarray, features: np.ndarray | None = None) -> Assessment:
        if not len(logits):
            return Assessment(np.empty(0))
        s = self.scores(logits, features)
        unknown = None if self.threshold is None else s > float(self.threshold)
        return Assessment(s, unknown, self.sets(logits))
