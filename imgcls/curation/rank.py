"""``imgcls rank RUN UNLABELED --budget N``: the unlabelled images whose labels would help most.

Strategies (probabilities and penultimate features from the one Predictor):

* ``margin`` - smallest gap between the two most probable classes (uncertainty sampling);
* ``entropy`` - highest predictive entropy;
* ``coreset`` - k-center greedy over L2-normalised features (Sener & Savarese 2018): each pick
  is the image farthest from everything labelled or picked so far (the labelled set: a sample
  of up to ``LABELLED_SAMPLE`` of the run's training images, when its data can be loaded);
* ``hybrid`` - the ``HYBRID_POOL`` x budget most uncertain by margin, then k-center among them:
  uncertain *and* diverse (no batch of near-identical confusing images);
* ``random`` - the baseline.

The scores are one-liners and k-center greedy is a dozen lines of vectorised torch; the
active-learning libraries (modAL, baal) wrap their own models and training loops, which the
one TrainingSession already is, so they are not used.

DIR gets ``ranked.csv`` (most useful first), ``tasks.json`` (Label Studio import with the
model's predictions pre-filled), ``label_config.xml`` (the labelling interface it is for),
``ranked.html`` (thumbnails) and, for array pools, ``images/`` (the picked images as PNG, the
files the tasks point to).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgcls.api import Classifier
from imgcls.curation.gallery import as_image, write_gallery
from imgcls.data.labelstudio import label_config, task
from imgcls.data.pool import pool_split
from imgcls.data.records import Split
from imgcls.data.sources import load_data
from imgcls.engine.predictor import Predictor, softmax
from imgcls.curation import STRATEGIES
from imgcls.errors import ImgclsError

HYBRID_POOL = 10  # hybrid: k-center among this many times the budget of the most uncertain
LABELLED_SAMPLE = 2000  # coreset: labelled images whose features seed the centres
def uncertainty(probs: np.ndarray) -> dict[str, np.ndarray]:
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)
    return {"margin": margin, "entropy": entropy, "confidence": top2[:, 1]}


def k_center(feats: torch.Tensor, k: int, centres: torch.Tensor | None, first: int = 0) -> list[int]:
    """Greedy k-center: ``k`` rows of ``feats``, each the farthest from the centres so far
    (with no centres the first pick is ``first``)."""
    f = torch.nn.functional.normalize(feats.float(), dim=1)
    seeded = centres is not None and len(centres) > 0
    if seeded:
        dist = torch.cdist(f, torch.nn.functional.normalize(centres.float(), dim=1)).min(1).values
    else:
        dist = torch.full((len(f),), float("inf"))
    picked: list[int] = []
    for step in range(k):
        i = first if step == 0 and not seeded else int(dist.argmax())
        picked.append(i)
        dist = torch.minimum(dist, (f - f[i]).norm(dim=1))
        dist[i] = -1.0
    return picked


def select(strategy: str, probs: np.ndarray, feats: np.ndarray | None, budget: int, seed: int,
           labelled: np.ndarray | None) -> list[int]:
    """The ``budget`` pool indices a strategy picks, most useful first."""
    u = uncertainty(probs)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(len(probs))[:budget].tolist()
    if strategy == "margin":
        return np.argsort(u["margin"], kind="stable")[:budget].tolist()
    if strategy == "entropy":
        return np.argsort(-u["entropy"], kind="stable")[:budget].tolist()
    centres = torch.from_numpy(labelled) if labelled is not None else None
    if strategy == "coreset":
        return k_center(torch.from_numpy(feats), budget, centres, first=int(np.argmin(u["margin"])))
    cand = np.argsort(u["margin"], kind="stable")[:min(len(probs), HYBRID_POOL * budget)]
    picked = k_center(torch.from_numpy(feats[cand]), budget, centres)
    return [int(cand[i]) for i in picked]


def labelled_features(run: Path, clf: Classifier, pred: Predictor, seed: int, say) -> np.ndarray | None:
    """Features of a sample of the run's training images (None when its data is not here)."""
    from imgcls.rundir import RunDir

    spec = RunDir(run).config_values().get("data") if (run / "config.yaml").is_file() else None
    try:
        data = clf.check_classes(load_data(spec, val_split=0.0)) if spec else None
    except ImgclsError:
        data = None
    if data is None or data.train is None:
        if say:
            say("rank: the run's training data is not here; coreset/hybrid start from the pool alone")
        return None
    idx = np.sort(np.random.default_rng(seed).permutation(len(data.train))[:LABELLED_SAMPLE])
    return pred.run_outputs(data.train.subset(torch.from_numpy(idx)), skipped={}, features=True)[2]


def rank(run: str | Path, unlabeled: str | Path, budget: int, strategy: str = "hybrid", out: str | Path = "ranked",
         seed: int = 0, device: str = "auto", batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """What ``imgcls rank`` does; returns a summary (and writes DIR's files)."""
    if strategy not in STRATEGIES:
        raise ImgclsError(f"unknown --strategy '{strategy}'", f"use one of {', '.join(STRATEGIES)}")
    say = (lambda m: print(f"imgcls: {m}", file=sys.stderr, flush=True)) if progress else None
    run, out = Path(run), Path(out)
    clf = Classifier.load(run)
    if clf.multi_label:  # margin / entropy / Label Studio's one choice are for one class per image
        raise ImgclsError(f"imgcls rank is for single-label models; {run} is multi-label (a sigmoid per class)",
                          "rank with a single-label model of the data")
    pool, files = pool_split(unlabeled)
    if budget < 1 or budget > len(pool):
        raise ImgclsError(f"--budget {budget} is {'more than the' if budget > 0 else 'not in 1 ..'} {len(pool)} "
                          f"image(s) in {unlabeled}", f"use --budget between 1 and {len(pool)}")
    skipped: dict[int, str] = {}
    with Predictor(clf, device=device, batch_size=batch_size) as pred:
        logits, _, feats = pred.run_outputs(pool, skipped=skipped, features=True)
        probs = softmax(logits, clf.temperature)
        labelled = labelled_features(run, clf, pred, seed, say) if strategy in ("coreset", "hybrid") else None
    usable = np.setdiff1d(np.arange(len(pool)), np.fromiter(skipped, dtype=np.int64))
    if budget > len(usable):
        raise ImgclsError(f"--budget {budget} is more than the {len(usable)} readable image(s) in {unlabeled}",
                          f"use --budget {len(usable)} or fewer")
    picked = [int(usable[i]) for i in select(strategy, probs[usable], feats[usable], budget, seed, labelled)]
    return write_outputs(out, clf, pool, files, probs, picked, strategy, run)


def write_outputs(out: Path, clf: Classifier, pool: Split, files: list[Path] | None, probs: np.ndarray,
                  picked: list[int], strategy: str, run: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    u = uncertainty(probs)
    if files is None:  # array pool: the picked images as files, for Label Studio and the page
        (out / "images").mkdir(exist_ok=True)
        for i in picked:
            a = pool.images[i].permute(1, 2, 0).numpy()
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out / "images" / f"{i}.png")
    path_of = (lambda i: files[i]) if files is not None else (lambda i: out / "images" / f"{i}.png")
    rows, tasks = [], []
    for r, i in enumerate(picked, start=1):
        row = {"rank": r, "index": i, "path": str(path_of(i)), "predicted_label": clf.classes[int(probs[i].argmax())],
               "confidence": round(float(u["confidence"][i]), 4), "margin": round(float(u["margin"][i]), 4),
               "entropy": round(float(u["entropy"][i]), 4)}
        rows.append(row)
        tasks.append(task(path_of(i), clf.classes, probs[i].tolist(), f"imgcls:{run.name}",
                          {"rank": r, "index": i}))
    with (out / "ranked.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1), encoding="utf-8")
    (out / "label_config.xml").write_text(label_config(clf.classes), encoding="utf-8")
    cards = [{"image": as_image(pool.images, files, row["index"]),
              "lines": [("", f"#{row['rank']}  (pool {row['index']})"),
                        ("good", f"model: {row['predicted_label']} {row['confidence']:.2f}"),
                        ("", f"margin {row['margin']:.3f}")]} for row in rows]
    write_gallery(out / "ranked.html", f"Images to label next ({strategy})",
                  f"{len(rows)} of {len(pool)} unlabelled images, most useful first; import tasks.json into "
                  "Label Studio (labelling interface: label_config.xml).", cards)
    return {"strategy": strategy, "pool": len(pool), "budget": len(rows), "out": str(out),
            "files": ["ranked.csv", "tasks.json", "label_config.xml", "ranked.html"], "top": rows[:5]}
