"""Split-conformal prediction sets: the classes a prediction cannot rule out, such that the
true class is inside with probability ``coverage`` (on exchangeable data), whatever the model.

Two score functions (Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction"):

- ``lac`` (least ambiguous set-valued classifier, Sadinle et al.): score ``1 - p_true``; the set
  is every class with ``p >= 1 - q``. Smallest sets on average; a set may be empty (no class is
  plausible, itself a hint that the image is unusual).
- ``aps`` (adaptive prediction sets, Romano et al.): score = the probability mass of the classes
  ranked above the true one plus ``u`` times its own; the set adds classes best first until
  ``q`` is reached. Sets grow where the model is unsure, so coverage is more even across
  classes. ``u`` is the paper's uniform random number. Without it (u = 1) a model as confident
  as an MNIST CNN gets sets of 3-4 classes at 90% coverage (measured:
  bench/results/ood_conformal_mnist_aps_u1.json).

What is random where (APS and RAPS). Calibration draws ``u`` for each calibration image from a
seeded generator, independent of the image and its probabilities, so ``q`` is the quantile of
the paper's randomised scores. Prediction does not draw: it uses ``u = 0``, i.e. class k is in
the set when the mass ranked above it (plus the RAPS penalty) is at most ``q`` (the
non-randomised set of the RAPS code, which adds the class that crosses ``q``). That set
contains the randomised set for every ``u``, so coverage is at least ``coverage`` (at most one
class more than the randomised set, and only where the top class is below ``q``); the top class
is always in it (nothing is ranked above it), so a set is never empty; and the same image gets
the same set on every backend. An earlier version took ``u`` from a hash of the rounded
probabilities: every saturated (one-hot) image of a class then shared one ``u``, and when it
exceeded ``q`` all of them got an empty set (digits class 7: 3% coverage). LAC is unchanged:
its sets may be empty by design.

``q`` is the ``ceil((n+1) * coverage) / n`` empirical quantile of the scores of ``n``
calibration images the model never trained on.

- ``raps`` (regularised APS, Angelopoulos et al., "Uncertainty Sets for Image Classifiers
  using Conformal Prediction", ICLR 2021): APS plus ``lambda * max(0, rank - k_reg)``, a
  penalty on classes ranked below ``k_reg``, so the long tail of unlikely classes stays out of
  the sets. ``k_reg`` and ``lambda`` are chosen on a seeded 30% of the calibration images as
  the paper's code does (``k_reg``: the ``coverage`` quantile of the true class's rank;
  ``lambda``: of 0.001, 0.01, 0.1, 0.2, 0.5, the one giving the smallest mean set), and ``q``
  is fitted on the other 70%, so the coverage guarantee holds.

Why the few lines here rather than a library: MAPIE (scikit-learn estimators; a network goes
in through a prefit wrapper, and its API was rewritten in 1.0) and crepes (generic
nonconformity scores) are on PyPI, torchcp is not in our registry; all three would add a
dependency for what is one quantile and one comparison, and the sets must be computed in the
serving process from numbers stored in model.json, not from a fitted library object (which
would have to be pickled).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgcls.errors import ImgclsError

from imgcls.engine.trust_names import CONFORMAL_METHODS  # noqa: E402,F401 (light, for the CLI)


def _check(method: str) -> None:
    if method not in CONFORMAL_METHODS:
        raise ImgclsError(f"unknown conformal method '{method}'", f"use {' or '.join(CONFORMAL_METHODS)}")


def _aps_mass(probs: np.ndarray, u: np.ndarray | float, k_reg: int | None = None, lam: float = 0.0) -> np.ndarray:
    """(N, K): for every class, the mass of the classes ranked above it plus ``u`` (an (N, 1)
    array, or 0) times its own (RAPS: plus ``lam`` times how far its rank, 1 = best, is beyond
    ``k_reg``)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    cum = np.cumsum(ranked, axis=1) - (1 - u) * ranked
    if k_reg is not None and lam:
        cum = cum + lam * np.maximum(0, np.arange(1, probs.shape[1] + 1) - k_reg)[None]
    mass = np.empty_like(cum)
    np.put_along_axis(mass, order, cum, axis=1)
    return mass


def class_scores(probs: np.ndarray, method: str, k_reg: int | None = None, lam: float = 0.0,
                 u: np.ndarray | float = 0.0) -> np.ndarray:
    """(N, K) nonconformity of every class for every image (lower: more plausible). APS/RAPS:
    ``u`` 0 is the prediction rule; calibration passes its seeded uniform draws."""
    _check(method)
    probs = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return 1.0 - probs
    return _aps_mass(probs, u, k_reg, lam) if method == "raps" else _aps_mass(probs, u)


def calibration_scores(probs: np.ndarray, labels: np.ndarray, method: str, k_reg: int | None = None,
                       lam: float = 0.0, seed: int = 0) -> np.ndarray:
    """(N,) the randomised score of the true class of each calibration image (APS/RAPS: ``u``
    drawn from a ``seed``-ed generator, independent of the probabilities and of the RAPS split)."""
    u = np.random.default_rng([seed, 1]).random((len(labels), 1))
    return class_scores(probs, method, k_reg, lam, u)[np.arange(len(labels)), labels]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The finite-sample-corrected quantile: ceil((n+1) coverage)/n of ``scores``. Above 1
    (too few calibration images for this coverage) every class is in every set."""
    n = len(scores)
    level = np.ceil((n + 1) * coverage) / n
    if level > 1:
        return float("inf")
    return float(np.quantile(scores, level, method="inverted_cdf"))


RAPS_LAMBDAS = (0.001, 0.01, 0.1, 0.2, 0.5)  # the paper's code (pick_lamda_size)
RAPS_TUNE_FRACTION = 0.3  # of the calibration images, for k_reg and lambda (the paper's code: 0.3)


def _raps_parameters(probs: np.ndarray, labels: np.ndarray, coverage: float, seed: int = 0) -> tuple[int, float]:
    """k_reg (the ``coverage`` quantile of the true class's 1-based rank) and the lambda whose
    sets, calibrated on these same images, are smallest on average."""
    ranks = (probs > probs[np.arange(len(labels)), labels][:, None]).sum(1) + 1
    k_reg = int(np.quantile(ranks, coverage, method="higher"))
    best, best_size = RAPS_LAMBDAS[0], np.inf
    for lam in RAPS_LAMBDAS:
        q = conformal_quantile(calibration_scores(probs, labels, "raps", k_reg, lam, seed), coverage)
        size = float(prediction_sets(probs, q if np.isfinite(q) else None, "raps", k_reg, lam).sum(1).mean())
        if size < best_size:
            best, best_size = lam, size
    return k_reg, best


def fit_conformal(probs: np.ndarray, labels: np.ndarray, coverage: float = 0.9, method: str = "aps",
                  seed: int = 0) -> dict[str, Any]:
    """The model.json ``conformal`` section fitted on calibration ``probs`` (N, K) and ``labels``
    (RAPS: ``k_reg`` and ``lambda`` on a ``seed``-ed 30% of them, ``q`` on the rest)."""
    _check(method)
    if not 0 < coverage < 1:
        raise ImgclsError(f"--coverage {coverage} is not between 0 and 1", "e.g. --coverage 0.9")
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < (30 if method == "raps" else 10):
        raise ImgclsError(f"{len(labels)} calibration images are too few for conformal sets",
                          "calibrate on a split of at least a few hundred images")
    extra: dict[str, Any] = {}
    k_reg, lam = None, 0.0
    if method == "raps":
        perm = np.random.default_rng(seed).permutation(len(labels))
        n_tune = int(round(RAPS_TUNE_FRACTION * len(labels)))
        tune, rest = perm[:n_tune], perm[n_tune:]
        k_reg, lam = _raps_parameters(probs[tune], labels[tune], coverage, seed)
        probs, labels = probs[rest], labels[rest]
        extra = {"k_reg": k_reg, "lambda": lam, "tuned_on_images": int(n_tune)}
    q = conformal_quantile(calibration_scores(probs, labels, method, k_reg, lam, seed), coverage)
    return {"method": method, "coverage": float(coverage), "qhat": q if np.isfinite(q) else None,
            "num_images": int(len(labels)), **extra}


def prediction_sets(probs: np.ndarray, qhat: float | None, method: str, k_reg: int | None = None,
                    lam: float = 0.0) -> np.ndarray:
    """(N, K) bool: class k is in image n's set (APS/RAPS: the ``u = 0`` rule, never empty; see
    the module's docstring). ``qhat`` None: every class."""
    if qhat is None:
        return np.ones(np.shape(probs), dtype=bool)
    return class_scores(probs, method, k_reg, lam) <= qhat + 1e-12


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
