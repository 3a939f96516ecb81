"""Semi-supervised training (``--unlabeled``) vs labelled-only, on MNIST with few labels.

``--per-class`` labelled training images per class (seeded), the rest of the training set as
the unlabelled pool; both arms train the same model with the same flags and are evaluated on
the test set; the ``--unlabeled`` arm's wall time includes its teacher and the pool prediction.

    flock /tmp/imgcls-heavy.lock python bench/semi_supervised.py --per-class 100 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import default_data, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=["--batch-size", "64", "--lr", "3e-3"])
    args = ap.parse_args()
    with np.load(default_data(f"{args.data}.npz")) as f:
        x, y, xt, yt = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    rng = np.random.default_rng(args.seed)
    lab = np.sort(np.concatenate([rng.permutation(np.nonzero(y == c)[0])[:args.per_class] for c in range(10)]))
    rest = np.setdiff1d(np.arange(len(y)), lab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        np.savez(t / "labelled.npz", x_train=x[lab], y_train=y[lab], x_test=xt, y_test=yt)
        np.savez(t / "pool.npz", x_unlabeled=x[rest])
        for arm, extra in (("labelled_only", []), ("unlabeled", ["--unlabeled", str(t / "pool.npz")])):
            cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(t / "labelled.npz"), "--epochs",
                   str(args.epochs), "--seed", str(args.seed), "--out", str(t / "runs"), "--name", arm,
                   *args.extra, *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{arm} failed: {proc.stderr.strip().splitlines()[-1:]}")
            m = json.loads((t / "runs" / arm / "metrics.json").read_text())
            rows.append({"arm": arm, "test_accuracy": m["evaluation"]["accuracy"], "wall_s": round(wall, 1),
                         "train_images": m["training"]["train_images"],
                         "notes": [n for n in m["training"]["data_notes"] if "semi" in n],
                         "command": " ".join(["imgcls", *cmd[3:]])})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = {"bench": f"semi_supervised_{args.data}", "machine": machine(), "labelled": int(len(lab)),
           "unlabelled": int(len(rest)), "runs": rows}
    path = ROOT / "bench" / "results" / f"semi_supervised_{args.data}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
