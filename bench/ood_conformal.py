"""Trust benchmark: "unknown" rejection (AUROC, FPR95 per OOD method) and conformal coverage.

    # CIFAR-10 model (the fast recipe's airbench) against MNIST and hymenoptera crops
    flock /tmp/imgcls-heavy.lock python bench/ood_conformal.py cifar10 --run runs/cifar10_fast5
    # an MNIST reference_cnn (trained here, fast recipe) against inverted and pixel-shuffled digits
    flock /tmp/imgcls-heavy.lock python bench/ood_conformal.py mnist

Everything goes through the library's own code (Predictor, engine/ood.py, engine/conformal.py,
evaluation/trust.py), so the figures are those of `imgcls calibrate` / `imgcls evaluate --ood`.

Protocol. Conformal: temperature and sets are fitted on a random half of the test set and
measured on the other half (repeated over 20 random halves from the same logits: mean and
spread). OOD: in-distribution = the whole test set; the kNN bank is 10,000 training images;
the threshold-free AUROC and FPR at 95% TPR (OpenOOD's definitions) per method.
OOD sets: MNIST test digits (1-channel 28x28, resized to 32x32 RGB by the model's own
preprocessing), hymenoptera photos (shorter side resized to 64, then the centre and four
corner 32x32 crops of each), inverted MNIST digits (255 - x) and MNIST digits with their pixels
shuffled (one fixed permutation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, default_data, machine  # noqa: E402
from imgcls.api import Classifier  # noqa: E402
from imgcls.data.records import Split  # noqa: E402
from imgcls.engine.conformal import prediction_sets, set_metrics  # noqa: E402
from imgcls.engine.ood import DEFAULT_K, ood_scores  # noqa: E402
from imgcls.engine.trust import softmax  # noqa: E402
from imgcls.engine.trust_fit import feature_bank, fit_sets  # noqa: E402
from imgcls.evaluation.calibration import temperature_scaling  # noqa: E402
from imgcls.evaluation.trust import ood_metrics  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _split(x: np.ndarray) -> Split:
    t = torch.from_numpy(x)
    t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return Split(labels=torch.zeros(len(t), dtype=torch.long), images=t.contiguous())


def hymenoptera_crops(root: Path, side: int = 32) -> np.ndarray:
    from PIL import Image

    out = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        try:
            img = Image.open(path).convert("RGB")
        except OSError:
            continue
        w, h = img.size
        s = 64 / min(w, h)
        img = np.asarray(img.resize((max(64, round(w * s)), max(64, round(h * s))), Image.BILINEAR))
        H, W = img.shape[:2]
        for y0, x0 in ((H // 2 - side // 2, W // 2 - side // 2), (0, 0), (0, W - side), (H - side, 0),
                       (H - side, W - side)):
            out.append(img[y0:y0 + side, x0:x0 + side])
    return np.stack(out)


def outputs(pred, split: Split):
    z, _, f = pred.run_outputs(split, features=True)
    return z, f


def ood_table(id_out, others: dict, bank: torch.Tensor, temperature: float) -> dict:
    z_id, f_id = id_out
    res = {}
    for name, (z, f) in others.items():
        row = {}
        for method in ("msp", "energy", "knn"):
            s_id = ood_scores(method, z_id, f_id, bank, DEFAULT_K, temperature)
            s_ood = ood_scores(method, z, f, bank, DEFAULT_K, temperature)
            m = ood_metrics(s_id, s_ood)
            row[method] = {"auroc": m["auroc"], "fpr95": m["fpr95"], "num_ood": m["num_ood"]}
        res[name] = row
    return res


def conformal_table(z: np.ndarray, y: np.ndarray, classes: list[str], coverage: float = 0.9,
                    repeats: int = 20) -> dict:
    """Fit on a random half, measure on the other half; repeat over random halves."""
    out = {}
    for method in ("lac", "aps"):
        covs, sizes, accs, first = [], [], [], None
        for r in range(repeats):
            perm = np.random.default_rng(r).permutation(len(y))
            cal, ev = perm[: len(y) // 2], perm[len(y) // 2:]
            t, _ = temperature_scaling(torch.from_numpy(z[cal]), torch.from_numpy(y[cal]))
            c = fit_sets(z[cal], y[cal], coverage, method, t, "test half")
            sets = prediction_sets(softmax(z[ev], t), c["qhat"], method)
            m = set_metrics(sets, y[ev], classes)
            covs.append(m["coverage"])
            sizes.append(m["mean_set_size"])
            accs.append(float((z[ev].argmax(1) == y[ev]).mean()))
            first = first or {"temperature": round(float(t), 4), "qhat": c["qhat"], **m}
        out[method] = {"coverage_mean": round(float(np.mean(covs)), 5), "coverage_std": round(float(np.std(covs)), 5),
                       "coverage_min": round(float(np.min(covs)), 5), "coverage_max": round(float(np.max(covs)), 5),
                       "mean_set_size": round(float(np.mean(sizes)), 4), "top1_accuracy": round(float(np.mean(accs)), 5),
                       "repeats": repeats, "first_split": first}
    return out


def bench_cifar10(args) -> dict:
    data = np.load(default_data("cifar10.npz"), allow_pickle=False)
    mnist = np.load(default_data("mnist.npz"), allow_pickle=False)
    clf = Classifier.load(args.run)
    n = args.max_images
    t0 = time.perf_counter()
    with clf.predictor(device="cpu", batch_size=500) as p:
        z_id, f_id = outputs(p, Split(labels=torch.from_numpy(data["y_test"][:n].astype(np.int64)),
                                      images=torch.from_numpy(data["x_test"][:n]).permute(0, 3, 1, 2).contiguous()))
        train = Split(labels=torch.from_numpy(data["y_train"].astype(np.int64)),
                      images=torch.from_numpy(data["x_train"]).permute(0, 3, 1, 2).contiguous())
        bank = feature_bank(p, train)
        others = {"mnist": outputs(p, _split(mnist["x_test"][: args.max_ood])),
                  "hymenoptera_crops": outputs(p, _split(hymenoptera_crops(default_data("hymenoptera"))))}
    y = data["y_test"][:n].astype(np.int64)
    if args.save_outputs:  # logits and features, to re-derive tables without the model
        np.savez(args.save_outputs, z_id=z_id, f_id=f_id, y=y, bank=bank.float().numpy(),
                 **{f"z_{k}": v[0] for k, v in others.items()}, **{f"f_{k}": v[1] for k, v in others.items()})
    res = {"benchmark": "ood_conformal_cifar10", "run": str(args.run), "model": clf.architecture,
           "tta": clf.tta, "test_images": int(len(y)), "bank_images": int(len(bank)), "k": DEFAULT_K,
           "top1_accuracy_full_test": round(float((z_id.argmax(1) == y).mean()), 5),
           "ood": ood_table((z_id, f_id), others, bank, 1.0),
           "conformal": conformal_table(z_id, y, clf.classes), "inference_s": round(time.perf_counter() - t0, 1)}
    return res


def bench_mnist(args) -> dict:
    from imgcls import train

    data = default_data("mnist.npz")
    t0 = time.perf_counter()
    r = train({"data": str(data), "model": "reference_cnn", "recipe": "fast", "out": str(args.out), "name": "mnist",
               "seed": 0}, progress=False)
    train_s = time.perf_counter() - t0
    arrays = np.load(data, allow_pickle=False)
    x, y = arrays["x_test"][: args.max_images], arrays["y_test"][: args.max_images].astype(np.int64)
    perm = np.random.default_rng(0).permutation(28 * 28)
    shuffled = x.reshape(len(x), -1)[:, perm].reshape(x.shape)
    clf = r.classifier
    with clf.predictor(device="cpu", batch_size=500) as p:
        id_out = outputs(p, Split(labels=torch.from_numpy(y), images=torch.from_numpy(x)[:, None].contiguous()))
        train_x = torch.from_numpy(arrays["x_train"])[:, None].contiguous()
        bank = feature_bank(p, Split(labels=torch.zeros(len(train_x), dtype=torch.long), images=train_x))
        others = {"inverted_digits": outputs(p, _split(255 - x)), "shuffled_pixels": outputs(p, _split(shuffled))}
    return {"benchmark": "ood_conformal_mnist", "model": "reference_cnn", "recipe": "fast",
            "train_s": round(train_s, 1), "test_images": int(len(y)), "bank_images": int(len(bank)),
            "top1_accuracy": round(float((id_out[0].argmax(1) == y).mean()), 5),
            "ood": ood_table(id_out, others, bank, 1.0), "conformal": conformal_table(id_out[0], y, clf.classes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["cifar10", "mnist"])
    ap.add_argument("--run", default="runs/cifar10_fast5",
                    help="cifar10: the trained run folder (imgcls train --data ../shared/data/cifar10.npz --epochs 5 "
                         "--out runs --name cifar10_fast5)")
    ap.add_argument("--max-images", type=int, default=10_000, help="in-distribution test images")
    ap.add_argument("--max-ood", type=int, default=5_000, help="MNIST images as OOD (cifar10)")
    ap.add_argument("--save-outputs", default="/tmp/imgcls-bench-ood-cifar10.npz", help="cifar10: logits/features here")
    ap.add_argument("--out", default="/tmp/imgcls-bench-ood", help="mnist: where the run folder goes")
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = bench_cifar10(args) if args.which == "cifar10" else bench_mnist(args)
    res.update(machine=machine(), command="python bench/ood_conformal.py " + " ".join(sys.argv[1:]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"ood_conformal_{args.which}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
