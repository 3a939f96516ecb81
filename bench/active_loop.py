"""A simulated active-learning loop: train -> rank -> "label" (the true labels play the
annotator) -> train again, for several strategies against random selection.

Each round trains a fresh model on the labelled images (the Python API: ``Classifier.fit``,
the one TrainingSession), scores the rest of the training set with the one Predictor
(probabilities + penultimate features) and adds the ``--add`` images the strategy picks
(``imgcls.curation.rank.select``, what ``imgcls rank`` runs). Test accuracy per round.

    flock /tmp/imgcls-heavy.lock python bench/active_loop.py --data mnist --start 1000 --add 1000 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _common import default_data, machine  # noqa: E402

from imgcls.api import Classifier  # noqa: E402
from imgcls.curation.rank import LABELLED_SAMPLE, select  # noqa: E402
from imgcls.data.records import Split  # noqa: E402
from imgcls.data.sources import from_npz  # noqa: E402
from imgcls.engine.predictor import Predictor, softmax  # noqa: E402


def one_round(data, labelled: np.ndarray, args) -> tuple[Classifier, float]:
    tr = data.train
    x = tr.images[torch.from_numpy(labelled)]
    y = tr.labels[torch.from_numpy(labelled)]
    clf = Classifier.create(args.model, classes=data.classes, in_chans=tr.images.shape[1],
                            img_size=tr.images.shape[-1], seed=args.seed)
    hwc = x.permute(0, 2, 3, 1).numpy()
    arrays = {"x_train": hwc.squeeze(-1) if x.shape[1] == 1 else hwc, "y_train": y.numpy(),
              "class_names": data.classes}
    clf.fit(arrays, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, val_split=0.1,
            augment="light", hflip=tr.images.shape[1] == 3, progress=False)
    m = clf.evaluate(dataclasses.replace(data, train=None, val=None), announce=False)  # the test split
    return clf, float(m["accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--strategies", nargs="+", default=["random", "margin", "hybrid"])
    ap.add_argument("--start", type=int, default=1000)
    ap.add_argument("--add", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="reference_cnn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="the JSON file (default bench/results/active_loop_DATA.json)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images (smoke test)")
    args = ap.parse_args()
    data = from_npz(default_data(f"{args.data}.npz"))
    if args.limit:
        data.train = data.train.subset(torch.arange(args.limit))
        data.test = data.test.subset(torch.arange(min(args.limit, len(data.test))))
    n = len(data.train)
    start = np.sort(np.random.default_rng(args.seed).permutation(n)[:args.start])
    result = {"bench": f"active_loop_{args.data}", "machine": machine(), "args": vars(args), "strategies": {}}
    first = None  # round 0 trains on the same seeded start set for every strategy: train it once
    for strategy in args.strategies:
        labelled, curve, t0 = start.copy(), [], time.perf_counter()
        for r in range(args.rounds + 1):
            if r == 0 and first is not None:
                clf, acc = first
            else:
                clf, acc = one_round(data, labelled, args)
                if r == 0:
                    first = (clf, acc)
            curve.append({"round": r, "labels": int(len(labelled)), "test_accuracy": round(acc, 4)})
            print(json.dumps({"strategy": strategy, **curve[-1]}), file=sys.stderr, flush=True)
            if r == args.rounds:
                break
            pool = np.setdiff1d(np.arange(n), labelled)
            with Predictor(clf) as pred:
                logits, _, feats = pred.run_outputs(Split(labels=data.train.labels[pool], images=data.train.images[pool]),
                                                    features=True)
                lab_feats = None
                if strategy in ("coreset", "hybrid"):
                    sample = labelled[np.random.default_rng(r).permutation(len(labelled))[:LABELLED_SAMPLE]]
                    lab_feats = pred.run_outputs(Split(labels=data.train.labels[sample],
                                                       images=data.train.images[sample]), features=True)[2]
            picked = select(strategy, softmax(logits, clf.temperature), feats, args.add, args.seed + r, lab_feats)
            labelled = np.sort(np.concatenate([labelled, pool[np.asarray(picked)]]))
        result["strategies"][strategy] = {"curve": curve, "wall_s": round(time.perf_counter() - t0, 1),
                                          "wall_includes_round0": strategy == args.strategies[0]}
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"active_loop_{args.data}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every strategy: a cut-short run keeps what it has
    print(json.dumps(result))


if __name__ == "__main__":
    main()
