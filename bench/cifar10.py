"""CIFAR-10 time-to-accuracy: one imgcls run with test accuracy after every epoch.

    flock /tmp/imgcls-heavy.lock python bench/cifar10.py --recipe fast

Reports training time (per-epoch test evaluation excluded), final test accuracy, the
training time at which test accuracy first reached 90% and 94%, and the process's peak
resident memory. Extra ``imgcls train`` flags can follow ``--`` (e.g. ``-- --epochs 12``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, default_data, machine, run_json  # noqa: E402


def time_to(rows: list[dict], target: float) -> float | None:
    return next((r["train_time_s"] for r in rows if r["test_accuracy"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(default_data("cifar10.npz")))
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("extra", nargs="*", help="more imgcls train flags, after --")
    args = ap.parse_args()
    cmd = [sys.executable, str(ROOT / "bench" / "imgcls_run.py"), "--data", args.data, "--recipe", args.recipe,
           "--val-split", "0", "--per-epoch-test", *args.extra]
    res, wall = run_json(cmd, env={"PYTHONPATH": str(ROOT)})
    rows = res.get("per_epoch", [])
    print(json.dumps({"benchmark": "cifar10_time_to_accuracy", "machine": machine(), "command": " ".join(sys.argv),
                      "tool": "imgcls", "recipe": res["recipe"], "model": res["model"], "epochs": res["epochs"],
                      "train_time_s": res["train_time_s"], "test_accuracy": res["test_accuracy"],
                      "time_to_90_s": time_to(rows, 0.90), "time_to_94_s": time_to(rows, 0.94),
                      "peak_rss_mb": res["peak_rss_mb"], "process_wall_s": round(wall, 1), "run": res}, indent=1))


if __name__ == "__main__":
    main()
