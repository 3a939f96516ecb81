"""Semi-supervised training (``--unlabeled``) vs labelled-only, with few labels.

``--per-class`` labelled training images per class (seeded), the rest of the training set as
the unlabelled pool; every arm trains with the same flags and is evaluated on the test set.
With ``--time-budget M`` every arm trains for the same M minutes of wall-clock (the
``--unlabeled`` arms' teacher and pool prediction included); the arms:

* ``labelled_only`` - no pool;
* ``pseudo`` - ``--semi pseudo``: a teacher's confident pseudo-labels join the training split;
* ``fixmatch`` - ``--semi fixmatch``: weak/strong consistency on the pool in the training loop;
* ``both`` - ``--semi both``;
* ``fixmatch_mu7`` - ``--semi fixmatch --mu 7`` (FixMatch's own ratio; the CIFAR-10 flags use ``--mu 2``);
* ``pseudo_r2`` - ``--semi pseudo --pseudo-rounds 2``: round 1's student, trained afresh, labels the pool again;
* ``pseudo_balanced`` - ``--semi pseudo --pseudo-balance``: as many pseudo-labels per class (CBST);
* ``pseudo_warm`` - ``--semi pseudo --pseudo-student teacher``: the student starts from the teacher's weights;
* ``pseudo_warm_balanced`` - the two.

    # CIFAR-10, 250 labels per class, 4 min per arm (docs/benchmarks.md)
    flock /tmp/imgcls-heavy.lock python bench/semi_supervised.py --data cifar10 --per-class 250 --time-budget 4
    # hymenoptera (photo folders): 20 labelled photos per class, the other training photos unlabelled,
    # pretrained Lite0 (recipe auto -> transfer: a linear probe on cached features; its val/ is the test)
    flock /tmp/imgcls-heavy.lock python bench/semi_supervised.py --data hymenoptera --per-class 20 --arms labelled_only pseudo
    # MNIST, 100 labels per class, 10 epochs each (no time budget)
    flock /tmp/imgcls-heavy.lock python bench/semi_supervised.py --per-class 100 --epochs 10 --arms labelled_only pseudo
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

ARMS = {"labelled_only": [], "pseudo": ["--semi", "pseudo"], "fixmatch": ["--semi", "fixmatch"],
        "both": ["--semi", "both"], "fixmatch_mu7": ["--semi", "fixmatch", "--mu", "7"],
        "pseudo_r2": ["--semi", "pseudo", "--pseudo-rounds", "2"],
        "pseudo_balanced": ["--semi", "pseudo", "--pseudo-balance"],
        "pseudo_warm": ["--semi", "pseudo", "--pseudo-student", "teacher"],
        "pseudo_warm_balanced": ["--semi", "pseudo", "--pseudo-student", "teacher", "--pseudo-balance"]}
# CIFAR-10 under a time budget: airbench's fast recipe at batch 64 (its lr scaled with the batch),
# a generous epoch cap (the clock ends the run), 20% of it warm-up, flip TTA (6-view flip-shift TTA
# would cost the pseudo arm ~1.5 min of its budget on the 47,500-image pool)
CIFAR_FLAGS = ["--recipe", "fast", "--batch-size", "64", "--epochs", "100", "--warmup-epochs", "20", "--tta", "flip",
               "--mu", "2"]
MNIST_FLAGS = ["--batch-size", "64", "--lr", "3e-3"]
PHOTO_FLAGS = ["--model", "tf_efficientnet_lite0", "--weights",
               str(ROOT.parent / "main" / "bench" / "cache" / "tf_efficientnet_lite0.safetensors")
               if not (ROOT / "bench" / "cache" / "tf_efficientnet_lite0.safetensors").is_file()
               else str(ROOT / "bench" / "cache" / "tf_efficientnet_lite0.safetensors")]


def split_npz(args, rng, t: Path) -> tuple[int, int]:
    """labelled.npz (``--per-class`` per class, and the test set) and pool.npz (the rest)."""
    with np.load(default_data(f"{args.data}.npz")) as f:
        x, y, xt, yt = f["x_train"], f["y_train"].reshape(-1), f["x_test"], f["y_test"].reshape(-1)
    lab = np.sort(np.concatenate([rng.permutation(np.nonzero(y == c)[0])[:args.per_class] for c in np.unique(y)]))
    rest = np.setdiff1d(np.arange(len(y)), lab)
    if args.pool_size:
        rest = np.sort(rng.permutation(rest)[:args.pool_size])
    np.savez(t / "labelled.npz", x_train=x[lab], y_train=y[lab], x_test=xt, y_test=yt)
    np.savez(t / "pool.npz", x_unlabeled=x[rest])
    return int(len(lab)), int(len(rest))


def split_folder(args, rng, t: Path) -> tuple[int, int]:
    """labelled/train/CLASS (``--per-class`` photos each) + labelled/val (the data's own val/,
    the test of every arm) and pool/ (the other training photos, without their classes), as links."""
    src = default_data(args.data)
    n_lab = n_pool = 0
    for cls in sorted(p.name for p in (src / "train").iterdir() if p.is_dir()):
        files = sorted((src / "train" / cls).iterdir())
        order = rng.permutation(len(files))
        (t / "labelled" / "train" / cls).mkdir(parents=True)
        (t / "pool").mkdir(exist_ok=True)
        for k, i in enumerate(order):
            f = files[i]
            dest = t / "labelled" / "train" / cls / f.name if k < args.per_class else t / "pool" / f"{n_pool:05d}{f.suffix}"
            dest.symlink_to(f)
            n_lab, n_pool = n_lab + (k < args.per_class), n_pool + (k >= args.per_class)
    (t / "labelled" / "val").symlink_to(src / "val")
    return n_lab, n_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per arm (without --time-budget)")
    ap.add_argument("--time-budget", type=float, default=None, help="minutes of training per arm")
    ap.add_argument("--pool-size", type=int, default=None, help="use only this many unlabelled images (smoke runs)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/semi_supervised_DATA.json)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=None, help="flags for every arm")
    args = ap.parse_args()
    folder = default_data(args.data).is_dir()
    extra = args.extra if args.extra is not None else CIFAR_FLAGS if args.data == "cifar10" else \
        PHOTO_FLAGS if folder else MNIST_FLAGS
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        n_lab, n_pool = (split_folder if folder else split_npz)(args, rng, t)
        for arm in args.arms:
            pool = ["--unlabeled", str(t / ("pool" if folder else "pool.npz")), *ARMS[arm]] if ARMS[arm] else []
            length = ["--time-budget", str(args.time_budget)] if args.time_budget else \
                ["--epochs", str(args.epochs)] if args.epochs else []
            cmd = [sys.executable, "-m", "imgcls", "train", "--data", str(t / ("labelled" if folder else "labelled.npz")),
                   "--seed", str(args.seed),
                   "--out", str(t / "runs"), "--name", arm, *extra, *length, *pool]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            wall = time.perf_counter() - t0
            sys.stderr.write(proc.stderr[-3000:])
            if proc.returncode != 0:
                raise SystemExit(f"{arm} failed: {proc.stderr.strip().splitlines()[-1:]}")
            m = json.loads((t / "runs" / arm / "metrics.json").read_text())
            tr = m["training"]
            rows.append({"arm": arm, "test_accuracy": m["evaluation"]["accuracy"], "wall_s": round(wall, 1),
                         "train_time_s": tr["train_time_s"], "epochs_run": tr["epochs_run"],
                         "best_val_acc": tr["best"].get("val_acc"), "train_images": tr["train_images"],
                         "stopped": tr.get("stopped_early"), "fixmatch": tr.get("fixmatch"),
                         "notes": [n for n in tr["data_notes"] if "semi" in n],
                         "semi_log": [line for line in proc.stderr.splitlines() if "semi-supervised" in line],
                         "command": " ".join(["imgcls", *cmd[3:]]).replace(str(t), "$TMP")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = {"bench": f"semi_supervised_{args.data}", "machine": machine(), "labelled": n_lab,
           "unlabelled": n_pool, "time_budget_min": args.time_budget, "runs": rows}
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"semi_supervised_{args.data}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
