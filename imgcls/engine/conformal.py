"""Split-conformal prediction sets: the classes a prediction cannot rule out, such that the
true class is inside with probability ``coverage`` (on exchangeable data), whatever the model.

Two score functions (Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction"):

- ``lac`` (least ambiguous set-valued classifier, Sadinle et al.): score ``1 - p_true``; the set
  is every class with ``p >= 1 - q``. Smallest sets on average; a set may be empty (no class is
  plausible, itself a hint that the image is unusual).
- ``aps`` (adaptive prediction sets, Romano et al.): score = the probability mass of the classes
  ranked above the true one plus ``u`` times its own; the set adds classes best first until
  ``q`` is reached. Sets grow where the model is unsure, so coverage is more even across
  classes. ``u`` is the paper's uniform random number, drawn here from a hash of the image's
  (rounded) probabilities, so the same image always gets the same set. Without it (u = 1) a
  model as confident as an MNIST CNN gets sets of 3-4 classes at 90% coverage (measured:
  bench/results/ood_conformal_mnist_aps_u1.json).

``q`` is the ``ceil((n+1) * coverage) / n`` empirical quantile of the scores of ``n``
calibration images the model never trained on.

Why the few lines here rather than a library: MAPIE (scikit-learn estimators; a network goes
in through a prefit wrapper, and its API was rewritten in 1.0) and crepes (generic
nonconformity scores) are on PyPI, torchcp is not in our registry; all three would add a
dependency for what is one quantile and one comparison, and the sets must be computed in the
serving process from a number stored in model.json, not from a fitted library object (which
would have to be pickled). RAPS (a penalty on long sets) is left out: with calibrated
probabilities and 10-100 classes it changes mean set size by a few percent (the RAPS paper's
gains are on ImageNet's 1,000 classes) at the cost of two more tuned parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgcls.errors import ImgclsError

from imgcls.engine.trust_names import CONFORMAL_METHODS  # noqa: E402,F401 (light, for the CLI)


def _check(method: str) -> None:
    if method not in CONFORMAL_METHODS:
        raise ImgclsError(f"unknown conformal method '{method}'", f"use {' or '.join(CONFORMAL_METHODS)}")


def row_uniform(probs: np.ndarray) -> np.ndarray:
    """(N, 1) numbers in [0, 1), one per row, from a hash of the row rounded to 4 decimals:
    random-looking across images, the same for the same image on every backend."""
    import hashlib

    rounded = np.round(np.asarray(probs, dtype=np.float64), 4) + 0.0  # + 0.0: -0.0 hashes as 0.0
    u = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") / 2**64 for r in rounded]
    return np.asarray(u, dtype=np.float64).reshape(-1, 1)


def _aps_mass(probs: np.ndarray) -> np.ndarray:
    """(N, K): for every class, the mass of the classes ranked above it plus u times its own."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    cum = np.cumsum(ranked, axis=1) - (1 - row_uniform(probs)) * ranked
    mass = np.empty_like(cum)
    np.put_along_axis(mass, order, cum, axis=1)
    return mass


def class_scores(probs: np.ndarray, method: str) -> np.ndarray:
    """(N, K) nonconformity of every class for every image (lower: more plausible)."""
    _check(method)
    probs = np.asarray(probs, dtype=np.float64)
    return 1.0 - probs if method == "lac" else _aps_mass(probs)


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The finite-sample-corrected quantile: ceil((n+1) coverage)/n of ``scores``. Above 1
    (too few calibration images for this coverage) every class is in every set."""
    n = len(scores)
    level = np.ceil((n + 1) * coverage) / n
    if level > 1:
        return float("inf")
    return float(np.quantile(scores, level, method="inverted_cdf"))


def fit_conformal(probs: np.ndarray, labels: np.ndarray, coverage: float = 0.9, method: str = "aps") -> dict[str, Any]:
    """The model.json ``conformal`` section fitted on calibration ``probs`` (N, K) and ``labels``."""
    _check(method)
    if not 0 < coverage < 1:
        raise ImgclsError(f"--coverage {coverage} is not between 0 and 1", "e.g. --coverage 0.9")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < 10:
        raise ImgclsError(f"{len(labels)} calibration images are too few for conformal sets",
                          "calibrate on a split of at least a few hundred images")
    s = class_scores(probs, method)[np.arange(len(labels)), labels]
    q = conformal_quantile(s, coverage)
    return {"method": method, "coverage": float(coverage), "qhat": q if np.isfinite(q) else None,
            "num_images": int(len(labels))}


def prediction_sets(probs: np.ndarray, qhat: float | None, method: str) -> np.ndarray:
    """(N, K) bool: class k is in image n's set. ``qhat`` None: every class."""
    if qhat is None:
        return np.ones(np.shape(probs), dtype=bool)
    return class_scores(probs, method) <= qhat + 1e-12


def set_metrics(sets: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Empirical coverage and mean set size, overall and per true class."""
    labels = np.asarray(labels, dtype=np.int64)
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(1)
    per_class = {}
    for i, c in enumerate(classes):
        m = labels == i
        if m.any():
            per_class[c] = {"coverage": round(float(covered[m].mean()), 5),
                            "mean_set_size": round(float(size[m].mean()), 4), "support": int(m.sum())}
    return {"coverage": round(float(covered.mean()), 5), "mean_set_size": round(float(size.mean()), 4),
            "empty_sets": int((size == 0).sum()), "num_images": int(len(labels)), "per_class": per_class}
