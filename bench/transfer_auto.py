"""Transfer as a new user meets it: `imgcls train --data D --model tf_efficientnet_lite0
--weights FILE` and nothing else (recipe auto), whole processes timed from launch to exit
(start-up, decoding into a fresh decode cache, training, final evaluation), next to the full
fine-tuning option (`--freeze none`: auto then falls back to the default recipe, what the same
command did before the transfer recipe).

Targets (issue 18): hymenoptera >= 95% val in <= 30 s; signdigits/runs.csv >= 95% in <= 90 s.
Configurations run interleaved (A B A B ...). Writes JSON (--out) and prints it.

    flock /tmp/imgcls-heavy.lock python bench/transfer_auto.py --rounds 1 \\
        --weights bench/cache/tf_efficientnet_lite0.safetensors --out bench/results/transfer_auto.json
"""

from __future__ import annotations

import argparse
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
from _common import feature_cache_times, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
DATA = {"hymenoptera": SHARED / "hymenoptera", "signdigits": SHARED / "signdigits" / "runs.csv"}
TARGETS = {"hymenoptera": (0.95, 30.0), "signdigits": (0.95, 90.0)}


def configs(weights: Path) -> dict[str, tuple[str, list[str]]]:
    user = ["--model", "tf_efficientnet_lite0", "--weights", str(weights)]
    return {
        "hymenoptera_auto": ("hymenoptera", user),
        "signdigits_auto": ("signdigits", user),
        # the same with mirror-image test-time augmentation at the final evaluation
        "signdigits_auto_tta": ("signdigits", [*user, "--tta", "flip"]),
        # the full fine-tuning option: the default recipe (Adam 3e-3 one-cycle, batch 128, 3 epochs)
        "hymenoptera_full_finetune": ("hymenoptera", [*user, "--freeze", "none"]),
        "signdigits_full_finetune": ("signdigits", [*user, "--freeze", "none"]),
    }


def run_once(name: str, data: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(DATA[data]), *args, "--out", str(out),
           "--name", name]
    # a fresh decode cache per run: every process decodes the JPEGs itself (a new user's first run)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMGCLS_DECODE_CACHE_DIR": str(out / f"{name}-decoded")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"config": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": round(wall, 1)}
    m = json.loads((out / name / "metrics.json").read_text())
    tr = m["training"]
    choice = next((ln.removeprefix("imgcls: ") for ln in proc.stderr.splitlines() if "recipe " in ln), None)
    acc_target, time_target = TARGETS[data]
    row = {"config": name, "data": data, "wall_s": round(wall, 1), "val_acc": m["evaluation"]["accuracy"],
           "split": m["evaluation"]["split"], "recipe": tr.get("recipe"), "recipe_line": choice,
           "epochs": tr["epochs_run"], "best_epoch": tr["best_epoch"], "train_time_s": tr["train_time_s"],
           "meets_target": m["evaluation"]["accuracy"] >= acc_target and wall <= time_target}
    row.update(feature_cache_times(tr))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="config names to run (default: all)")
    ap.add_argument("--weights", default=str(ROOT / "bench" / "cache" / "tf_efficientnet_lite0.safetensors"))
    ap.add_argument("--out", help="write the JSON here too (e.g. bench/results/transfer_auto.json)")
    args = ap.parse_args()
    weights = Path(args.weights)
    if not weights.is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        from lite0_weights import convert

        convert(weights)
    cfgs = configs(weights)
    load0 = os.getloadavg()
    names = args.only or list(cfgs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names:
                data, extra = cfgs[name]
                row = run_once(name, data, extra, Path(tmp) / f"round{r}")
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {}
    for name in names:
        ok = [x for x in rows if x["config"] == name and "error" not in x]
        if ok:
            summary[name] = {"median_wall_s": round(statistics.median(x["wall_s"] for x in ok), 1),
                             "val_acc": [x["val_acc"] for x in ok], "recipe_line": ok[0]["recipe_line"],
                             "command": "imgcls train --data " + str(DATA[cfgs[name][0]]) + " "
                             + " ".join(cfgs[name][1])}
    result = {"bench": "transfer_auto", "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "load_avg_start": load0, "load_avg_end": os.getloadavg(), "targets": TARGETS, "runs": rows, "summary": summary}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
