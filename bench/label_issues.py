"""Label-issue finder: precision and recall of ``imgcls label-issues`` against known flips.

A share of the training labels (5 %, 20 %) is flipped at random to another class (seeded),
the noisy data is written as a Keras-style ``.npz`` and the whole command runs on it as a
user would (``imgcls label-issues noisy.npz --folds 5``): its wall time includes loading,
the K models and cleanlab. The flagged set is compared with the flipped indices.

    flock /tmp/imgcls-heavy.lock python bench/label_issues.py --data mnist --noise 0.05 0.2
"""

from __future__ import annotations

import argparse
import csv
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


def flip_labels(y: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = int(y.max()) + 1
    idx = np.sort(rng.choice(len(y), int(round(share * len(y))), replace=False))
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, k, len(idx))) % k  # always another class
    return noisy, idx


def run(npz: Path, share: float, seed: int, extra: list[str], tmp: Path) -> dict:
    with np.load(npz) as f:
        x, y = f["x_train"], f["y_train"]
    noisy, flipped = flip_labels(y, share, seed)
    data = tmp / f"noisy_{int(share * 100)}.npz"
    np.savez(data, x_train=x, y_train=noisy)
    out = tmp / f"issues_{int(share * 100)}.csv"
    cmd = [sys.executable, "-m", "imgcls", "label-issues", str(data), "--out", str(out), "--seed", str(seed),
           "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"label-issues failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout)
    flagged = {int(r["index"]) for r in csv.DictReader(out.open())}
    truth = set(flipped.tolist())
    hit = len(flagged & truth)
    return {"noise": share, "seed": seed, "train_images": int(len(y)), "flipped": len(truth),
            "flagged": len(flagged), "precision": round(hit / max(1, len(flagged)), 4),
            "recall": round(hit / max(1, len(truth)), 4), "whole_command_s": round(wall, 1),
            "out_of_fold_accuracy_vs_noisy_labels": summary["out_of_fold_accuracy"], "command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist", help="mnist or cifar10 (../shared/data/NAME.npz)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more label-issues flags")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in args.noise:
            rows.append(run(default_data(f"{args.data}.npz"), share, args.seed, args.extra, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"bench": f"label_issues_{args.data}", "machine": machine(), "runs": rows}
    out = ROOT / "bench" / "results" / f"label_issues_{args.data}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
