"""``imgcls label-issues DATA``: the training labels that are probably wrong.

1. Out-of-fold predicted probabilities by K-fold cross-validation (engine/crossval.py): with
   a frozen pretrained backbone (``--freeze backbone`` + ``--weights``/``--pretrained``) the
   features are extracted once and a linear head trains per fold (seconds); otherwise a model
   per fold trains through the TrainingSession (the recipe of the data; resolved on the whole
   set: for MNIST the fast recipe's one epoch of the reference CNN, on each 48,000-image fold).
   ``--group-by`` keeps each group inside one fold.
2. Confident learning: cleanlab's ``find_label_issues`` (the field's standard package)
   flags the samples, ranked by self-confidence (the out-of-fold probability of the given
   label), most suspicious first.

``issues.csv``: ``index`` (row of ``x_train`` for arrays; position in the training file list,
class folder by class folder, for files), ``path`` (files only), ``given_label``,
``suggested_label``, ``score`` (cleanlab's label quality: the out-of-fold probability of the
given label; lower is more suspicious). ``issues.html`` beside it shows the top issues.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.api import Classifier
from imgcls.config import TrainConfig
from imgcls.curation.gallery import as_image, write_gallery
from imgcls.data.cache import decoded_split
from imgcls.data.groups import folds as make_folds
from imgcls.data.groups import group_of
from imgcls.data.pipeline import require_train
from imgcls.data.records import ImageData
from imgcls.data.sources import load_data
from imgcls.engine.crossval import oof_by_training, oof_from_features
from imgcls.engine.recipes import resolve_recipe
from imgcls.errors import ImgclsError
from imgcls.runs import recipe_context

GALLERY_MAX = 200  # issues shown as thumbnails


def _need_cleanlab():
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise ImgclsError("label-issues needs the cleanlab package", "pip install 'imgcls[curation]'") from None
    return find_label_issues, get_label_quality_scores


def refuse_multi_label(data: ImageData, source: Any) -> None:
    """Confident learning here ranks one given class per image: label sets (multi-hot rows)
    are refused before any fold trains."""
    if data.multi_label:
        raise ImgclsError(f"label-issues supports single-label data; {source} has label sets (multi-label)",
                          "check a multi-label set's labels class by class, or give single-label data")


def check_folds(data: ImageData, k: int) -> None:
    """K-fold needs every class in every fold: refuse ``k`` above the smallest class."""
    if k < 2:
        raise ImgclsError(f"--folds {k} is too few", "use --folds 2 or more (5 is usual)")
    counts = data.train.class_counts(data.num_classes)
    small = int(np.argmin(counts))
    if counts[small] < k:
        raise ImgclsError(f"--folds {k} is more than the {counts[small]} training image(s) of class "
                          f"'{data.classes[small]}'", f"use --folds {max(2, counts[small])} or fewer, or add images")


def out_of_fold(cfg: TrainConfig, data: ImageData, k: int, say) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities and the indices (into ``data.train``) they belong to."""
    groups = group_of(data, data.train, cfg.group_by) if cfg.group_by else None
    fast = cfg.freeze == "backbone" and bool(cfg.pretrained or cfg.weights)
    if not fast:
        folds = make_folds(data.train.labels, k, cfg.seed, groups)
        probs, bad = oof_by_training(lambda part: Classifier.from_config(cfg, part), data, cfg, folds, say)
        keep = np.setdiff1d(np.arange(len(data.train)), np.asarray(bad, dtype=np.int64))
        return probs[keep], keep
    clf = Classifier.from_config(cfg, data)
    split, keep = data.train, np.arange(len(data.train))
    if not split.in_memory:  # decode once (through the cache); unreadable files are left out
        d = decoded_split(split, clf.preprocessing, cache=cfg.cache, workers=cfg.workers, progress=say is not None)
        pos = {str(p): i for i, p in enumerate(split.paths)}
        keep = np.asarray([pos[str(p)] for p in d.paths], dtype=np.int64)
        split = d.split
    sub_groups = [groups[i] for i in keep] if groups is not None else None
    folds = make_folds(split.labels, k, cfg.seed, sub_groups)
    return oof_from_features(clf, split, cfg, folds, say), keep


def find_issues(cfg: TrainConfig | dict[str, Any], folds: int = 5, out: str | Path = "issues.csv",
                progress: bool = True) -> dict[str, Any]:
    """What ``imgcls label-issues`` does; returns the summary (also what ``audit --labels`` shows)."""
    find_label_issues, quality = _need_cleanlab()
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    if not cfg.data:
        raise ImgclsError("no data given", "pass DATA (a folder, CSV manifest, .npz or data set name)")
    t0 = time.perf_counter()
    say = (lambda m: print(f"imgcls: {m}", file=sys.stderr, flush=True)) if progress else None
    data = require_train(load_data(cfg.data, val_split=0.0, classes=cfg.classes))
    data = dataclasses.replace(data, val=None, test=None)  # the training labels are the ones checked
    refuse_multi_label(data, cfg.data)
    check_folds(data, folds)
    cfg = resolve_recipe(cfg, recipe_context(cfg, data))
    probs, keep = out_of_fold(cfg, data, folds, say)
    labels = data.train.labels.numpy()[keep]
    # n_jobs=1: cleanlab's default forks a multiprocessing Pool, which deadlocked at its exit in a
    # process that already runs torch and server threads (seen in the test suite); one process
    # ranks 60,000 rows x 10 classes in 0.13 s
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    scores = quality(labels, probs, method="self_confidence")
    rows = [{"index": int(keep[j]), "path": str(data.train.paths[keep[j]]) if data.train.paths else "",
             "given_label": data.classes[labels[j]], "suggested_label": data.classes[int(probs[j].argmax())],
             "score": round(float(scores[j]), 4)} for j in ranked]
    out = Path(out)
    write_csv(out, rows, files=data.train.paths is not None)
    summary = summarise(data, rows, len(keep), folds, cfg, time.perf_counter() - t0)
    summary["csv"], summary["html"] = str(out), str(gallery(out.with_suffix(".html"), data, rows, summary))
    accuracy = float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0
    summary["out_of_fold_accuracy"] = round(accuracy, 4)
    return summary


def write_csv(path: Path, rows: list[dict[str, Any]], files: bool) -> None:
    cols = ["index", "path", "given_label", "suggested_label", "score"] if files else \
        ["index", "given_label", "suggested_label", "score"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def summarise(data: ImageData, rows: list[dict[str, Any]], checked: int, folds: int, cfg: TrainConfig,
              seconds: float) -> dict[str, Any]:
    per_class: dict[str, int] = {c: 0 for c in data.classes}
    for r in rows:
        per_class[r["given_label"]] += 1
    return {"data": data.name, "images_checked": checked, "issues": len(rows),
            "share": round(len(rows) / max(1, checked), 4), "folds": folds,
            "model": cfg.model if isinstance(cfg.model, str) else "layer list",
            "fast_path": cfg.freeze == "backbone" and bool(cfg.pretrained or cfg.weights),
            "issues_per_given_class": per_class, "top": rows[:10], "seconds": round(seconds, 1)}


def gallery(path: Path, data: ImageData, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    imgs, paths = data.train.images, data.train.paths
    cards = [{"image": as_image(imgs, paths, r["index"]),
              "lines": [("", f"#{r['index']}  score {r['score']:.3f}"), ("bad", f"given: {r['given_label']}"),
                        ("good", f"suggested: {r['suggested_label']}")]
              + ([("path", Path(r["path"]).name)] if r["path"] else [])} for r in rows[:GALLERY_MAX]]
    intro = (f"{summary['issues']} of {summary['images_checked']} training labels look wrong "
             f"({100 * summary['share']:.1f}%), most suspicious first"
             + (f"; the first {GALLERY_MAX} shown" if len(rows) > GALLERY_MAX else "") + ".")
    return write_gallery(path, f"Label issues: {data.name}", intro, cards)


ISSUES_COLUMNS = ("index", "given_label", "suggested_label", "score")  # and "path", for files
_NOT_OURS = "give the issues.csv that imgcls label-issues wrote for this data, or --labels alone to run it"


def read_summary(csv_path: str | Path, data: ImageData | None = None) -> dict[str, Any]:
    """The summary of an existing issues.csv (``imgcls audit DATA --labels issues.csv``);
    with ``data``, the CSV must have been written for it (its classes, its files)."""
    path = Path(csv_path)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    except OSError as exc:
        raise ImgclsError(f"cannot read {path}: {exc.strerror}", "give the CSV that imgcls label-issues wrote") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImgclsError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc})", _NOT_OURS) from None
    missing = [c for c in ISSUES_COLUMNS if c not in columns]
    if missing:
        raise ImgclsError(f"{path} is not an imgcls label-issues CSV: no {', '.join(missing)} column(s) "
                          f"(its header: {','.join(columns) or 'none'})", _NOT_OURS)
    if data is not None:
        check_rows_belong(rows, path, data)
    per_class: dict[str, int] = {}
    for r in rows:
        per_class[r["given_label"]] = per_class.get(r["given_label"], 0) + 1
    return {"csv": str(path), "issues": len(rows), "issues_per_given_class": per_class, "top": rows[:10]}


def check_rows_belong(rows: list[dict[str, Any]], path: Path, data: ImageData) -> None:
    """Refuse an issues.csv written for another data set: a given label that is not one of
    ``data``'s classes, a file that is not in its training split, an index past its end."""
    train = data.train
    label = next((r["given_label"] for r in rows if r["given_label"] not in set(data.classes)), None)
    if label is not None:
        raise ImgclsError(f"{path} was written for other data: given label '{label}' is not a class of "
                          f"{data.name} ({', '.join(data.classes[:10])})", _NOT_OURS)
    n = len(train) if train is not None else 0
    bad = next((r["index"] for r in rows if not r["index"].isdigit() or int(r["index"]) >= n), None)
    if bad is not None:
        raise ImgclsError(f"{path} was written for other data: index {bad} is not a training image of "
                          f"{data.name} ({n} images)", _NOT_OURS)
    listed = [r["path"] for r in rows if r.get("path")]
    if not listed:
        return
    ours = {str(p) for p in (train.paths or [])} if train is not None else set()
    strange = [p for p in listed if p not in ours]
    if strange:  # the same files, spelled another way (relative / absolute, links)?
        real = {os.path.realpath(p) for p in ours}
        strange = [p for p in strange if os.path.realpath(p) not in real]
    if strange:
        raise ImgclsError(f"{path} was written for other data: {strange[0]} is not a training file of "
                          f"{data.name}", _NOT_OURS)


__all__ = ["find_issues", "read_summary", "check_folds"]
