"""Random vs grouped validation split on signdigits (hand photos taken in runs).

The manifest ``runs.csv`` gives every image's run (``--group-by run``); a regex on the file
name (``--group-by 'IMG_(\d\d)\d\d'``) groups by the hundreds of the file number instead. This benchmark keeps its grouped split's
``val`` runs (``run % 5 == 0``) as an untouched *test* set and trains on the rest twice,
holding out 20 % for validation: at random (near-copies from one run on both sides) and
with ``--group-by run``. The validation accuracy each run reports is compared with its
accuracy on the unseen test runs: a leaky split promises more than the model delivers.

    flock /tmp/imgcls-heavy.lock python bench/group_split.py [--model-args ...]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import default_data, machine  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent / "cache" / "tf_efficientnet_lite0.safetensors"  # bench/lite0_weights.py


def write_manifest(src: Path, out: Path) -> Path:
    rows = list(csv.DictReader((src / "runs.csv").open()))
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "run"])
        for r in rows:  # the grouped val runs become the test set; the rest is split by the run itself
            w.writerow([str(src / r["path"]), r["label"], "test" if r["split"] == "val" else "", r["run"]])
    return out


def run_one(manifest: Path, name: str, extra: list[str], model_args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(manifest), "--out", str(out), "--name", name,
           "--val-split", "0.2", "--seed", "0", *model_args, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    m = json.loads((out / name / "metrics.json").read_text())
    tr = m["training"]
    return {"split": name, "args": extra, "val_acc_reported": round(tr["best"]["val_acc"], 4),
            "test_acc_unseen_runs": round(m["evaluation"]["accuracy"], 4),
            "gap_points": round(100 * (tr["best"]["val_acc"] - m["evaluation"]["accuracy"]), 1),
            "train_images": tr["train_images"], "val_images": tr["val_images"],
            "test_images": m["evaluation"]["num_images"], "wall_s": round(wall, 1),
            "leak_hint": [ln for ln in proc.stderr.splitlines() if "--group-by" in ln][:1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(default_data("signdigits")))
    ap.add_argument("--model-args", nargs=argparse.REMAINDER,
                    default=["--model", "tf_efficientnet_lite0", "--weights", str(WEIGHTS), "--freeze", "backbone",
                             "--img-size", "128", "--epochs", "15", "--no-hflip"])
    ap.add_argument("--json-out", default=str(ROOT / "bench" / "results" / "group_split_signdigits.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest(Path(args.data), Path(tmp) / "signdigits_runs.csv")
        # the manifest column, and a regex on the file name: the hundreds of the file number
        # (IMG_11xx, IMG_12xx, ...), whole runs but for the few that cross a hundred
        arms = (("random", []), ("grouped", ["--group-by", "run"]), ("grouped_regex", ["--group-by", r"IMG_(\d\d)\d\d"]))
        for name, extra in arms:
            rows.append(run_one(manifest, name, extra, args.model_args, Path(tmp) / "runs"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = {"bench": "group_split_signdigits", "machine": machine(), "model_args": args.model_args, "runs": rows}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
