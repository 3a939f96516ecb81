"""Multi-label benchmark: 2x2 mosaics of MNIST digits (56x56, labels = the digits present).

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/multilabel_mosaics.py --epochs 6
    ... --dataset cifar10 --model airbench   # 64x64 mosaics of CIFAR-10 images

Builds 50,000 training mosaics from MNIST's training digits and 10,000 test mosaics from its
test digits (four digits drawn at random per mosaic, seeded; 1-4 distinct labels), writes them
as a Keras-style .npz whose ``y_train`` / ``y_test`` are 0/1 matrices (so ``imgcls train`` sees
multi-label data), trains with ``imgcls train`` in a fresh process and reports the test mAP
(macro and micro), exact match, CF1/OF1 and the whole wall time (mosaics excluded) as JSON in
bench/results/. The figure and this command go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, default_data, machine  # noqa: E402


def mosaics(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 2x2 mosaics of the images ``x`` (labels ``y``, 10 classes): MNIST's 28x28 digits give
    (n, 56, 56), CIFAR-10's 32x32x3 images (n, 64, 64, 3); 0/1 labels (n, 10)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n, 4))
    tiles = x[idx]  # (n, 4, 28, 28)
    img = np.concatenate([np.concatenate([tiles[:, 0], tiles[:, 1]], axis=2),
                          np.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)], axis=1)
    labels = np.zeros((n, 10), np.uint8)
    np.put_along_axis(labels, y[idx], 1, axis=1)
    return img.astype(np.uint8), labels


def build(src: Path, out: Path, n_train: int, n_test: int) -> Path:
    with np.load(src) as d:
        xtr, ytr, xte, yte = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    a, b = mosaics(xtr, ytr, n_train, 0), mosaics(xte, yte, n_test, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=a[0], y_train=a[1], x_test=b[0], y_test=b[1], class_names=np.array([str(i) for i in range(10)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    ap.add_argument("--data", default=None, help="the source .npz (default: ../shared/data/DATASET.npz)")
    ap.add_argument("--train", type=int, default=50_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="reference_cnn")
    ap.add_argument("--extra", default="", help="more `imgcls train` flags, e.g. '--loss asl'")
    ap.add_argument("--out", default=None, help="default: bench/results/multilabel_DATASET_mosaics.json")
    args = ap.parse_args()
    src = Path(args.data or default_data(f"{args.dataset}.npz"))
    cache = ROOT / "bench" / "cache" / f"{args.dataset}_mosaics_{args.train}_{args.test}.npz"
    if not cache.exists():
        build(src, cache, args.train, args.test)
    runs = ROOT / "bench" / "cache" / "runs"
    name = f"mosaics-{int(time.time())}"
    cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(cache), "--recipe", "fast", "--model", args.model,
           "--epochs", str(args.epochs), "--out", str(runs), "--name", name, *args.extra.split()]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    metrics = json.loads((runs / name / "metrics.json").read_text())
    m, s = metrics["evaluation"], metrics["training"]
    result = {
        "benchmark": f"{args.dataset} 2x2 mosaics, multi-label (labels = the classes present)",
        "train_images": s["train_images"], "val_images": s["val_images"], "test_images": m["num_images"],
        "command": "flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/multilabel_mosaics.py "
                   + " ".join(sys.argv[1:]),
        "train_command": " ".join(cmd[1:]).replace(str(ROOT) + "/", ""),
        "model": args.model, "epochs": s["epochs_run"], "threads": s["threads"], "precision": s["precision"],
        "test_map_macro": round(m["map_macro"], 5), "test_map_micro": round(m["map_micro"], 5),
        "test_exact_match": round(m["exact_match"], 5), "test_cf1": round(m["cf1"], 5), "test_of1": round(m["of1"], 5),
        "test_hamming_loss": round(m["hamming_loss"], 6), "train_time_s": s["train_time_s"],
        "whole_wall_s": round(wall, 1), "target_map": 0.995 if args.dataset == "mnist" else 0.90,
        "machine": machine(),
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"multilabel_{args.dataset}_mosaics.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
