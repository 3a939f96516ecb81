"""What a prediction says: the one place a row of class probabilities becomes a Prediction.

``Classifier.predict``, ``imgcls predict`` (text, CSV, JSON) and ``imgcls serve`` all build
their answers with :func:`decide`, so a decision rule added here (per-class thresholds,
"unknown" rejection, prediction sets) reaches every road at once.

Trust fields (engine/trust.py): ``ood_score`` (higher = more unlike the training images),
``unknown`` (the score is above the model's threshold: ``label`` answers "unknown" and
``guess`` keeps the top class) and ``set`` (the conformal prediction set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from imgcls.errors import ImgclsError

UNKNOWN = "unknown"


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when the file was unreadable
    probabilities: list[float] = field(repr=False, default_factory=list)
    error: str | None = None  # why the image could not be read (it has no prediction)
    # multi-label: every label whose probability reaches its threshold, most probable first (None: single-label)
    labels: list[tuple[str, float]] | None = None
    # trust (engine/trust.py): None where the model has no such thing
    ood_score: float | None = None
    unknown: bool | None = None  # None: the model has no unknown threshold
    set: list[str] | None = None  # conformal prediction set, most probable first

    @property
    def guess(self) -> str | None:
        """The top class, also when the answer is unknown."""
        return self.top[0][0] if self.top else None

    @property
    def label(self) -> str | None:
        return UNKNOWN if self.unknown else self.guess

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "label": self.label,
                             "top": [{"class": c, "probability": round(p, 6)} for c, p in self.top]}
        if self.labels is not None:
            d["labels"] = [{"label": c, "p": round(p, 6)} for c, p in self.labels]
        if self.error:
            d["error"] = self.error
        d.update(_trust_dict(self))
        return d


def label_set(classes: Sequence[str], p: np.ndarray, thresholds: Sequence[float]) -> list[tuple[str, float]]:
    """Multi-label: the labels whose (sigmoid) probability reaches their threshold, most probable first."""
    idx = [i for i in np.argsort(-p, kind="stable") if p[i] >= thresholds[i]]
    return [(classes[i], float(p[i])) for i in idx]


def _trust_dict(p: Prediction) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if p.ood_score is not None:
        d["ood_score"] = round(p.ood_score, 6)
    if p.unknown is not None:
        d["unknown"], d["guess"] = p.unknown, p.guess
    if p.set is not None:
        d["set"] = p.set
    return d


def _with_trust(pred: Prediction, n: int, p: np.ndarray, classes: Sequence[str], assessment: Any) -> Prediction:
    if assessment is None:
        return pred
    pred.ood_score = float(assessment.ood_scores[n])
    if assessment.unknown is not None:
        pred.unknown = bool(assessment.unknown[n])
    if assessment.sets is not None:
        members = np.flatnonzero(assessment.sets[n])
        pred.set = [classes[i] for i in members[np.argsort(-p[members], kind="stable")]]
    return pred


def check_top_k(top_k: Any) -> None:
    """``top_k`` is a whole number >= 1 (the server's 400 and the CLI's flag check say the same)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ImgclsError(f"top_k must be a whole number >= 1 (got {top_k!r})", "e.g. top_k=1 for the best class")


def decide(classes: Sequence[str], probs: np.ndarray, sources: Sequence[str], top_k: int = 1,
           skipped: dict[int, str] | None = None, assessment: Any = None,
           thresholds: Sequence[float] | None = None) -> list[Prediction]:
    """One Prediction per row of ``probs`` (N, K): the top-k classes, best first. Row n in
    ``skipped`` (an unreadable file) gets ``error`` set and no classes. ``assessment`` (an
    :class:`~imgcls.engine.trust.Assessment` of the same rows) adds the trust fields;
    ``thresholds`` (one per class: a multi-label model) adds ``labels``, the set of labels
    above them."""
    check_top_k(top_k)
    skipped = skipped or {}
    k = min(top_k, len(classes))
    out = []
    for n, (src, p) in enumerate(zip(sources, probs)):
        if n in skipped:
            out.append(Prediction(src, [], [], error=skipped[n], labels=[] if thresholds is not None else None))
            continue
        idx = np.argsort(-p, kind="stable")[:k]
        pred = Prediction(src, [(classes[i], float(p[i])) for i in idx], p.tolist(),
                          labels=label_set(classes, p, thresholds) if thresholds is not None else None)
        out.append(_with_trust(pred, n, p, classes, assessment))
    return out
