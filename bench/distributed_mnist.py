"""One process vs N data-parallel processes (Gloo, CPU) on MNIST, same data, seed and
global batch: final test accuracy should agree within 0.3 points.

    flock /tmp/imgcls-heavy.lock python bench/distributed_mnist.py --data ../shared/data/mnist.npz \
        --epochs 3 --batch-size 128 --procs 2

Prints one JSON object. Wall times are from a shared machine: indicative only.
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


def run(args: argparse.Namespace, out: Path, name: str, procs: int) -> dict:
    cmd = [sys.executable, "-m", "imgcls", "train", "--data", args.data, "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--precision", args.precision, "--seed", str(args.seed),
           "--out", str(out), "--name", name, "--devices", str(procs)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    m = json.loads((out / name / "metrics.json").read_text())
    return {"processes": procs, "test_accuracy": m["evaluation"]["accuracy"], "test_loss": m["evaluation"]["loss"],
            "best_val_acc": m["training"]["best"].get("val_acc"), "train_time_s": m["training"]["train_time_s"],
            "wall_s": round(wall, 1), "command": " ".join(cmd)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single = run(args, Path(tmp), "single", 1)
        multi = run(args, Path(tmp), "multi", args.procs)
    diff = abs(single["test_accuracy"] - multi["test_accuracy"]) * 100
    print(json.dumps({"bench": "distributed_mnist", "single": single, "multi": multi,
                      "accuracy_diff_points": round(diff, 3), "within_0.3_points": diff <= 0.3,
                      "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
