"""How the ``layers`` OOD score's layers, shrinkage and combination were chosen (exploration).

    flock /tmp/imgcls-heavy.lock env PYTHONPATH=$PWD python bench/ood_layers_explore.py --run /work/runs/cifar10_fast

For a CIFAR-10 run: the channel means and standard deviations of *every* plain convolution
(forward hooks, the plain view only: no TTA), then, from those cached outputs, the AUROC of a
Gaussian (Mahalanobis) score per layer and of sums / maxima of standardised layer scores with
the penultimate kNN distance, against MNIST (32x32 RGB), hymenoptera 32x32 crops, and the
model's own test images darkened to 70% or with Gaussian noise (sigma 8/255), where a score
should *not* fire. Fits on one half of a seeded 10,000-image training subsample and
standardises on the other, as engine/ood.fit_layers does. Prints and writes
bench/results/ood_layers_explore.json; (AUROC, share rejected at 95% of test accepted).
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
from bench.ood_conformal import _split, hymenoptera_crops, shifted  # noqa: E402
from imgcls.api import Classifier  # noqa: E402
from imgcls.data.pipeline import eval_batches  # noqa: E402
from imgcls.engine.backends import features_and_logits  # noqa: E402
from imgcls.engine.device import autocast  # noqa: E402
from imgcls.engine.ood import knn_distance, make_bank  # noqa: E402
from imgcls.evaluation.trust import ood_metrics  # noqa: E402


def all_layer_outputs(clf, split, convs) -> dict[str, np.ndarray]:
    """Penultimate features and per-conv [channel means | stds] of every image, plain view."""
    got: list = []

    def hook(mod, inp, out):
        a = out.float()
        got.append(torch.cat([a.mean((2, 3)), a.std((2, 3), correction=0)], 1))

    handles = [c.register_forward_hook(hook) for c in convs]
    nf = clf.model.num_features
    feats, stats = [], []
    try:
        with torch.inference_mode():
            for x, _ in eval_batches(split, clf.preprocessing, 500):
                got.clear()
                with autocast(torch.device("cpu"), torch.bfloat16):
                    out = features_and_logits(clf.model, clf.preprocessing.normalize(x, True)).float()
                feats.append(out[:, :nf].numpy())
                stats.append(torch.cat(got, 1).numpy())
    finally:
        for h in handles:
            h.remove()
    return {"f": np.concatenate(feats), "s": np.concatenate(stats)}


def scores(o: dict, dims: list[int], names: list[str], shrinks=(0.1, 0.3, 1.0)) -> dict:
    offs = np.cumsum([0] + dims)
    tr = o["train"]
    half = np.arange(len(tr["s"])) % 2 == 0

    def m(a, b):
        r = ood_metrics(a, b)
        return [round(r["auroc"], 4), round(1 - r["fpr95"], 3)]

    def standardise(sc):
        ref = sc["train"][~half]
        return {n: (sc[n] - ref.mean()) / ref.std() for n in sc}

    bank = make_bank(tr["f"][half])
    kn = {n: knn_distance(o[n]["f"], bank, 10) for n in o}
    res: dict = {"knn": {n: m(kn["test"], kn[n]) for n in names}}
    zk = standardise(kn)
    for shrink in shrinks:
        z = []
        for li in range(len(dims)):
            x = tr["s"][half, offs[li]:offs[li + 1]]
            mu, cov = x.mean(0), np.cov(x, rowvar=False)
            prec = np.linalg.inv(cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov)))
            sc = {}
            for n in o:
                d = o[n]["s"][:, offs[li]:offs[li + 1]] - mu
                sc[n] = np.einsum("ij,jk,ik->i", d, prec, d)
            res[f"shrink{shrink}_layer{li}"] = {n: m(sc["test"], sc[n]) for n in names}
            z.append(standardise(sc))
        mid = [i for i in range(len(dims)) if 0.5 <= i / max(1, len(dims) - 1) <= 0.75]
        combos = {"middle": mid, "first2": [0, 1], "all": list(range(len(dims))), **{f"layer{i}": [i] for i in mid}}
        for cname, idx in combos.items():
            for how, f in (("sum", np.sum), ("max", np.max)):
                comb = {n: f([z[i][n] for i in idx] + [zk[n]], 0) for n in o}
                res[f"shrink{shrink}_{how}_{cname}+knn"] = {n: m(comb["test"], comb[n]) for n in names}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a CIFAR-10 run folder (imgcls train --data cifar10.npz)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ood_layers_explore.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    clf = Classifier.load(args.run)
    clf.model.eval()
    convs = [c for c in clf.model.modules() if isinstance(c, torch.nn.Conv2d) and c.groups == 1]
    data = str(default_data("cifar10.npz"))
    train = clf.eval_data(data, "train", announce=False)[2]
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:10_000].sort().values
    mnist = np.load(default_data("mnist.npz"), allow_pickle=False)
    parts = {"test": clf.eval_data(data, "test", announce=False)[2], "train": train.subset(idx),
             "mnist": _split(mnist["x_test"][:5000]), "hymenoptera_crops": _split(hymenoptera_crops(default_data("hymenoptera"))),
             **shifted(np.load(data, allow_pickle=False)["x_test"][:5000])}
    t0 = time.perf_counter()
    o = {n: all_layer_outputs(clf, s, convs) for n, s in parts.items()}
    names = [n for n in parts if n not in ("test", "train")]
    res = {"benchmark": "ood_layers_explore", "run": args.run, "convs": [c.out_channels for c in convs],
           "inference_s": round(time.perf_counter() - t0, 1), "scores": scores(o, [2 * c.out_channels for c in convs], names),
           "machine": machine(), "command": "python bench/ood_layers_explore.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for k, v in res["scores"].items():
        print(k, v)


if __name__ == "__main__":
    main()
