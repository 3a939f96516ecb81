"""How far to trust the model, measured: conformal coverage and set size (overall and per
class) and how well the OOD score separates in-distribution images from other data (AUROC,
FPR at 95% TPR), with the report's two pictures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgcls.engine.conformal import set_metrics
from imgcls.engine.ood import ood_scores as score_of
from imgcls.engine.predictor import Predictor, ood_split
from imgcls.evaluation.plots import _plt, _png


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """AUROC of telling OOD (positive) from in-distribution by the score (higher = more
    unusual), and the FPR at 95% TPR as OpenOOD defines it: the fraction of OOD images
    accepted when 95% of the in-distribution images are (scikit-learn's ROC curve with
    in-distribution as the positive class)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = roc_curve(1 - y, -s)  # in-distribution positive, confidence = -score
    out = {"auroc": round(float(roc_auc_score(y, s)), 5), "fpr95": round(float(fpr[np.searchsorted(tpr, 0.95)]), 5),
           "num_id": int(len(id_scores)), "num_ood": int(len(ood_scores))}
    if threshold is not None:
        out["threshold"] = float(threshold)
        out["id_accepted"] = round(float((id_scores <= threshold).mean()), 5)
        out["ood_rejected"] = round(float((ood_scores > threshold).mean()), 5)
    return out


def fitted_here(fitted_on: str | None, split: str | None) -> bool:
    """Whether the images evaluated as ``split`` include those a card section was fitted on
    (``fitted_on``: a split name; ``calib_split``, training's hold-out of train; ``all``
    holds every image). Unknown on either side: False."""
    if not fitted_on or not split:
        return False
    return fitted_on == split or "all" in (fitted_on, split) or (fitted_on == "calib_split" and split == "train")


def held_in_note(section: dict[str, Any], fitted_on: str | None, split: str | None, what: str,
                 splits: list[str] | None = None) -> None:
    """Adds ``note`` to a metrics section measured on the images ``what`` was fitted on. The
    way to a held-out figure names only ``splits`` (the data's own; None: unknown) that
    ``what`` was not fitted on - never one the data lacks."""
    if not fitted_here(fitted_on, split):
        return
    other = [s for s in ("test", "val") if s in (splits or []) and s != split and not fitted_here(fitted_on, s)]
    if other:
        fix = f"evaluate on the {other[0]} split (--split {other[0]}) for one"
    elif splits is not None:
        fix = "no other split of this data is held out from it: evaluate other images for one"
    else:
        fix = "evaluate on images it was not fitted on for one"
    section["note"] = f"measured on the split the {what} fitted on ({fitted_on}): not a held-out estimate; {fix}"


def conformal_metrics(predictor: Predictor, logits: np.ndarray, labels: np.ndarray,
                      split: str | None = None, splits: list[str] | None = None) -> dict[str, Any] | None:
    """Coverage and set sizes of the model's conformal sets on labelled images (None: no sets),
    with a ``note`` when ``split`` holds the images the sets were fitted on (``splits``: the
    data's, for the way to a held-out figure)."""
    trust = predictor.trust
    sets = trust.sets(logits)
    if sets is None:
        return None
    c = trust.conformal
    out = {"method": c.get("method"), "target_coverage": c.get("coverage"),
           **set_metrics(sets, labels, predictor.bundle.classes)}
    held_in_note(out, c.get("fitted_on"), split, "sets were", splits)
    return out


def ood_histogram_png(id_scores: np.ndarray, ood_scores: np.ndarray, method: str, id_name: str, ood_name: str,
                      threshold: float | None = None) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    both = np.r_[id_scores, ood_scores]
    bins = np.linspace(np.nanmin(both), np.nanmax(both), 50) if len(both) else 10
    ax.hist(id_scores, bins=bins, alpha=0.6, density=True, label=f"in-distribution ({id_name})", color="tab:blue")
    ax.hist(ood_scores, bins=bins, alpha=0.6, density=True, label=f"OOD ({ood_name})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", label="unknown threshold")
    ax.set_xlabel(f"OOD score ({method}; higher = more unusual)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png(fig)


def conformal_png(per_class: dict[str, dict[str, Any]], target: float) -> bytes:
    plt = _plt()
    names = list(per_class)
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(min(14, 4 + 0.5 * len(names)) * 1.4, 3.6))
    a.bar(x, [per_class[c]["coverage"] for c in names], color="tab:blue")
    a.axhline(target, color="black", ls="--", label=f"target {target:.0%}")
    a.set_ylim(0, 1.02)
    a.set_title("coverage per class")
    a.legend(fontsize=8, loc="lower right")
    b.bar(x, [per_class[c]["mean_set_size"] for c in names], color="tab:orange")
    b.set_title("mean set size per class")
    for ax in (a, b):
        ax.set_xticks(x, [c if len(c) <= 12 else c[:11] + "…" for c in names], rotation=90 if len(names) > 6 else 0,
                      fontsize=8)
    return _png(fig)


@dataclass
class TrustResult:
    """metrics.json sections (``conformal``, ``ood``) and the OOD scores behind them (report)."""

    sections: dict[str, Any] = field(default_factory=dict)
    id_scores: np.ndarray | None = None
    ood_scores: np.ndarray | None = None


def _by_method(logits: np.ndarray, z: np.ndarray, t: float, multi_label: bool = False) -> dict[str, Any]:
    """The threshold-free figures of the logit-based scores, to compare with the model's own
    (multi-label: the per-label energy only)."""
    out = {}
    for method in ("energy",) if multi_label else ("msp", "energy"):
        m = ood_metrics(score_of(method, logits, temperature=t, multi_label=multi_label),
                        score_of(method, z, temperature=t, multi_label=multi_label))
        out[method] = {"auroc": m["auroc"], "fpr95": m["fpr95"]}
    return out


def trust_metrics(predictor: Predictor, logits: np.ndarray, labels: np.ndarray, features: np.ndarray | None,
                  ood_data: Any = None, announce: bool = True, split: str | None = None,
                  splits: list[str] | None = None) -> TrustResult:
    """Conformal coverage on the evaluated images (when the model has sets; never for a
    multi-label model) and, with ``ood_data``, how its OOD score separates them from that
    data (every method's AUROC too). ``split`` (the evaluated split's name): a ``note`` in a
    section measured on the images its sets / threshold were fitted on, naming only ``splits``
    (the data's: :func:`~imgcls.engine.predictor.split_names`) as the way to a held-out one."""
    r = TrustResult()
    multi = predictor.bundle.multi_label
    c = None if multi else conformal_metrics(predictor, logits, labels, split, splits)
    if c is not None:
        r.sections["conformal"] = c
    if ood_data is None:
        return r
    trust = predictor.trust
    name, part = ood_split(predictor.bundle, ood_data, announce)
    z, _, f = predictor.run_outputs(part)
    r.id_scores, r.ood_scores = trust.scores(logits, features), trust.scores(z, f)
    t = float(trust.ood.get("temperature", predictor.bundle.temperature))
    r.sections["ood"] = {"method": trust.method, "data": name,
                         **ood_metrics(r.id_scores, r.ood_scores, trust.ood.get("threshold")),
                         "by_method": _by_method(logits, z, t, multi)}
    if trust.method not in r.sections["ood"]["by_method"]:  # a feature score: the model's own
        r.sections["ood"]["by_method"][trust.method] = {k: r.sections["ood"][k] for k in ("auroc", "fpr95")}
    if "threshold" in r.sections["ood"]:  # the accepted share is the threshold's own target there
        held_in_note(r.sections["ood"], trust.ood.get("fitted_on"), split, "unknown threshold was", splits)
    return r
