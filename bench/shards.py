"""Shard sets vs today's sources: training throughput (CIFAR-10 from the .npz in memory /
from shards; hymenoptera from the folder through the decode cache / from shards, raw and
written with --resize) and batch prediction (1 vs 2 processes).

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py train --data cifar10 --subset 10000
    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py train --data hymenoptera

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py predict --images 20000 \
        --rss-sizes 1000 200000

Writes bench/results/shards_train_<data>.json (img/s of each epoch, wall time of the whole fit)
and bench/results/shards_predict.json (img/s of 1 vs 2 processes writing part files, and of the
single-process `imgcls predict RUN SOURCE -o preds.jsonl`, each also per core; peak RSS per job size).

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py mnist-http --epochs 2

2-process torchrun on MNIST from shards over http://127.0.0.1 vs from the .npz
(bench/results/shards_mnist-http.json).

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py recipe --subset 12000 --epochs 3 --rounds 2

The comparison a user meets: `imgcls train --data SUBSET.npz` against `imgcls train --data
SHARDS/` (the same images written by `imgcls shard --resize 32`, tar and Parquet), no other
flag, so `auto` picks the recipe for each (both: the fast recipe, airbench at batch 512 on a
CPU), each a fresh process (bench/imgcls_run.py), interleaved A B C A B C; per epoch img/s,
the median of the later epochs and its ratio to the .npz
(bench/results/shards_recipe_cifar10.json).

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/shards.py loader --subset 12000 --rounds 3

The loader alone (no model): what each source costs the training loop per image
(bench/results/shards_loader_cifar10.json).
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import default_data, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _fit(data, classes, in_chans, img_size, epochs, batch, workers, seed=0, model="reference_cnn") -> dict:
    from imgcls import Classifier

    clf = Classifier.create(model, classes=classes, in_chans=in_chans, img_size=img_size, seed=seed)
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
    out = {"machine": machine(), "data": args.data, "model": args.model, "epochs": args.epochs,
           "workers": args.workers, "batch_size": args.batch_size, "runs": {}, "shard_write_s": {}, "shard_mb": {}}

    def shards(name: str, **kw) -> str:
        t0 = time.perf_counter()
        write_shards(data, tmp / name, **kw)
        out["shard_write_s"][name] = round(time.perf_counter() - t0, 2)
        out["shard_mb"][name] = round(sum(f.stat().st_size for f in (tmp / name).iterdir()) / 1e6, 1)
        return str(tmp / name)

    if args.data == "cifar10":
        src = _cifar_subset(args.subset, tmp)
        data = load_data(src)
        classes, chans, size = data.classes, 3, 32
        out["subset"] = args.subset
        variants = {"npz_in_memory": str(src)}
        # PNG bytes (the default without --resize); decoded pixels (--resize 32: raw), tar and Parquet
        variants["shards"] = shards("shards", shard_size=parse_size("4MB"))
        variants["shards_resize_webdataset"] = shards("shards_resize_webdataset", shard_size=parse_size("4MB"),
                                                      resize=32)
        variants["shards_resize_parquet"] = shards("shards_resize_parquet", shard_size=parse_size("4MB"), resize=32,
                                                   fmt="parquet")
    else:
        src = default_data("hymenoptera")
        data = load_data(src)
        classes, chans, size = data.classes, 3, args.img_size
        variants = {"folder_decode_cache_cold": str(src), "folder_decode_cache_warm": str(src)}
        side = int(round(size / 0.875))  # the decode cache's side for this input size
        variants["shards_raw"] = shards("shards_raw", shard_size=parse_size("8MB"))  # the files' JPEG bytes
        variants["shards_resize"] = shards("shards_resize", shard_size=parse_size("8MB"), resize=side)
        variants["shards_resize_parquet"] = shards("shards_resize_parquet", shard_size=parse_size("8MB"),
                                                   resize=side, fmt="parquet")
    for name, spec in variants.items():
        if args.only and name not in args.only:
            continue
        print(f"bench: {name}", file=sys.stderr)
        out["runs"][name] = _fit(spec, classes, chans, size, args.epochs, args.batch_size, args.workers,
                                 model=args.model)
        print(json.dumps(out["runs"][name]), file=sys.stderr)
    return out


def _predict_job(run: Path, src: Path, out: Path, devices: int, batch: int, workers: int,
                 parts: bool = True) -> dict:
    """One ``imgcls predict --output DIR/`` job in a subprocess under GNU time: wall time and
    the peak RSS of its largest process (%M: the waited-for process tree's largest).
    ``parts=False``: the single-process ``imgcls predict RUN SOURCE -o preds.jsonl`` of before
    part files existed (one process, one output file)."""
    import shutil
    import subprocess

    shutil.rmtree(out, ignore_errors=True)
    target = ["--output", str(out) + "/", "--devices", str(devices)] if parts else ["-o", str(out) + ".jsonl"]
    cmd = ["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "-m", "imgcls", "predict", str(run), str(src),
           *target, "--batch-size", str(batch), "--workers", str(workers), "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    peak = int(next(line for line in proc.stderr.splitlines() if line.startswith("MAXRSS")).split()[1])
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 1024, 1)}


def _generated_shards(n: int, tmp: Path, size: int = 32) -> Path:
    from imgcls.data.records import ImageData, Split
    from imgcls.data.shard_writer import parse_size, write_shards
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, generator=g)
    data = ImageData(classes=[str(c) for c in range(10)], train=Split(labels=torch.arange(n) % 10, images=x),
                     name=f"gen{n}", channels=3, native_size=size, kind="small-colour")
    write_shards(data, tmp / f"gen{n}", shard_size=parse_size("16MB"))
    return tmp / f"gen{n}"


def _generated_folder(n: int, tmp: Path, size: int = 32) -> Path:
    """The same images as :func:`_generated_shards`, as PNG files in class folders."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, generator=g).permute(0, 2, 3, 1).numpy()
    root = tmp / f"folder{n}"
    for i, img in enumerate(x):
        d = root / str(i % 10)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.png")
    return root


def bench_predict(args) -> dict:
    from imgcls import Classifier

    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    clf = Classifier.create("reference_cnn", classes=[str(c) for c in range(10)], in_chans=3, img_size=32, seed=0)
    clf.save(tmp / "model")
    out = {"machine": machine(), "model": "reference_cnn 32x32", "batch_size": args.batch_size, "jobs": {}}
    shards = _generated_shards(args.images, tmp), _generated_shards(300, tmp)
    folder = _generated_folder(args.images, tmp), _generated_folder(300, tmp)
    cores = os.cpu_count() or 1
    # today's single-process predict (one output file) takes a folder, not a shard set: the three
    # folder jobs compare it with part files written by 1 and 2 processes on the same PNG files
    for name, (src, small), devices, parts in (
            ("shards_1_process", shards, 1, True), ("shards_2_process", shards, 2, True),
            ("folder_single_file", folder, 1, False), ("folder_1_process", folder, 1, True),
            ("folder_2_process", folder, 2, True)):
        job = _predict_job(tmp / "model", src, tmp / "out", devices, args.batch_size, args.workers, parts)
        base = _predict_job(tmp / "model", small, tmp / "out", devices, args.batch_size, args.workers, parts)
        job["img_per_s"] = round(args.images / job["wall_s"], 1)
        # start-up (imports, torchrun, model load) cancels out against a 300-image job
        job["marginal_img_per_s"] = round((args.images - 300) / max(job["wall_s"] - base["wall_s"], 1e-9), 1)
        job["marginal_img_per_s_per_core"] = round(job["marginal_img_per_s"] / cores, 1)  # every job uses all cores
        job["startup_job_300_wall_s"] = base["wall_s"]
        out["jobs"][f"{args.images}_images_{name}"] = job
        print(name, json.dumps(job), file=sys.stderr)
    for n in args.rss_sizes:
        job = _predict_job(tmp / "model", _generated_shards(n, tmp), tmp / "out", 1, args.batch_size, args.workers)
        out["jobs"][f"rss_{n}_images"] = job
        print(n, json.dumps(job), file=sys.stderr)
    return out


def bench_mnist_http(args) -> dict:
    """2-process torchrun training on MNIST from shards over a local HTTP server vs from the .npz."""
    import functools
    import subprocess
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from imgcls.data.shard_writer import parse_size, write_shards
    from imgcls.data.sources import load_data

    tmp = Path(tempfile.mkdtemp(prefix="bench-mnist-http-"))
    data = load_data(default_data("mnist.npz"))  # the same held-out val split as training from the .npz
    t0 = time.perf_counter()
    write_shards(data, tmp / "sh", shard_size=parse_size("4MB"))
    out = {"machine": machine(), "epochs": args.epochs, "shard_write_s": round(time.perf_counter() - t0, 1), "runs": {}}
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/sh/"
    for name, spec in (("npz", str(default_data("mnist.npz"))), ("http_shards", url)):
        cmd = [sys.executable, "-m", "imgcls", "train", "--data", spec, "--devices", "2", "--epochs", str(args.epochs),
               "--recipe", "default", "--batch-size", "128", "--out", str(tmp / "runs"), "--name", name,
               "--device", "cpu", "--workers", "1"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        card = json.loads((tmp / "runs" / name / "model.json").read_text())
        test = card["metrics"].get("test", {})
        out["runs"][name] = {"wall_s": round(time.perf_counter() - t0, 1), "test_accuracy": test.get("accuracy"),
                             "img_per_s": [round(h, 1) for h in _history_img_s(tmp / "runs" / name)]}
        print(name, json.dumps(out["runs"][name]), file=sys.stderr)
    server.shutdown()
    return out


def _history_img_s(run: Path) -> list[float]:
    import csv

    with open(run / "history.csv") as f:
        return [float(r["img_per_s"]) for r in csv.DictReader(f) if r.get("img_per_s")]


def _raw_shard_sets(data, tmp: Path, side: int, shard_size: str) -> dict[str, Path]:
    """The data as `imgcls shard --resize SIDE` writes it, in both formats."""
    from imgcls.data.shard_writer import parse_size, write_shards

    out = {}
    for name, fmt in (("shards_resize_webdataset", "webdataset"), ("shards_resize_parquet", "parquet")):
        write_shards(data, tmp / name, shard_size=parse_size(shard_size), resize=side, fmt=fmt)
        out[name] = tmp / name
    return out


def bench_recipe(args) -> dict:
    """``imgcls train --data X`` as typed (recipe auto): the .npz in memory (CIFAR-10) or the
    folder through the warm decode cache (hymenoptera) vs shards of decoded pixels."""
    import subprocess

    from imgcls.data.sources import load_data

    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-recipe-"))
    if args.data == "cifar10":
        src, side, base, extra = _cifar_subset(args.subset, tmp), 32, "npz_in_memory", []
    else:  # the folder through the decode cache (warmed by a first, untimed run); shards of its rows
        # (`auto` on photos without weights: the default recipe's reference CNN, here at 128 px,
        # squashed: the cache's rows and the shards are 128 x 128)
        src, side, base, extra = default_data("hymenoptera"), 128, "folder_decode_cache", ["--img-size", "128"]
    data = load_data(src)
    variants = {base: str(src)} | {k: str(v) for k, v in
                                   _raw_shard_sets(data, tmp, side, "4MB" if side == 32 else "32MB").items()}
    out = {"machine": machine(), "data": args.data, "subset": args.subset if args.data == "cifar10" else None,
           "resize": side, "epochs": args.epochs,
           "command": " ".join(["imgcls train --data SOURCE --epochs", str(args.epochs), *extra, "(recipe auto)"]), "runs": {k: [] for k in variants}}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "IMGCLS_DECODE_CACHE_DIR": str(tmp / "decoded")}
    if args.data != "cifar10":  # warm the decode cache: "today's" source is the cache, not the first decode
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "imgcls_run.py"), "--data", str(src),
                        "--epochs", "1", *extra], capture_output=True, env=env, check=True)
    for rnd in range(args.rounds):
        for name, spec in variants.items():
            cmd = [sys.executable, str(Path(__file__).resolve().parent / "imgcls_run.py"), "--data", spec,
                   "--epochs", str(args.epochs), "--seed", "0", *extra]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                raise SystemExit(f"{name}: {res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            run = {"round": rnd, "img_per_s": row["img_per_s"], "recipe": row["recipe"], "model": row["model"],
                   "batch_size": row["batch_size"], "recipe_choice": row["recipe_choice"],
                   "train_time_s": row["train_time_s"], "test_accuracy": row["test_accuracy"],
                   "process_wall_s": round(time.perf_counter() - t0, 2)}
            out["runs"][name].append(run)
            print(json.dumps({"variant": name, **run}), file=sys.stderr, flush=True)
    later = {k: float(np.median([r for run in v for r in run["img_per_s"][1:]])) for k, v in out["runs"].items()}
    first = {k: float(np.median([run["img_per_s"][0] for run in v])) for k, v in out["runs"].items()}
    out["later_epochs_img_per_s_median"] = {k: round(v, 1) for k, v in later.items()}
    out["first_epoch_img_per_s_median"] = {k: round(v, 1) for k, v in first.items()}
    out["ratio_later_to_base"] = {k: round(v / later[base], 3) for k, v in later.items()}
    out["ratio_first_to_base"] = {k: round(v / first[base], 3) for k, v in first.items()}
    return out


def bench_loader(args) -> dict:
    """What a source costs the training loop per image, without the model: one epoch of the
    fast recipe's training batches (airbench's preprocessing, batch 512, the same shift/flip
    augmentation and normalisation the trainer applies) from the .npz in memory and from raw
    shards (tar, Parquet), in one process, interleaved A B C A B C. On 2 cores the loader's
    time adds to the step's, so (us/img of shards - us/img of .npz) / (us/img of a training
    step) bounds the slowdown of training from shards; figures that a noisy shared machine
    cannot show end to end at 10% (see ``recipe``)."""
    from imgcls import Classifier
    from imgcls.data.pipeline import TrainSettings, training_inputs
    from imgcls.data.sources import load_data
    from imgcls.engine.trainer import _prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-loader-"))
    if args.data == "cifar10":
        data = load_data(_cifar_subset(args.subset, tmp))
        base, side, size, batch, model, epochs = "npz_in_memory", 32, "4MB", 512, "airbench", 1
        settings = dict(augment="light", hflip=True)
    else:  # `auto` on these photos: the default recipe's reference CNN (128 px here), photo crops
        os.environ["IMGCLS_DECODE_CACHE_DIR"] = str(tmp / "decoded")
        data = load_data(default_data("hymenoptera"))
        base, side, size, batch, model, epochs = "folder_decode_cache", 128, "32MB", 128, "reference_cnn", 4
        settings = {}
    variants = {base: data} | {k: load_data(str(v)) for k, v in _raw_shard_sets(data, tmp, side, size).items()}
    clf = Classifier.create(model, classes=data.classes, in_chans=3, img_size=side)
    dev = torch.device("cpu")
    if args.data != "cifar10":  # the decode cache warm, as "today's" source is
        training_inputs(data, clf.preprocessing, TrainSettings(), batch, device=dev, announce=False)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, d in variants.items():
            s = TrainSettings(workers=args.workers, **settings)
            t0 = time.perf_counter()
            inputs = training_inputs(d, clf.preprocessing, s, batch, device=dev, announce=False)
            n = 0
            for ep in range(epochs):
                if hasattr(inputs.train, "set_epoch"):
                    inputs.train.set_epoch(ep)
                for x, y in inputs.train:
                    if inputs.batch_augment is not None:
                        x = inputs.batch_augment(x, None)
                    _prepare(x, inputs.pre, dev, True)
                    n += len(y)
            rates[name].append(n / (time.perf_counter() - t0))
    us = {k: 1e6 / float(np.median(v)) for k, v in rates.items()}
    return {"machine": machine(), "data": args.data, "subset": args.subset if args.data == "cifar10" else None,
            "workers": args.workers, "batch_size": batch, "model_preprocessing": model, "epochs_per_round": epochs,
            "img_per_s": {k: [round(r) for r in v] for k, v in rates.items()},
            "us_per_img_median": {k: round(v, 1) for k, v in us.items()},
            "extra_us_per_img_vs_base": {k: round(v - us[base], 1) for k, v in us.items()}}


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
    t.add_argument("--model", default="reference_cnn", help="e.g. airbench (the fast recipe's CIFAR network)")
    t.add_argument("--only", nargs="*", default=[], help="run only these variants")
    t.add_argument("--tag", default="", help="a suffix of the results file name")
    q = sub.add_parser("predict")
    q.add_argument("--images", type=int, default=20000)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--workers", type=int, default=1)
    q.add_argument("--rss-sizes", type=int, nargs="*", default=[])
    r = sub.add_parser("recipe")
    r.add_argument("--data", choices=["cifar10", "hymenoptera"], default="cifar10")
    r.add_argument("--subset", type=int, default=12000)
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--rounds", type=int, default=2)
    lo = sub.add_parser("loader")
    lo.add_argument("--data", choices=["cifar10", "hymenoptera"], default="cifar10")
    lo.add_argument("--subset", type=int, default=12000)
    lo.add_argument("--rounds", type=int, default=3)
    lo.add_argument("--workers", type=int, default=None, help="loader workers (default: automatic)")
    m = sub.add_parser("mnist-http")
    m.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    result = {"train": bench_train, "predict": bench_predict, "mnist-http": bench_mnist_http,
              "recipe": bench_recipe, "loader": bench_loader}[args.what](args)
    RESULTS.mkdir(exist_ok=True)
    model = "" if args.what != "train" or args.model == "reference_cnn" else f"_{args.model}"
    model += f"_{args.tag}" if getattr(args, "tag", "") else ""
    path = RESULTS / (f"shards_train_{args.data}{model}.json" if args.what == "train"
                      else f"shards_recipe_{args.data}.json" if args.what == "recipe"
                      else f"shards_loader_{args.data}.json" if args.what == "loader"
                      else f"shards_{args.what}.json")
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
