"""Little data: hymenoptera (245 training photos, 2 classes) on the CPU, whole `imgcls train`
processes timed from launch to exit (start-up, JPEG decoding into a fresh decode cache,
training, final evaluation).

Configurations are run interleaved (A B C A B C ...) so load from other jobs on a shared
machine spreads over all of them. Prints one JSON object.

    flock /tmp/imgcls-heavy.lock python bench/transfer_hymenoptera.py --rounds 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import feature_cache_times  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/hymenoptera")


def configs(weights: Path) -> dict[str, list[str]]:
    lite0 = ["--model", "tf_efficientnet_lite0", "--weights", str(weights)]
    return {
        # linear probe on frozen Lite0 features, extracted once (+ mirror images), head trains in seconds
        "lite0_probe_224": [*lite0, "--freeze", "backbone", "--epochs", "20"],
        "lite0_probe_256": [*lite0, "--freeze", "backbone", "--epochs", "20", "--img-size", "256"],
        # full fine-tuning with photo augmentation, backbone at 0.1x the head's learning rate
        # (about 60 s per epoch on 2 CPU cores: over the 60 s budget, kept for GPUs / comparison)
        "lite0_finetune_160": [*lite0, "--img-size", "160", "--epochs", "3", "--lr", "1e-3", "--batch-size", "32"],
        # from random weights: a small CNN (full Lite0 training runs at ~4 img/s on 2 cores)
        "scratch_reference_64": ["--model", "reference_cnn", "--in-chans", "3", "--img-size", "64", "--epochs", "30",
                                 "--batch-size", "32", "--lr", "1e-3"],
    }


def run_once(name: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(DATA), "--out", str(out), "--name", name, *args]
    # a fresh decode cache per run: every process decodes the JPEGs itself (a cold first run)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGCLS_DECODE_CACHE_DIR": str(out / f"{name}-decoded")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"config": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": round(wall, 1)}
    m = json.loads((out / name / "metrics.json").read_text())
    with open(out / name / "history.csv") as f:
        hist = list(csv.DictReader(f))
    tr = m["training"]
    row = {"config": name, "wall_s": round(wall, 1), "val_acc": m["evaluation"]["accuracy"],
           "last_epoch_val_acc": float(hist[-1]["val_acc"]), "best_epoch": tr["best_epoch"],
           "epochs": tr["epochs_run"], "train_time_s": tr["train_time_s"], "precision": tr["precision"]}
    row.update(feature_cache_times(tr))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="config names to run (default: all)")
    ap.add_argument("--weights", default=str(ROOT / "bench" / "cache" / "tf_efficientnet_lite0.safetensors"))
    args = ap.parse_args()
    weights = Path(args.weights)
    if not weights.is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        from lite0_weights import convert

        convert(weights)
    cfgs = configs(weights)
    names = args.only or list(cfgs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names:
                row = run_once(name, cfgs[name], Path(tmp) / f"round{r}")
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {}
    for name in names:
        ok = [x for x in rows if x["config"] == name and "error" not in x]
        if ok:
            summary[name] = {"median_wall_s": round(statistics.median(x["wall_s"] for x in ok), 1),
                             "val_acc": [x["val_acc"] for x in ok],
                             "last_epoch_val_acc": [x["last_epoch_val_acc"] for x in ok],
                             "args": cfgs[name]}
            if "head_train_s" in ok[0]:
                summary[name]["median_head_train_s"] = round(statistics.median(x["head_train_s"] for x in ok), 2)
                summary[name]["median_extract_s"] = round(statistics.median(x["extract_s"] for x in ok), 1)
    print(json.dumps({"bench": "transfer_hymenoptera", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                      "load_avg_end": os.getloadavg(), "runs": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
