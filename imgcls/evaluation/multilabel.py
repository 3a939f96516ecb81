"""Multi-label evaluation: mAP (macro and micro), per-class AP / precision / recall / F1 at
the model's thresholds, CF1 / OF1 (the multi-label literature's per-class and overall F1,
as ML-GCN and its successors define them), exact-match ratio and Hamming loss
(scikit-learn), PR curves, and the report page.

CF1 is ``2 CP CR / (CP + CR)``, the harmonic mean of the per-class-averaged precision CP and
recall CR, and OF1 the same of the overall (pooled) OP and OR; the mean of the per-class F1
scores, a different and usually lower number, is ``macro_f1``.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.bundle import ModelBundle
from imgcls.engine.multilabel import DEFAULT_THRESHOLD


def _curve(y: np.ndarray, p: np.ndarray, points: int = 60) -> dict[str, list[float]]:
    from sklearn.metrics import precision_recall_curve

    if not y.any():
        return {"precision": [], "recall": []}
    prec, rec, _ = precision_recall_curve(y, p)
    keep = np.unique(np.linspace(0, len(prec) - 1, min(points, len(prec))).round().astype(int))
    return {"precision": prec[keep].round(5).tolist(), "recall": rec[keep].round(5).tolist()}


def harmonic(precision: float, recall: float) -> float:
    """F1 of a precision and a recall: ``2PR / (P + R)``, 0 when both are 0."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str],
                       thresholds: list[float] | None = None) -> dict[str, Any]:
    """Every multi-label figure for sigmoid probabilities ``probs`` and 0/1 ``labels`` (N, K)."""
    from sklearn.metrics import average_precision_score, hamming_loss, precision_recall_fscore_support

    y = (np.asarray(labels) > 0.5).astype(int)
    t = np.asarray(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * len(classes))
    pred = (probs >= t[None, :]).astype(int)
    have = y.any(0)
    ap = [float(average_precision_score(y[:, k], probs[:, k])) if have[k] else None for k in range(len(classes))]
    p, r, f, s = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    op, orec, of1, _ = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    n = len(y)
    eps = 1e-7
    bce = float(np.mean(-(y * np.log(np.clip(probs, eps, 1)) + (1 - y) * np.log(np.clip(1 - probs, eps, 1))))) \
        if n else 0.0
    out: dict[str, Any] = {
        "task": "multi", "num_images": int(n),
        "map_macro": float(np.mean([a for a in ap if a is not None])) if any(have) else 0.0,
        "map_micro": float(average_precision_score(y, probs, average="micro")) if y.any() else 0.0,
        "cf1": harmonic(float(np.mean(p)), float(np.mean(r))),  # of the per-class averages CP, CR
        "cp": float(np.mean(p)), "cr": float(np.mean(r)),
        "macro_f1": float(np.mean(f)),  # the per-class F1 scores, averaged (not CF1)
        "of1": float(of1), "op": float(op), "or": float(orec),  # overall: every (image, label) decision pooled
        "exact_match": float((pred == y).all(1).mean()) if n else 0.0,
        "hamming_loss": float(hamming_loss(y, pred)) if n else 0.0,
        "loss": bce, "labels_per_image": float(y.sum(1).mean()) if n else 0.0,
        "per_class": {c: {"ap": ap[k], "precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
                          "support": int(s[k]), "threshold": float(t[k])} for k, c in enumerate(classes)},
        "pr_curves": {c: _curve(y[:, k], probs[:, k]) for k, c in enumerate(classes)},
        "classes": list(classes),
    }
    return out


def format_multilabel(m: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    macro = f" (mean per-class F1 {m['macro_f1']:.4f})" if "macro_f1" in m else ""
    lines.append(f"mAP {m['map_macro']:.4f} (micro {m['map_micro']:.4f})   CF1 {m['cf1']:.4f}{macro}   OF1 {m['of1']:.4f}   "
                 f"exact match {m['exact_match']:.4f}   Hamming loss {m['hamming_loss']:.4f}   images {m['num_images']}")
    w = max(8, *(len(c) for c in m["classes"]))
    lines += ["", f"{'class':<{w}}      AP  precision  recall      F1  threshold  support"]
    for c in m["classes"]:
        pc = m["per_class"][c]
        ap = f"{pc['ap']:.4f}" if pc["ap"] is not None else "   -  "
        lines.append(f"{c:<{w}}  {ap}  {pc['precision']:9.4f}  {pc['recall']:6.4f}  {pc['f1']:.4f}  "
                     f"{pc['threshold']:9.4f}  {pc['support']:7d}")
    return "\n".join(lines)


def pr_curves_png(m: dict[str, Any]) -> bytes:
    """One precision-recall curve per class, with each class's threshold marked."""
    from imgcls.evaluation.plots import _plt, _png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for c in m["classes"]:
        curve, pc = m["pr_curves"][c], m["per_class"][c]
        if not curve["recall"]:
            continue
        line, = ax.plot(curve["recall"], curve["precision"], lw=1.3,
                        label=f"{c[:14]} (AP {pc['ap']:.3f}, t={pc['threshold']:.2f})")
        ax.plot([pc["recall"]], [pc["precision"]], "o", color=line.get_color(), ms=5)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title("precision-recall per class (dot: the class's threshold)")
    if len(m["classes"]) <= 20:
        for text in ax.legend(fontsize=7, loc="lower left").get_texts():
            text.set_parse_math(False)  # a '$' in a class name is text, not matplotlib mathtext
    return _png(fig)


def render_multilabel_html(clf: ModelBundle, run_dir: Path, m: dict[str, Any], pictures: dict[str, bytes]) -> str:
    from imgcls.evaluation.report import _CSS, _card, _img, trust_html

    e = html.escape
    cards = [_card(f"{m['map_macro']:.2%}", "mAP (macro)"), _card(f"{m['map_micro']:.2%}", "mAP (micro)"),
             _card(f"{m['cf1']:.3f}", "CF1"), _card(f"{m['of1']:.3f}", "OF1"),
             _card(f"{m['exact_match']:.2%}", "exact match"), _card(f"{m['hamming_loss']:.4f}", "Hamming loss"),
             _card(str(m["num_images"]), "images")]
    th = clf.card.get("thresholds") or {}
    rows = []
    for c in m["classes"]:
        pc = m["per_class"][c]
        ap = f"{pc['ap']:.4f}" if pc["ap"] is not None else "-"
        rows.append(f"<tr><td>{e(c)}</td><td>{ap}</td><td>{pc['precision']:.4f}</td><td>{pc['recall']:.4f}</td>"
                    f"<td>{pc['f1']:.4f}</td><td>{pc['threshold']:.4f}</td><td>{pc['support']}</td></tr>")
    how = (f"Thresholds tuned on the {e(str(th.get('fitted_on')))} split ({th.get('num_images')} images) for "
           f"<b>{e(str(th.get('target')))}</b>, stored in model.json.") if th else \
        "No tuned thresholds in model.json: 0.5 for every class."
    curves = _img(pictures["curves"], "training curves", "training-curves") if "curves" in pictures else ""
    title = f"{clf.architecture} on {m['data']} ({m['split']} split, multi-label)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(title)} · imgcls report</title><style>{_CSS}</style></head>
<body><main>
<h1>{e(title)}</h1>
<p class="sub">run <code>{e(str(run_dir))}</code> · {len(clf.classes)} labels · {m['labels_per_image']:.2f} labels
per image · report made {e(time.strftime('%Y-%m-%d %H:%M'))}</p>
<div class="cards">{''.join(cards)}</div>
<h2>Per class</h2>
<p>{how}</p>
<table id="per-class"><thead><tr><th>class</th><th>AP</th><th>precision</th><th>recall</th><th>F1</th>
<th>threshold</th><th>support</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<h2>Precision-recall curves</h2>
<div class="row"><figure>{_img(pictures['pr'], 'precision-recall curves per class', 'pr-curves')}</figure></div>
{trust_html(m, pictures)}
<h2>Training curves</h2>
{curves}
</main></body></html>
"""


def multilabel_report(clf: ModelBundle, run_dir: Path, out_dir: Path, data: Any, split: str | None,
                      batch_size: int, device: str, ood: Any = None):
    """``imgcls evaluate RUN --report`` for a multi-label model: metrics, per-class PR curves
    and thresholds (no temperature: a multi-label model's sigmoids are not calibrated by it);
    with ``ood``, the per-label OOD score's AUROC and histogram."""
    from imgcls.engine.predictor import Predictor, eval_data
    from imgcls.evaluation.plots import training_curves_png
    from imgcls.evaluation.report import Report, read_history, trust_pictures
    from imgcls.evaluation.trust import trust_metrics
    from imgcls.rundir import RunDir

    data, split, part, _ = eval_data(clf, data, split)
    with Predictor(clf, device=device, batch_size=batch_size) as p:
        logits, labels, feats = p.run_outputs(part)
        probs = p.probabilities(logits)
        trust = trust_metrics(p, logits, labels, feats, ood, split=split)
    m = multilabel_metrics(probs, labels, clf.classes, clf.thresholds)
    m["split"], m["data"] = split, data.name
    m.update(trust.sections)
    pictures = {"pr": pr_curves_png(m), **trust_pictures(trust, data.name)}
    history = read_history(run_dir / "history.csv")
    if history:
        pictures["curves"] = training_curves_png(history)
    html_path = out_dir / "report.html"
    html_path.write_text(render_multilabel_html(clf, run_dir, m, pictures), encoding="utf-8")
    json_path = out_dir / "metrics.json"
    cal = {"fitted_on": None, "note": "multi-label model: per-class thresholds instead of a temperature"}
    RunDir(json_path.parent).update_metrics(evaluation=m, thresholds=clf.card.get("thresholds"),
                                            report=str(html_path), **trust.sections)
    return Report(html_path, json_path, m, cal, [])
