"""Faithfulness of each explanation method on a trained reference CNN: mean deletion and
insertion AUC against random pixel orders. Trains the network first (1 epoch on 5,000
MNIST digits from ../shared/data, or 2 epochs on the embedded `digits` set with --digits).
Prints one JSON object per method.

    PYTHONPATH=. python bench/explain_faithfulness.py [--per-class 3] [--digits]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from imgcls import train
from imgcls.data.sources import load_data
from imgcls.explain import EXPLAINERS, explain

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
KEYS = ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--digits", action="store_true", help="use the embedded digits set instead of MNIST")
    ap.add_argument("--mnist", default=str(SHARED), help="path of mnist.npz (Keras layout)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.digits:
            spec, cfg = "digits", {"epochs": 2}
        else:
            d = np.load(args.mnist)
            spec = str(Path(tmp) / "mnist5k.npz")
            np.savez(spec, x_train=d["x_train"][:5000], y_train=d["y_train"][:5000],
                     x_test=d["x_test"][:500], y_test=d["y_test"][:500])
            cfg = {"epochs": 1}
        result = train({"data": spec, "batch_size": 64, "out": tmp, "name": "run", "seed": 0, **cfg}, progress=False)
        data = load_data(spec)
        x, y = data.test.images.numpy(), data.test.labels.numpy()
        pick = np.concatenate([np.flatnonzero(y == c)[: args.per_class] for c in range(10)])
        for method in EXPLAINERS.names():
            exps = explain(result.classifier, x[pick], method=method)
            f = [e.faithfulness for e in exps]
            print(json.dumps({"data": "digits" if args.digits else "mnist-5k", "test_accuracy":
                              round(result.metrics["accuracy"], 4), "method": method, "images": len(pick),
                              **{k: round(float(np.mean([r[k] for r in f])), 3) for k in KEYS},
                              "beats_random": sum(r["beats_random"] for r in f),
                              "evaluations_per_image": exps[0].evaluations}), flush=True)


if __name__ == "__main__":
    main()
