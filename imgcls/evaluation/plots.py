"""Report pictures as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def confusion_matrix_png(cm: np.ndarray, classes: list[str], normalized: bool = False) -> bytes:
    """Rows: true class, columns: predicted. ``normalized``: each row divided by its total
    (so the diagonal is per-class recall). Numbers are written in cells up to 20 classes."""
    plt = _plt()
    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalized else cm
    k = len(classes)
    side = min(14.0, max(4.0, 0.45 * k + 2))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalized else max(shown.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(k)
    labels = [c if len(c) <= 14 else c[:13] + "…" for c in classes]
    # parse_math=False: a '$' in a class name is text, not matplotlib mathtext
    ax.set_xticks(ticks, labels, rotation=90 if k > 6 else 0, fontsize=8 if k > 15 else 10, parse_math=False)
    ax.set_yticks(ticks, labels, fontsize=8 if k > 15 else 10, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalized else " (counts)"))
    if k <= 20:
        top = shown.max() if shown.size else 1
        for i in range(k):
            for j in range(k):
                v = shown[i, j]
                ax.text(j, i, f"{v:.2f}" if normalized else f"{int(v)}", ha="center", va="center",
                        fontsize=7 if k > 12 else 9, color="white" if v > 0.6 * top else "black")
    return _png(fig)


def reliability_png(before: dict[str, Any], after: dict[str, Any] | None = None) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect
    calibration, before and (if given) after temperature scaling."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    for summary, color, name in ((before, "tab:red", "uncalibrated"), (after, "tab:blue", "temperature-scaled")):
        if summary is None:
            continue
        rel = summary["reliability"]
        edges = np.asarray(rel["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        acc = np.array([np.nan if v is None else v for v in rel["accuracy"]])
        keep = ~np.isnan(acc)
        label = f"{name} (T={summary['temperature']:.2f}, ECE {summary['ece']:.3f})"
        ax.bar(centers[keep], acc[keep], width=np.diff(edges)[keep], alpha=0.35, color=color, edgecolor=color,
               label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def training_curves_png(history: list[dict[str, float]]) -> bytes:
    """Loss and accuracy per epoch, train and validation, from history.csv rows."""
    plt = _plt()
    epochs = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((a1, "loss", "loss"), (a2, "acc", "accuracy")):
        for prefix, style in (("train_", "-o"), ("val_", "-s")):
            ys = [r.get(prefix + key) for r in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], style, ms=3, label=prefix.rstrip("_"))
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)
