"""Seconds and model evaluations per explanation, for every method, on two models:
the reference CNN at 28x28 (digits) and a ResNet-18 at 224x224 (random weights: the cost
does not depend on training). Prints one JSON object per (model, method).

    PYTHONPATH=. python bench/explain_methods.py [--images 3] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from imgcls import Classifier
from imgcls.explain import EXPLAINERS, explain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    setups = [("reference_cnn", 1, 28)] + ([] if args.skip_resnet else [("resnet18", 3, 224)])
    for arch, chans, size in setups:
        clf = Classifier.create(arch, num_classes=10, in_chans=chans, img_size=size, seed=0)
        shape = (args.images, size, size) if chans == 1 else (args.images, size, size, 3)
        images = (rng.random(shape) * 255).astype(np.uint8)
        explain(clf, images[:1], method="gradcam", faithfulness=False)  # imports, first-call set-up
        for method in EXPLAINERS.names():
            explain(clf, images[:1], method=method, faithfulness=False)  # library warm-up (numba JIT for shap)
            t0 = time.perf_counter()
            exps = explain(clf, images, method=method, faithfulness=False)
            t_explain = (time.perf_counter() - t0) / len(images)
            t0 = time.perf_counter()
            faith = explain(clf, images[:1], method=method)[0].faithfulness
            t_faith = time.perf_counter() - t0
            print(json.dumps({"model": arch, "input": f"{chans}x{size}x{size}", "method": method,
                              "seconds_per_image": round(t_explain, 3),
                              "model_evaluations": exps[0].evaluations,
                              "faithfulness_evaluations": faith["evaluations"],
                              "seconds_with_faithfulness": round(t_faith, 3),
                              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}),
                  flush=True)


if __name__ == "__main__":
    main()
