"""MNIST: imgcls recipes against the classic Keras training, side by side (A B A B ...).

    make bench-env   # once: TensorFlow in .bench-env, never a dependency of imgcls
    flock /tmp/imgcls-heavy.lock python bench/mnist_vs_keras.py --rounds 2

Each round runs the Keras reference (bench/keras_reference.py: reference CNN, Adam, batch 32,
10 epochs) and then every imgcls recipe in --recipes, each in a fresh process, all on the
same 60,000 training images (``--val-split 0``) and scored on the 10,000 test images.
Prints one JSON object: every run, the median train time per tool/recipe and the ratio
of the Keras time to it (how many times faster imgcls reached its accuracy). Every process
is also timed whole (launch to exit: imports, data loading, training, test evaluation), and
each round runs the command a user types, `imgcls train --data mnist.npz --model
reference_cnn` (recipe auto, its default held-out split), whose whole-process time is set
against Keras' whole process (issue 18: <= 0.06).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_PY, ROOT, default_data, machine, median, run_json, user_env  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(default_data("mnist.npz")))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--recipes", default="fast,accurate", help="comma-separated imgcls recipes")
    ap.add_argument("--keras-python", default=str(BENCH_PY), help="python of the TensorFlow environment")
    ap.add_argument("--keras-epochs", type=int, default=10)
    args = ap.parse_args()
    if not Path(args.keras_python).exists():
        raise SystemExit(f"{args.keras_python} not found: run `make bench-env` first")

    keras_cmd = [args.keras_python, str(ROOT / "bench" / "keras_reference.py"), "--data", args.data,
                 "--epochs", str(args.keras_epochs)]
    recipes = [r for r in args.recipes.split(",") if r]
    runs: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        res, wall = run_json(keras_cmd)
        runs.append({"round": rnd, **res, "process_wall_s": round(wall, 2)})
        print(json.dumps({k: runs[-1][k] for k in ("round", "tool", "train_time_s", "test_accuracy")}),
              file=sys.stderr, flush=True)
        for recipe in recipes:
            cmd = [sys.executable, str(ROOT / "bench" / "imgcls_run.py"), "--data", args.data,
                   "--recipe", recipe, "--val-split", "0"]
            res, wall = run_json(cmd, env={"PYTHONPATH": str(ROOT)})
            runs.append({"round": rnd, **res, "process_wall_s": round(wall, 2)})
            print(json.dumps({k: runs[-1][k] for k in ("round", "tool", "recipe", "train_time_s", "test_accuracy")}),
                  file=sys.stderr, flush=True)
        runs.append({"round": rnd, **user_command(args.data)})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)

    keras_t = median([r["train_time_s"] for r in runs if r["tool"] == "keras"])
    summary = []
    for tool, recipe in [("keras", "reference")] + [("imgcls", r) for r in recipes]:  # imgcls_run.py: val 0
        rs = [r for r in runs if r["tool"] == tool and r["recipe"] == recipe]
        t = median([r["train_time_s"] for r in rs])
        summary.append({"tool": tool, "recipe": recipe, "model": rs[0]["model"], "epochs": rs[0]["epochs"],
                        "train_time_s": round(t, 2), "test_accuracy": [r["test_accuracy"] for r in rs],
                        "speedup_vs_keras": round(keras_t / t, 2),
                        "ratio_time_to_keras": round(t / keras_t, 4)})
    keras_whole = median([r["process_wall_s"] for r in runs if r["tool"] == "keras"])
    cli = [r for r in runs if r["tool"] == "imgcls-cli"]
    cli_whole = median([r["process_wall_s"] for r in cli])
    whole = {"keras_process_s": round(keras_whole, 2), "imgcls_train_process_s": round(cli_whole, 2),
             "imgcls_train_test_accuracy": [r["test_accuracy"] for r in cli],
             "ratio_whole_process_to_keras": round(cli_whole / keras_whole, 4), "target_ratio": 0.06}
    print(json.dumps({"benchmark": "mnist_vs_keras", "machine": machine(), "rounds": args.rounds,
                      "command": " ".join(sys.argv), "summary": summary, "whole_process": whole, "runs": runs},
                     indent=1))


def user_command(data: str) -> dict:
    """`imgcls train --data mnist.npz --model reference_cnn` as typed, timed from launch to exit."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "imgcls", "train", "--data", data, "--model", "reference_cnn", "--out", out,
               "--name", "run"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=user_env({"PYTHONPATH": str(ROOT)}),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        m = json.loads((Path(out) / "run" / "metrics.json").read_text())
    return {"tool": "imgcls-cli", "recipe": "auto", "command": "imgcls train --data mnist.npz --model reference_cnn",
            "test_accuracy": m["evaluation"]["accuracy"], "train_time_s": m["training"]["train_time_s"],
            "process_wall_s": round(wall, 2)}


if __name__ == "__main__":
    main()
