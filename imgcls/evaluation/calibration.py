"""Are the probabilities honest? Expected calibration error, reliability-diagram bins and
temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017).

Temperature scaling is one scalar fitted by minimising the validation negative
log-likelihood; it never changes the predicted class, only how sure the model claims to
be. Hand-written (a dozen lines of LBFGS) rather than a dependency: the libraries that
offer it (netcal, ...) bring far more than this needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Equal-width confidence bins: per bin the count, mean confidence and accuracy."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        accuracy = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    def listed(a: np.ndarray) -> list[float | None]:  # JSON has no NaN: empty bins are null
        return [None if np.isnan(v) else round(float(v), 5) for v in a]

    return {"edges": edges.round(5).tolist(), "count": count.tolist(), "confidence": listed(mean_conf),
            "accuracy": listed(accuracy)}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of images."""
    b = reliability_bins(probs, labels, bins)
    count = np.asarray(b["count"], dtype=np.float64)
    acc = np.array([v or 0.0 for v in b["accuracy"]])
    conf = np.array([v or 0.0 for v in b["confidence"]])
    gap = np.abs(acc - conf)
    return float((gap * count).sum() / max(count.sum(), 1))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), labels). Optimised in log T so T stays
    positive; clamped to [0.05, 20] so a degenerate split cannot produce absurd values."""
    logits, labels = logits.detach().float(), labels.detach().long()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        bins: int = 15) -> dict[str, Any]:
    """ECE, NLL and reliability bins for ``logits / temperature``."""
    scaled = logits.float() / temperature
    probs = F.softmax(scaled, dim=1).numpy()
    y = labels.numpy()
    return {"temperature": round(float(temperature), 4), "ece": round(expected_calibration_error(probs, y, bins), 5),
            "nll": round(float(F.cross_entropy(scaled, labels)), 5),
            "mean_confidence": round(float(probs.max(1).mean()), 5),
            "accuracy": round(float((probs.argmax(1) == y).mean()), 5),
            "reliability": reliability_bins(probs, y, bins)}


def temperature_scaling(val_logits: torch.Tensor, val_labels: torch.Tensor) -> tuple[float, dict[str, Any]]:
    """Fit the temperature on validation logits; ECE/NLL on that split before and after."""
    t = fit_temperature(val_logits, val_labels)
    before = calibration_summary(val_logits, val_labels, 1.0)
    after = calibration_summary(val_logits, val_labels, t)
    return t, {"fitted_on": "val", "num_images": int(len(val_labels)), "temperature": round(t, 4),
               "val_ece_before": before["ece"], "val_ece_after": after["ece"],
               "val_nll_before": before["nll"], "val_nll_after": after["nll"]}
