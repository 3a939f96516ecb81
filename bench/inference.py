"""Inference speed, side by side: imgcls (torch, ONNX Runtime fp32, ONNX Runtime int8) vs
Keras ``model.predict``, and resnet18 at 224 px fp32 vs int8.

    # MNIST test set (10,000 images) through the reference CNN, vs Keras in .bench-env:
    python bench/inference.py mnist --run runs/mnist --data ../shared/data/mnist.npz \
        --keras-python .bench-env/bin/python
    # resnet18 at 224 px: batch-1 latency and batch-32 throughput, fp32 vs int8
    python bench/inference.py resnet18 --calib ../shared/data/hymenoptera

Contenders run in rounds (A B C ... A B C ...) so load from other jobs on a shared machine
falls on all of them alike; the JSON printed at the end has every round, the medians and
the ratios. Keras runs in its own process (TensorFlow is never a dependency of imgcls),
kept alive across rounds and driven over stdin, so its start-up is not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The Keras side: the same network (bench/keras_reference.py's), predicting on the test set.
KERAS_WORKER = r'''
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
from tensorflow import keras
with np.load(sys.argv[1]) as d:
    x = (d["x_test"].astype("float32") / 255.0)[..., None]
model = keras.Sequential([
    keras.Input(shape=(28, 28, 1)),
    keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(2),
    keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(2),
    keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
    keras.layers.Dense(10, activation="softmax"),
])
model.predict(x[:256], verbose=0)  # build + trace outside the timing
print(json.dumps({"ready": True, "keras": keras.__version__}), flush=True)
for line in sys.stdin:
    bs = int(line)
    t0 = time.perf_counter()
    model.predict(x, batch_size=bs, verbose=0)
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
'''


class Keras:
    def __init__(self, python: str, data: str):
        self.proc = subprocess.Popen([python, "-c", KERAS_WORKER, data], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def run(self, batch_size: int) -> float:
        self.proc.stdin.write(f"{batch_size}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rounds(contenders: dict, n_rounds: int, images: int) -> dict:
    per = {k: [] for k in contenders}
    for _ in range(n_rounds):
        for name, fn in contenders.items():
            per[name].append(fn())
    out = {}
    for name, secs in per.items():
        med = statistics.median(secs)
        out[name] = {"img_per_s": round(images / med, 1), "median_s": round(med, 4),
                     "rounds_img_per_s": [round(images / s, 1) for s in secs]}
    return out


def versions() -> dict:
    import onnxruntime

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}


def bench_mnist(args) -> dict:
    from imgcls.api import Classifier
    from imgcls.export import export_run

    with np.load(args.data) as d:
        x, y = d["x_test"], d["y_test"]
    clf = Classifier.load(args.run)
    if not (Path(args.run) / "model.int8.onnx").is_file() or args.reexport:
        export_run(clf, "onnx", int8=True, log=lambda m: print(m, file=sys.stderr))
    bs = args.batch_size
    keras = Keras(args.keras_python, args.data) if args.keras_python else None
    contenders = {
        f"imgcls torch (bs {bs})": lambda: timed(lambda: clf.predict_proba(x, batch_size=bs, backend="torch")),
        f"imgcls onnx fp32 (bs {bs})": lambda: timed(lambda: clf.predict_proba(x, batch_size=bs, backend="onnx")),
        f"imgcls onnx int8 (bs {bs})": lambda: timed(lambda: clf.predict_proba(x, batch_size=bs,
                                                                             backend="onnx-int8")),
    }
    if keras is not None:
        contenders["keras predict (bs 32, its default)"] = lambda: keras.run(32)
        contenders[f"keras predict (bs {bs})"] = lambda: keras.run(bs)
    for fn in contenders.values():  # warm-up: thread pools, allocators, ORT sessions
        fn()
    res = rounds(contenders, args.rounds, len(x))
    if keras is not None:
        keras.close()
    acc = {b: float((clf.predict_proba(x, batch_size=bs, backend=b)[0].argmax(1) == y).mean())
           for b in ("torch", "onnx", "onnx-int8")}
    best_keras = max((v["img_per_s"] for k, v in res.items() if k.startswith("keras")), default=None)
    ratios = {k: round(v["img_per_s"] / best_keras, 2) for k, v in res.items()} if best_keras else {}
    return {"bench": "mnist-inference", "images": len(x), "batch_size": bs, "rounds": args.rounds, "results": res,
            "ratio_vs_best_keras": ratios, "test_accuracy": acc, "versions": versions(),
            "keras": keras.info if keras else None}


def bench_resnet18(args) -> dict:
    from imgcls.api import Classifier
    from imgcls.data.sources import load_data
    from imgcls.export import export_run
    from imgcls.engine.backends import OnnxBackend, TorchBackend

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    try:
        data = load_data(args.calib)
        clf = Classifier.create("resnet18", classes=data.classes, in_chans=3, img_size=224, seed=0)
        clf.preprocessing = dataclasses.replace(clf.preprocessing, resize="shorter_side", crop_pct=0.875)
        clf.save(tmp / "run")
        clf = Classifier.load(tmp / "run")
        # random weights: accuracy is meaningless here, so no accuracy gate (--max-drop 100)
        export_run(clf, "onnx", int8=True, data=args.calib, max_drop=100, parity_images=64,
                   calib_images=args.calib_images, log=lambda m: print(m, file=sys.stderr))
        fp32 = OnnxBackend(tmp / "run" / "model.onnx", clf.preprocessing)
        int8 = OnnxBackend(tmp / "run" / "model.int8.onnx", clf.preprocessing)
        torch_fp32 = TorchBackend(clf.model, clf.preprocessing, "cpu", "fp32")
        torch_auto = TorchBackend(clf.model, clf.preprocessing, "cpu", "auto")  # bf16 where the CPU is fast at it
        auto_name = f"torch {'bf16' if torch_auto.amp is not None else 'fp32 (auto)'}"
        rng = np.random.default_rng(0)
        x32 = torch.from_numpy(rng.integers(0, 256, (32, 3, 224, 224), dtype=np.uint8))
        x1 = x32[:1]
        lat = {"onnx fp32": lambda: timed(lambda: fp32.logits(x1)),
               "onnx int8": lambda: timed(lambda: int8.logits(x1)),
               "torch fp32": lambda: timed(lambda: torch_fp32.logits(x1)),
               auto_name: lambda: timed(lambda: torch_auto.logits(x1))}
        thr = {"onnx fp32": lambda: timed(lambda: fp32.logits(x32)),
               "onnx int8": lambda: timed(lambda: int8.logits(x32)),
               "torch fp32": lambda: timed(lambda: torch_fp32.logits(x32)),
               auto_name: lambda: timed(lambda: torch_auto.logits(x32))}
        for fn in [*lat.values(), *thr.values()]:
            fn()
        b1 = rounds(lat, args.latency_rounds, 1)
        b32 = rounds(thr, args.rounds, 32)
        latency = {k: {"median_ms": round(1000 * v["median_s"], 2),
                       "rounds_ms": [round(1000 / r, 2) for r in v["rounds_img_per_s"]]} for k, v in b1.items()}
        return {"bench": "resnet18-224", "batch1_latency": latency, "batch32_throughput": b32,
                "int8_speedup": {"batch1_latency": round(latency["onnx fp32"]["median_ms"]
                                                         / latency["onnx int8"]["median_ms"], 2),
                                 "batch32_throughput": round(b32["onnx int8"]["img_per_s"]
                                                             / b32["onnx fp32"]["img_per_s"], 2)},
                "model_mb": {"fp32": round((tmp / "run" / "model.onnx").stat().st_size / 2**20, 1),
                             "int8": round((tmp / "run" / "model.int8.onnx").stat().st_size / 2**20, 1)},
                "calibration_images": args.calib_images, "versions": versions()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="which", required=True)
    m = sub.add_parser("mnist")
    m.add_argument("--run", required=True, help="a reference_cnn run trained on MNIST")
    m.add_argument("--data", default="../shared/data/mnist.npz")
    m.add_argument("--keras-python", default=None, help="python of an environment with TensorFlow/Keras")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--rounds", type=int, default=5)
    m.add_argument("--reexport", action="store_true")
    r = sub.add_parser("resnet18")
    r.add_argument("--calib", default="../shared/data/hymenoptera", help="images to calibrate int8 on")
    r.add_argument("--calib-images", type=int, default=64)
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--latency-rounds", type=int, default=30)
    args = ap.parse_args()
    out = bench_mnist(args) if args.which == "mnist" else bench_resnet18(args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
