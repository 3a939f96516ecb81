"""``imgcls evaluate RUN --data DATA --report``: one self-contained report.html (every
picture embedded as base64, no scripts, no external files: it opens offline and can be
mailed) plus metrics.json with the same numbers.

Sections: headline metrics, per-class table, confusion matrix (counts and row-normalised),
calibration (ECE, reliability diagram, temperature fitted on the run's own validation
split - only when the data is the run's training data - and saved into model.json), the
most confident mistakes with Grad-CAM overlays, and the training curves from history.csv.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imgcls.bundle import ModelBundle
from imgcls.engine.predictor import Predictor, eval_data, split_names
from imgcls.errors import ImgclsError
from imgcls.rundir import RunDir
from imgcls.evaluation.calibration import calibration_summary, temperature_scaling
from imgcls.evaluation.metrics import classification_metrics, number
from imgcls.evaluation.plots import confusion_matrix_png, reliability_png, training_curves_png
from imgcls.evaluation.trust import TrustResult, conformal_png, fitted_here, ood_histogram_png, trust_metrics


@dataclass
class Report:
    html_path: Path
    json_path: Path
    metrics: dict[str, Any]
    calibration: dict[str, Any]
    mistakes: list[dict[str, Any]]


# ---------------------------------------------------------------------- pieces
def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(row)
    return rows


def _thumb(e: Any, height: int = 128) -> bytes:
    """Original | Grad-CAM overlay, side by side, small pictures enlarged without blur."""
    a, b = e.image, e.overlay
    scale = height / a.height
    size = (max(1, round(a.width * scale)), height)
    resample = Image.NEAREST if a.height < height else Image.BILINEAR
    pair = Image.new("RGB", (2 * size[0] + 4, height), "white")
    pair.paste(a.resize(size, resample), (0, 0))
    pair.paste(b.resize(size, resample), (size[0] + 4, 0))
    buf = io.BytesIO()
    pair.save(buf, format="PNG")
    return buf.getvalue()


def confident_mistakes(clf: ModelBundle, part: Any, probs: np.ndarray, labels: np.ndarray, n: int,
                       method: str = "gradcam", split_name: str = "",
                       sources: list[str] | None = None) -> list[dict[str, Any]]:
    """The ``n`` wrong predictions the model was surest of, each with an explanation of the
    (wrong) predicted class. ``sources``: the file of each row of a decoded (in-memory)
    ``part`` (``Split.sources``, set by the decode pass): the gallery then names and explains the files themselves."""
    from imgcls.explain import explain

    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    if not len(wrong):
        return []
    sub = part.subset(torch.from_numpy(wrong))
    if not sub.in_memory:
        images, sources = [str(p) for p in sub.paths], [str(p) for p in sub.paths]
    elif sources is not None and len(sources) == len(part):
        sources = [sources[i] for i in wrong]
        images = sources if all(Path(s).is_file() for s in sources) else sub.images.numpy()
    else:
        images, sources = sub.images.numpy(), [f"{split_name} image #{i}" for i in wrong]
    try:
        exps = explain(clf, images, method=method)
    except ImgclsError as exc:  # e.g. an architecture without a spatial layer: list the mistakes anyway
        exps, note = [None] * len(wrong), exc.oneline()
    else:
        note = ""
    out = []
    for i, src, e in zip(wrong, sources, exps):
        item = {"index": int(i), "source": src, "true": clf.classes[int(labels[i])],
                "predicted": clf.classes[int(pred[i])], "confidence": round(float(probs[i, pred[i]]), 5)}
        if e is not None:
            item["png"] = _thumb(e)
            item["faithfulness"] = {k: e.faithfulness[k] for k in ("deletion_auc", "random_deletion_auc",
                                                                   "insertion_auc", "random_insertion_auc")}
        elif note:
            item["note"] = note
        out.append(item)
    return out


# ---------------------------------------------------------------------- the report
def trained_on(run: RunDir, card: dict[str, Any], spec: Any) -> bool:
    """Whether ``spec`` names the data the run trained on (config.yaml's ``data``, else the
    card's): only there is the validation split the run's own held-out images. The same
    path (resolved) or dataset name; anything else (another folder, a subset .npz, arrays,
    an ImageData) is other data."""
    from imgcls.export.parity import data_spec

    if not isinstance(spec, (str, Path)):
        return False
    try:
        trained = data_spec(run.path, card, None)
    except ImgclsError:
        return False
    a, b = Path(str(spec)).expanduser(), Path(trained).expanduser()
    if a.exists() or b.exists():
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return str(spec).strip().lower() == trained.strip().lower()


def _calibrate(clf: ModelBundle, run: RunDir, predictor: Predictor, spec: Any, data: Any, split: str,
               evaluated: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Temperature scaling on the run's own validation split (the training data's, else held
    out of it as in training), saved into model.json; the bundle's temperature is updated.
    Other data is never fitted on here: viewing a report must not change later predictions."""
    if not trained_on(run, clf.card, spec):
        return {"fitted_on": None, "temperature": clf.temperature,
                "note": f"{data.name} is not the data the run trained on, whose validation split is the one fitted "
                        f"on here: temperature left as it was (`imgcls calibrate {run.path} --data DATA` fits one "
                        "on held-out images of DATA)"}
    if split == "val":
        val = evaluated
    else:
        part = data.val
        if part is None or not len(part):
            try:
                _, _, part, _ = eval_data(clf, spec, "val", announce=False)
            except ImgclsError:
                part = None
        if part is None or not len(part):
            return {"fitted_on": None, "temperature": clf.temperature,
                    "note": "the data has no validation split: temperature left as it was"}
        val = tuple(torch.from_numpy(a) for a in predictor.run(part))
    t, calibration = temperature_scaling(*val)
    clf.temperature = t
    run.update_card(temperature=round(float(t), 6), calibration=calibration)
    return calibration


def _optimistic_note(calibration: dict[str, Any], fitted_on: str | None, split: str) -> None:
    """The caveat of an 'after' ECE measured on images that include those the temperature was fitted on."""
    if not fitted_here(fitted_on, split):
        return
    where = "the same split" if fitted_on == split else f"the {split} images, which include them"
    note = f"fitted on the {fitted_on} split and measured on {where}: the 'after' ECE is optimistic"
    calibration["note"] = f"{calibration['note']}; {note}" if calibration.get("note") else note


def build_report(run_dir: str | Path, data: Any, split: str | None = None, out_dir: str | Path | None = None,
                 batch_size: int = 256, device: str = "auto", mistakes: int = 8,
                 calibrate_on_val: bool = True, ood: Any = None) -> Report:
    run = RunDir(run_dir)
    clf = ModelBundle.load(run.path)
    out_dir = Path(out_dir) if out_dir else run.path
    out_dir.mkdir(parents=True, exist_ok=True)
    if clf.multi_label:  # label sets: mAP, PR curves and thresholds instead of confusion / temperature
        from imgcls.evaluation.multilabel import multilabel_report

        return multilabel_report(clf, run.path, out_dir, data, split, batch_size, device, ood)
    spec = data
    data, split, part, _ = eval_data(clf, data, split)
    with Predictor(clf, device=device, batch_size=batch_size) as p:
        z, y, feats = p.run_outputs(part)
        # data evaluated whole ("all") has no other split; its "test" is the whole of it
        trust = trust_metrics(p, z, y, feats, ood, split=split, splits=split_names(data) if split != "all" else [])
        logits, labels = torch.from_numpy(z), torch.from_numpy(y)
        calibration = _calibrate(clf, run, p, spec, data, split, (logits, labels)) if calibrate_on_val \
            else {"fitted_on": None, "temperature": clf.temperature}
    t = clf.temperature
    before = calibration_summary(logits, labels, 1.0)
    after = calibration_summary(logits, labels, t)
    calibration.update({"split": split, "ece_before": before["ece"], "ece_after": after["ece"],
                        "nll_before": before["nll"], "nll_after": after["nll"],
                        "reliability_before": before["reliability"], "reliability_after": after["reliability"]})
    fitted_on = calibration.get("fitted_on")
    if fitted_on is None and trained_on(run, clf.card, spec):  # not refitted: the card's own fit, if any
        fitted_on = (clf.card.get("calibration") or {}).get("fitted_on")
    _optimistic_note(calibration, fitted_on, split)

    m = classification_metrics(logits / t, labels, clf.classes)
    m["split"], m["data"] = split, data.name
    m.update(trust.sections)
    probs = F.softmax(logits / t, dim=1).numpy()
    gallery = confident_mistakes(clf, part, probs, labels.numpy(), mistakes, split_name=split,
                                 sources=part.sources) if mistakes else []
    history = read_history(run.path / "history.csv")
    cm = np.asarray(m["confusion_matrix"])
    pictures = {
        "confusion_counts": confusion_matrix_png(cm, clf.classes),
        "confusion_normalized": confusion_matrix_png(cm, clf.classes, normalized=True),
        "reliability": reliability_png(before, after if t != 1.0 else None),
    }
    if history:
        pictures["curves"] = training_curves_png(history)
    pictures.update(trust_pictures(trust, data.name))

    html_path = out_dir / "report.html"
    html_path.write_text(render_html(clf, run.path, m, calibration, gallery, pictures, history), encoding="utf-8")
    json_path = out_dir / "metrics.json"
    RunDir(json_path.parent).update_metrics(evaluation=m, calibration=calibration, **trust.sections,
                        mistakes=[{k: v for k, v in g.items() if k != "png"} for g in gallery],
                        report=str(html_path))
    return Report(html_path, json_path, m, calibration, gallery)


def trust_pictures(trust: TrustResult, id_name: str) -> dict[str, bytes]:
    pictures = {}
    c, o = trust.sections.get("conformal"), trust.sections.get("ood")
    if c:
        pictures["conformal"] = conformal_png(c["per_class"], c["target_coverage"])
    if o and trust.id_scores is not None:
        pictures["ood"] = ood_histogram_png(trust.id_scores, trust.ood_scores, o["method"], id_name, o["data"],
                                            o.get("threshold"))
    return pictures


def _note(section: dict[str, Any]) -> str:
    """A trust section's caveat (e.g. measured on the split it was fitted on), or ''."""
    return f' <span class="note">{html.escape(section["note"])}</span>' if section.get("note") else ""


def trust_html(m: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """The report's conformal-set and unknown-rejection section ('' when it has neither)."""
    e, parts = html.escape, []
    if "conformal" in m:
        c = m["conformal"]
        parts.append(f"<p>Conformal prediction sets ({e(str(c['method']))}, target coverage "
                     f"{c['target_coverage']:.0%}): the true class was in the set for <b>{c['coverage']:.2%}</b> "
                     f"of these {c['num_images']} images; mean set size <b>{c['mean_set_size']:.2f}</b>"
                     f" ({c['empty_sets']} empty).{_note(c)}</p>"
                     f'<figure>{_img(pictures["conformal"], "conformal coverage and set size per class", "conformal")}'
                     "</figure>")
    if "ood" in m:
        o = m["ood"]
        at = (f" At the stored threshold {o['id_accepted']:.1%} of these images are accepted and "
              f"{o['ood_rejected']:.1%} of {e(o['data'])} answered unknown." if "threshold" in o else "")
        others = ", ".join(f"{k} {v['auroc']:.4f}" for k, v in o.get("by_method", {}).items())
        parts.append(f"<p>Unknown rejection ({e(o['method'])} score) against {e(o['data'])}: AUROC "
                     f"<b>{o['auroc']:.4f}</b>, FPR at 95% TPR <b>{o['fpr95']:.4f}</b>.{at} AUROC by method: "
                     f"{e(others)}.{_note(o)}</p>"
                     f'<figure>{_img(pictures["ood"], "OOD score histogram", "ood-histogram")}</figure>')
    return "<h2>Trust: prediction sets and unknowns</h2>" + "".join(parts) if parts else ""


# ---------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px} h2{font-size:1.2rem;margin:32px 0 8px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
.sub{color:#5b6673;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:1.4rem} .card span{color:#5b6673;font-size:.8rem}
table{border-collapse:collapse;background:#fff;font-size:.9rem} th,td{border:1px solid #d8dde3;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left} thead th{background:#eef1f4}
.low{background:#fde8e8} img{max-width:100%;height:auto;background:#fff;border:1px solid #d8dde3;border-radius:6px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} .row>figure{margin:0;flex:1 1 420px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.gallery figure{margin:0;background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:8px}
figcaption{font-size:.8rem;color:#3a434d;margin-top:4px;overflow-wrap:anywhere} .note{color:#8a5a00;font-size:.85rem}
"""


def _img(png: bytes, alt: str, id_: str = "") -> str:
    ident = f' id="{id_}"' if id_ else ""
    return f'<img{ident} alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def render_html(clf: ModelBundle, run_dir: Path, m: dict[str, Any], cal: dict[str, Any], gallery: list[dict[str, Any]],
                pictures: dict[str, bytes], history: list[dict[str, float]]) -> str:
    e = html.escape
    cards = [_card(f"{m['accuracy']:.2%}", "accuracy")]
    cards += [_card(f"{m[k]:.2%}", k.replace("_accuracy", " accuracy")) for k in sorted(m)
              if k.startswith("top") and k.endswith("_accuracy")]
    cards += [_card(f"{m['macro_avg']['f1']:.3f}", "macro F1"), _card(f"{m['weighted_avg']['f1']:.3f}", "weighted F1"),
              _card(f"{cal['ece_after']:.3f}", f"ECE (T={cal['temperature']:.2f})"), _card(str(m["num_images"]), "images")]
    rows = []
    for c in m["classes"]:
        pc = m["per_class"][c]
        low = ' class="low"' if pc["f1"] is not None and pc["f1"] < m["macro_avg"]["f1"] - 0.1 else ""
        rows.append(f"<tr{low}><td>{e(c)}</td><td>{number(pc['precision'])}</td><td>{number(pc['recall'])}</td>"
                    f"<td>{number(pc['f1'])}</td><td>{pc['support']}</td></tr>")
    for avg in ("macro", "weighted"):
        a = m[f"{avg}_avg"]
        rows.append(f"<tr><th>{avg} avg</th><th>{a['precision']:.4f}</th><th>{a['recall']:.4f}</th>"
                    f"<th>{a['f1']:.4f}</th><th>{m['num_images']}</th></tr>")
    over = m["macro_avg"].get("classes", len(m["classes"]))
    macro_note = (f'<p class="note">&mdash;: undefined (no images of that class). Macro averages over the {over} '
                  f'of {len(m["classes"])} classes with images or predictions here.</p>'
                  if any(m["per_class"][c]["support"] == 0 for c in m["classes"]) else "")
    cal_text = (f"Temperature <b>{cal['temperature']:.3f}</b>"
                + (f" fitted on the validation split ({cal.get('num_images')} images) and saved in model.json; "
                   f"validation ECE {cal['val_ece_before']:.4f} &rarr; {cal['val_ece_after']:.4f}."
                   if cal.get("fitted_on") else " (not refitted).")
                + f" On this {e(m['split'])} split: ECE {cal['ece_before']:.4f} &rarr; {cal['ece_after']:.4f}, "
                  f"NLL {cal['nll_before']:.4f} &rarr; {cal['nll_after']:.4f}. Predicted classes are unchanged.")
    note = f'<p class="note">{e(cal["note"])}</p>' if cal.get("note") else ""
    figs = []
    for g in gallery:
        f = g.get("faithfulness")
        faith = (f"<br>Grad-CAM deletion AUC {f['deletion_auc']:.3f} (random {f['random_deletion_auc']:.3f}), "
                 f"insertion {f['insertion_auc']:.3f} (random {f['random_insertion_auc']:.3f})") if f else ""
        pic = _img(g["png"], f"{g['source']}: Grad-CAM for {g['predicted']}") if "png" in g else \
            f'<p class="note">{e(g.get("note", ""))}</p>'
        figs.append(f"<figure>{pic}<figcaption><b>true {e(g['true'])}</b>, predicted {e(g['predicted'])} "
                    f"({g['confidence']:.1%})<br>{e(g['source'])}{faith}</figcaption></figure>")
    gallery_html = (f'<div class="gallery">{"".join(figs)}</div>' if figs else "<p>No mistakes on this split.</p>")
    curves = _img(pictures["curves"], "training curves", "training-curves") if "curves" in pictures else \
        '<p class="note">No history.csv in the run folder.</p>'
    training = clf.card.get("training", {})
    title = f"{clf.architecture} on {m['data']} ({m['split']} split)"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(title)} · imgcls report</title><style>{_CSS}</style></head>
<body><main>
<h1>{e(title)}</h1>
<p class="sub">run <code>{e(str(run_dir))}</code> · {len(clf.classes)} classes · trained {training.get('epochs_run', '?')}
epoch(s) on {e(str(training.get('data', '?')))} · report made {e(time.strftime('%Y-%m-%d %H:%M'))} by imgcls
{e(str(clf.card.get('versions', {}).get('imgcls', '')))}</p>
<div class="cards">{''.join(cards)}</div>
<h2>Per class</h2>
<table id="per-class"><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>{macro_note}
<h2>Confusion matrix</h2>
<div class="row"><figure>{_img(pictures['confusion_counts'], 'confusion matrix (counts)', 'confusion-matrix')}</figure>
<figure>{_img(pictures['confusion_normalized'], 'confusion matrix (row-normalised)', 'confusion-matrix-normalized')}</figure></div>
<h2>Calibration</h2>
<p>{cal_text}</p>{note}
<div class="row"><figure>{_img(pictures['reliability'], 'reliability diagram', 'reliability-diagram')}</figure></div>
{trust_html(m, pictures)}
<h2>Most confident mistakes</h2>
<p class="sub">Original and Grad-CAM for the predicted (wrong) class: what the model looked at when it went wrong.</p>
{gallery_html}
<h2>Training curves</h2>
{curves}
</main></body></html>
"""
