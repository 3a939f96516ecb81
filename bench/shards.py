"""Shard sets vs today's sources: training throughput (CIFAR-10 from the .npz in memory /
from shards; hymenoptera from the folder through the decode cache / from shards, raw and
written with --resize) and batch prediction (1 vs 2 processes).

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py train --data cifar10 --subset 10000
    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py train --data hymenoptera

Writes bench/results/shards_train_<data>.json (img/s of each epoch, wall time of the whole fit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import default_data, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _fit(data, classes, in_chans, img_size, epochs, batch, workers, seed=0) -> dict:
    from imgcls import Classifier

    clf = Classifier.create("reference_cnn", classes=classes, in_chans=in_chans, img_size=img_size, seed=seed)
    t0 = time.perf_counter()
    s = clf.fit(data, epochs=epochs, batch_size=batch, workers=workers, progress=False, seed=seed, threads=None)
    wall = time.perf_counter() - t0
    return {"img_per_s": [round(h["img_per_s"], 1) for h in clf.history], "fit_wall_s": round(wall, 2),
            "best_val_acc": round(s["best"].get("val_acc", float("nan")), 4), "train_images": s["train_images"]}


def _cifar_subset(n: int, tmp: Path) -> Path:
    with np.load(default_data("cifar10.npz"), allow_pickle=False) as f:
        x, y = f["x_train"], f["y_train"].reshape(-1)
        names = f["class_names"] if "class_names" in f.files else None
    idx = np.random.default_rng(0).permutation(len(x))[:n]
    path = tmp / "cifar_subset.npz"
    extra = {"class_names": names} if names is not None else {}
    np.savez(path, x_train=x[idx], y_train=y[idx], **extra)
    return path


def bench_train(args) -> dict:
    from imgcls.data.shard_writer import parse_size, write_shards
    from imgcls.data.sources import load_data

    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    os.environ["IMGCLS_DECODE_CACHE_DIR"] = str(tmp / "decoded")  # a cold decode cache: the first run decodes
    out = {"machine": machine(), "data": args.data, "epochs": args.epochs, "workers": args.workers, "runs": {}}
    if args.data == "cifar10":
        src = _cifar_subset(args.subset, tmp)
        data = load_data(src)
        classes, chans, size = data.classes, 3, 32
        out["subset"] = args.subset
        variants = {"npz_in_memory": str(src)}
        t0 = time.perf_counter()
        write_shards(data, tmp / "sh", shard_size=parse_size("4MB"))
        out["shard_write_s"] = {"webdataset": round(time.perf_counter() - t0, 2)}
        variants["shards"] = str(tmp / "sh")
    else:
        src = default_data("hymenoptera")
        data = load_data(src)
        classes, chans, size = data.classes, 3, args.img_size
        variants = {"folder_decode_cache_cold": str(src), "folder_decode_cache_warm": str(src)}
        out["shard_write_s"] = {}
        for name, resize in (("shards_raw", None), ("shards_resize", int(round(size / 0.875)))):
            t0 = time.perf_counter()
            write_shards(data, tmp / name, shard_size=parse_size("8MB"), resize=resize)
            out["shard_write_s"][name] = round(time.perf_counter() - t0, 2)
            variants[name] = str(tmp / name)
    for name, spec in variants.items():
        print(f"bench: {name}", file=sys.stderr)
        out["runs"][name] = _fit(spec, classes, chans, size, args.epochs, args.batch_size, args.workers)
        print(json.dumps(out["runs"][name]), file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", choices=["cifar10", "hymenoptera"], default="cifar10")
    t.add_argument("--subset", type=int, default=10000)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--img-size", type=int, default=128)
    t.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    result = bench_train(args)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"shards_{args.what}_{args.data}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
