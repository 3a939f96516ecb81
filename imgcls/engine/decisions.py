"""What a prediction says: the one place a row of class probabilities becomes a Prediction.

``Classifier.predict``, ``imgcls predict`` (text, CSV, JSON) and ``imgcls serve`` all build
their answers with :func:`decide`, so a decision rule added here (per-class thresholds,
"unknown" rejection, prediction sets) reaches every road at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class, probability), best first; empty when the file was unreadable
    probabilities: list[float] = field(repr=False, default_factory=list)
    error: str | None = None  # why the image could not be read (it has no prediction)
    # multi-label: every label whose probability reaches its threshold, most probable first (None: single-label)
    labels: list[tuple[str, float]] | None = None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "label": self.label,
                             "top": [{"class": c, "probability": round(p, 6)} for c, p in self.top]}
        if self.labels is not None:
            d["labels"] = [{"label": c, "p": round(p, 6)} for c, p in self.labels]
        if self.error:
            d["error"] = self.error
        return d


def label_set(classes: Sequence[str], p: np.ndarray, thresholds: Sequence[float]) -> list[tuple[str, float]]:
    """Multi-label: the labels whose (sigmoid) probability reaches their threshold, most probable first."""
    idx = [i for i in np.argsort(-p, kind="stable") if p[i] >= thresholds[i]]
    return [(classes[i], float(p[i])) for i in idx]


def decide(classes: Sequence[str], probs: np.ndarray, sources: Sequence[str], top_k: int = 1,
           skipped: dict[int, str] | None = None, thresholds: Sequence[float] | None = None) -> list[Prediction]:
    """One Prediction per row of ``probs`` (N, K): the top-k classes, best first. Row n in
    ``skipped`` (an unreadable file) gets ``error`` set and no classes. ``thresholds`` (one
    per class: a multi-label model) adds ``labels``, the set of labels above them."""
    skipped = skipped or {}
    k = max(1, min(top_k, len(classes)))
    out = []
    for n, (src, p) in enumerate(zip(sources, probs)):
        if n in skipped:
            out.append(Prediction(src, [], [], error=skipped[n], labels=[] if thresholds is not None else None))
            continue
        idx = np.argsort(-p, kind="stable")[:k]
        out.append(Prediction(src, [(classes[i], float(p[i])) for i in idx], p.tolist(),
                              labels=label_set(classes, p, thresholds) if thresholds is not None else None))
    return out
