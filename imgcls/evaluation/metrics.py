"""Classification metrics from logits: accuracy, top-k, per-class precision / recall /
F1, confusion matrix, and a readable text rendering."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def topk_ks(num_classes: int) -> list[int]:
    """Top-k figures worth reporting: k in (3, 5) with k < number of classes."""
    return [k for k in (3, 5) if k < num_classes]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    k = len(classes)
    y = labels.numpy().astype(np.int64)
    pred = logits.argmax(1).numpy().astype(np.int64)
    out: dict[str, Any] = {
        "num_images": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "loss": float(F.cross_entropy(logits, labels)) if len(y) else 0.0,
    }
    for kk in topk_ks(k):
        top = logits.topk(kk, dim=1).indices
        out[f"top{kk}_accuracy"] = float((top == labels[:, None]).any(1).float().mean())
    cm = confusion(y, pred, k)
    p, r, f, s = prf_from_confusion(cm)
    predicted = cm.sum(0)
    # a class with no images has no recall, and no precision either when nothing was
    # predicted as it: null ("—"), not 0 (on a class subset those zeros read as failures)
    out["per_class"] = {c: {"precision": float(p[i]) if s[i] or predicted[i] else None,
                            "recall": float(r[i]) if s[i] else None,
                            "f1": float(f[i]) if s[i] or predicted[i] else None,
                            "support": int(s[i])} for i, c in enumerate(classes)}
    weights = s / s.sum() if s.sum() else np.zeros_like(p)
    # macro: the mean over the classes with images or predictions (scikit-learn's default
    # label set, unique_labels(y_true, y_pred)); classes absent from both do not count
    seen = (s > 0) | (predicted > 0)
    mean = (lambda a: float(a[seen].mean())) if seen.any() else (lambda a: 0.0)  # noqa: E731
    out["macro_avg"] = {"precision": mean(p), "recall": mean(r), "f1": mean(f), "classes": int(seen.sum())}
    out["weighted_avg"] = {"precision": float(p @ weights), "recall": float(r @ weights), "f1": float(f @ weights)}
    out["confusion_matrix"] = cm.tolist()
    out["classes"] = list(classes)
    return out


# Confusion matrix and precision / recall / F1 in numpy rather than scikit-learn's
# confusion_matrix + precision_recall_fscore_support: the same figures (zero_division=0;
# macro = unweighted mean over the classes with images or predictions, as scikit-learn's
# without ``labels=``; weighted = weighted by support; tests/test_metrics.py
# checks them against scikit-learn), without importing scikit-learn (1-2 s on 2 cores) at the
# end of every `imgcls train` and `evaluate`.
def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts, rows true class, columns predicted; labels outside 0..k-1 are left out."""
    ok = (y >= 0) & (y < k) & (pred >= 0) & (pred < k)
    return np.bincount(y[ok] * k + pred[ok], minlength=k * k).reshape(k, k)


def prf_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support (0 where undefined, as zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0), cm.sum(1)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p, r, f, support


def number(v: float | None) -> str:
    """A precision / recall / F1 for a table: four decimals, or "—" where it is undefined."""
    return "—" if v is None else f"{v:.4f}"


def format_metrics(m: dict[str, Any], title: str = "") -> str:
    """A plain-text report: headline numbers, per-class table and confusion matrix."""
    lines = []
    if title:
        lines.append(title)
    head = f"accuracy {m['accuracy']:.4f}"
    for key in sorted(k for k in m if k.startswith("top") and k.endswith("_accuracy")):
        head += f"   {key.replace('_accuracy', '')} {m[key]:.4f}"
    head += f"   loss {m['loss']:.4f}   images {m['num_images']}"
    lines.append(head)
    classes = m["classes"]
    w = max([len("weighted avg"), *(len(c) for c in classes)])  # the widest row name, so the columns line up
    lines.append("")
    lines.append(f"{'class':<{w}}  precision  recall  {'f1':>6}  support")
    for c in classes:
        pc = m["per_class"][c]
        lines.append(f"{c:<{w}}  {number(pc['precision']):>9}  {number(pc['recall']):>6}  {number(pc['f1']):>6}  "
                     f"{pc['support']:7d}")
    for avg in ("macro", "weighted"):
        a = m[f"{avg}_avg"]
        lines.append(f"{avg + ' avg':<{w}}  {a['precision']:9.4f}  {a['recall']:6.4f}  {a['f1']:6.4f}  "
                     f"{m['num_images']:7d}")
    if any(m["per_class"][c]["support"] == 0 for c in classes):
        over = m["macro_avg"].get("classes", len(classes))
        lines.append(f"(—: undefined, no images of that class; macro avg over the {over} of {len(classes)} classes "
                     "with images or predictions)")
    cm = np.asarray(m["confusion_matrix"])
    if len(classes) <= 30:
        lines.append("")
        lines.append("confusion matrix (rows: true, columns: predicted)")
        cw = max(5, len(str(cm.max())) + 1 if cm.size else 5)
        short = [c[: cw - 1] for c in classes]
        lines.append(" " * (w + 1) + "".join(f"{s:>{cw}}" for s in short))
        for c, row in zip(classes, cm):
            lines.append(f"{c:<{w}} " + "".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)
