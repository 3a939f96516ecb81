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
corner 32x32 crops of each); for the CIFAR-10 model also 5,000 of its own test images darkened
to 70% and with Gaussian noise (sigma 8/255), the same classes under other conditions, where a
score should not reject; inverted MNIST digits (255 - x) and MNIST digits with their pixels
shuffled (one fixed permutation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, default_data, machine  # noqa: E402
from imgcls.api import Classifier  # noqa: E402
from imgcls.data.records import Split  # noqa: E402
from imgcls.engine.conformal import prediction_sets, set_metrics  # noqa: E402
from imgcls.engine.ood import DEFAULT_K, MAX_BANK, fit_stats, knn_distance, make_bank, ood_scores  # noqa: E402
from imgcls.engine.trust_names import FEATURE_METHODS, OOD_METHODS  # noqa: E402
from imgcls.engine.trust import softmax  # noqa: E402
from imgcls.engine.trust_fit import fit_sets  # noqa: E402
from imgcls.evaluation.calibration import temperature_scaling  # noqa: E402
from imgcls.evaluation.trust import ood_metrics  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / "cache"


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


SHIFTED = ("test_dimmed", "test_noisy")  # the same classes, other conditions: what a score should accept


def shifted(x: np.ndarray) -> dict[str, Split]:
    """Test images darkened to 70% and with Gaussian noise (sigma 8 of 255, seeded)."""
    noise = np.random.default_rng(0).normal(0, 8, x.shape)
    return {"test_dimmed": _split((x * 0.7).astype(np.uint8)),
            "test_noisy": _split(np.clip(x + noise, 0, 255).astype(np.uint8))}


def shift_table(table: dict, accuracy: dict) -> dict:
    """For images of the known classes under a shift: the model's top-1 accuracy on them and
    the share each score rejects at the threshold accepting 95% of the test images (1 - FPR95),
    beside its AUROC (0.5: unmoved)."""
    return {name: {"top1_accuracy": accuracy[name], **{
        m: {"rejected_at_95": round(1 - v["fpr95"], 4), "auroc": v["auroc"]} for m, v in row.items()}}
        for name, row in table.items()}


def _net_recording(model, first: list, hooks=None):
    """The network as TTA calls it, keeping the first (un-augmented) view's output; with
    ``hooks`` (a LayerStats), the block statistics follow: ``[features | logits | stats]``,
    as the library's torch backend computes them for the layers score."""
    from imgcls.engine.backends import _with_stats, features_and_logits

    def net(t):
        out = features_and_logits(model, t) if hooks is None else _with_stats(partial(features_and_logits, model),
                                                                              hooks, t)
        if not first:
            first.append(out)
        return out
    return net


@torch.inference_mode()
def tta_and_plain(pred, split: Split) -> dict[str, np.ndarray]:
    """Logits and penultimate features of every image, TTA-averaged exactly as the library's
    torch backend computes them (engine/tta.py) and, from the same pass, of the plain image
    alone (TTA's first view): ``z, f, z0, f0``."""
    from imgcls.data.pipeline import eval_batches
    from imgcls.engine.device import autocast
    from imgcls.engine.tta import tta_forward

    from imgcls.engine.layer_stats import LayerStats

    b = pred.backend
    nf, k = b.num_features, pred.bundle.num_classes
    got: dict[str, list] = {"z": [], "f": [], "s": [], "z0": [], "f0": [], "s0": []}
    hooks = LayerStats(b.model)
    for x, _ in eval_batches(split, pred.bundle.preprocessing, pred.batch_size, device=b.device):
        x = b.pre.normalize(x.to(b.device), b.channels_last)
        first: list = []
        with hooks, autocast(b.device, b.amp):
            avg = tta_forward(_net_recording(b.model, first, hooks), x, b.tta).float().cpu().numpy()
        one = first[0].float().cpu().numpy()
        for view, out in (("", avg), ("0", one)):
            got["f" + view].append(out[:, :nf])
            got["z" + view].append(out[:, nf:nf + k])
            got["s" + view].append(out[:, nf + k:])
    return {k: np.concatenate(v) for k, v in got.items()}


def cached_outputs(clf, parts: dict, cache: Path) -> dict[str, np.ndarray]:
    """``{part}_{z,f,z0,f0,y}`` for every named Split (a callable is called for its Split only
    when not cached), computed once per model weights and kept one file per part under
    ``cache`` (bench/cache/, git-ignored), in the order given: trying another score costs
    seconds, not another pass over 70,000 images, and an interrupted run keeps its parts."""
    from imgcls.engine.layer_stats import stat_layers

    sha = clf.card.get("weights_sha256", "")
    names = {id(m): n for n, m in clf.model.named_modules()}
    layers = ",".join(names[id(m)] for m in stat_layers(clf.model))  # the block statistics' layers
    out: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    with clf.predictor(device="cpu", batch_size=500) as p:
        for name, split in parts.items():
            path = cache / f"{name}.npz"
            if path.is_file():
                with np.load(path, allow_pickle=False) as a:
                    if str(a["weights_sha256"]) == sha and "layers" in a.files and str(a["layers"]) == layers:
                        out.update({f"{name}_{k}": a[k] for k in a.files if k not in ("weights_sha256", "layers")})
                        continue
            t1 = time.perf_counter()
            split = split() if callable(split) else split
            got = {k: (v.astype(np.float16) if k[0] in "fs" else v) for k, v in tta_and_plain(p, split).items()}
            got["y"] = split.labels.numpy()
            np.savez(path, weights_sha256=np.array(sha), layers=np.array(layers), **got)
            out.update({f"{name}_{k}": v for k, v in got.items()})
            print(f"{name}: {len(split)} images, {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    out["inference_s"] = np.array(time.perf_counter() - t0)
    return out


def library_stats(clf, o: dict, method: str, view: str = "", max_images: int | None = MAX_BANK) -> dict | None:
    """The training statistics `imgcls calibrate --ood-method METHOD` stores, from the cached
    training outputs (the same seeded subsample as engine/trust_fit.training_features)."""
    if method not in FEATURE_METHODS:
        return None
    part = "train_sub" if max_images == MAX_BANK else "train"  # train_sub: the library's own subsample
    f, y, z = _features(o, part, method, view), o[f"{part}_y"].astype(np.int64), o[f"{part}_z" + view]
    return fit_stats(method, f, y, 0, clf.model, z)


def _features(o: dict, part: str, method: str, view: str = "") -> np.ndarray:
    """What the library's torch backend hands the score: the penultimate features, for the
    layers score followed by the block statistics (Predictor.run_outputs(features="layers"))."""
    f = o[f"{part}_f" + view].astype(np.float32)
    return np.concatenate([f, o[f"{part}_s" + view].astype(np.float32)], 1) if method == "layers" else f


def ood_table(clf, o: dict, ood_parts: list[str], methods=OOD_METHODS, view: str = "",
              max_images: int | None = MAX_BANK) -> dict:
    """AUROC / FPR95 of each library OOD method (engine/ood.py), in-distribution = test."""
    res: dict = {}
    for method in methods:
        stats = library_stats(clf, o, method, view, max_images)
        s_id = ood_scores(method, o["test_z" + view], _features(o, "test", method, view), stats, DEFAULT_K, 1.0)
        for name in ood_parts:
            s_ood = ood_scores(method, o[f"{name}_z" + view], _features(o, name, method, view), stats, DEFAULT_K, 1.0)
            m = ood_metrics(s_id, s_ood)
            res.setdefault(name, {})[method] = {"auroc": m["auroc"], "fpr95": m["fpr95"], "num_ood": m["num_ood"]}
    return res


def conformal_table(z: np.ndarray, y: np.ndarray, classes: list[str], coverage: float = 0.9,
                    repeats: int = 20) -> dict:
    """Fit on a random half, measure on the other half; repeat over random halves."""
    out = {}
    for method in ("lac", "aps", "raps"):
        covs, sizes, accs, first = [], [], [], None
        for r in range(repeats):
            perm = np.random.default_rng(r).permutation(len(y))
            cal, ev = perm[: len(y) // 2], perm[len(y) // 2:]
            t, _ = temperature_scaling(torch.from_numpy(z[cal]), torch.from_numpy(y[cal]))
            c = fit_sets(z[cal], y[cal], coverage, method, t, "test half")
            sets = prediction_sets(softmax(z[ev], t), c["qhat"], method, c.get("k_reg"), c.get("lambda", 0.0))
            m = set_metrics(sets, y[ev], classes)
            covs.append(m["coverage"])
            sizes.append(m["mean_set_size"])
            accs.append(float((z[ev].argmax(1) == y[ev]).mean()))
            first = first or {"temperature": round(float(t), 4), "qhat": c["qhat"],
                              **{k: c[k] for k in ("k_reg", "lambda") if k in c}, **m}
        out[method] = {"coverage_mean": round(float(np.mean(covs)), 5), "coverage_std": round(float(np.std(covs)), 5),
                       "coverage_min": round(float(np.min(covs)), 5), "coverage_max": round(float(np.max(covs)), 5),
                       "mean_set_size": round(float(np.mean(sizes)), 4), "top1_accuracy": round(float(np.mean(accs)), 5),
                       "repeats": repeats, "first_split": first}
    return out


def _head(clf) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The linear classifier on the penultimate features: weight, bias, output scale."""
    m = clf.model
    fc = m.fc if hasattr(m, "fc") else m.get_classifier()
    b = fc.bias.detach().float() if fc.bias is not None else torch.zeros(fc.out_features)
    return fc.weight.detach().float(), b, float(getattr(m, "scaling_factor", 1.0))


def _kth_similarities(f: torch.Tensor, bank: torch.Tensor, ks, chunk: int = 1000) -> dict:
    """Cosine similarity to the k-th nearest bank row for several k, from one top-k."""
    q = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = bank.float()
    top = torch.cat([(q[i:i + chunk] @ b.T).topk(max(ks), dim=1).values for i in range(0, len(q), chunk)])
    return {k: top[:, k - 1] for k in ks}


def explore(clf, o: dict, ood_parts: list[str]) -> dict:
    """AUROC of candidate scores computed from the cached outputs (seconds): kNN over banks and
    k, ReAct, Mahalanobis, ViM, on TTA-averaged and on plain-view outputs. Scores not in
    engine/ood.py are written here from their papers, for the comparison only."""
    W, bias, scale = _head(clf)
    out: dict = {}
    for view in ("", "0"):
        f_train = torch.from_numpy(o["train_f" + view].astype(np.float32))
        y_train = torch.from_numpy(o["train_y"].astype(np.int64))
        full = make_bank(f_train.numpy(), max_rows=len(f_train))
        sub = make_bank(o["train_sub_f" + view].astype(np.float32))  # the library's own subsample
        mu = torch.stack([f_train[y_train == c].mean(0) for c in range(len(W))])
        centred = f_train - mu[y_train]
        prec = torch.linalg.pinv(centred.T @ centred / len(f_train), hermitian=True)
        fn = f_train / f_train.norm(dim=1, keepdim=True)
        mun = torch.stack([fn[y_train == c].mean(0) for c in range(len(W))])
        cn = fn - mun[y_train]
        precn = torch.linalg.pinv(cn.T @ cn / len(fn), hermitian=True)
        clips = {q: float(np.quantile(f_train.numpy().ravel(), q)) for q in (0.9, 0.95, 0.99)}
        # ViM (Wang et al. 2022): residual outside the principal subspace of the centred features
        origin = -torch.linalg.pinv(W) @ bias
        xc = f_train - origin
        _, _, vt = torch.linalg.svd(xc.T @ xc / len(xc))
        dim = min(len(W) * 6, f_train.shape[1] // 2)
        null = vt[dim:].T
        z_train = f_train @ W.T * scale + bias * scale
        alpha = float(z_train.max(1).values.mean() / (xc @ null).norm(dim=1).mean())

        def scores(name: str) -> dict[str, np.ndarray]:
            f = torch.from_numpy(o[f"{name}_f" + view].astype(np.float32))
            z = torch.from_numpy(o[f"{name}_z" + view].astype(np.float32))
            d = {"energy": -torch.logsumexp(z, 1), "max_logit": -z.max(1).values, "neg_feature_norm": -f.norm(dim=1),
                 "knn_10k_k10": knn_distance(f.numpy(), sub, 10)}
            kth = _kth_similarities(f, full, (1, 5, 10, 20, 50, 100, 200))
            for k, sim in kth.items():
                d[f"knn_all_k{k}"] = -sim  # the distance is monotone in the similarity
            for q, c in clips.items():
                d[f"react_p{round(q * 100)}"] = -torch.logsumexp(f.clamp(max=c) @ W.T * scale + bias * scale, 1)
            diff = f[:, None, :] - mu[None]
            d["mahalanobis"] = ((diff @ prec) * diff).sum(-1).min(1).values
            g = f / f.norm(dim=1, keepdim=True)
            diffn = g[:, None, :] - mun[None]
            d["mahalanobis_l2norm"] = ((diffn @ precn) * diffn).sum(-1).min(1).values
            d["vim"] = alpha * ((f - origin) @ null).norm(dim=1) - torch.logsumexp(z, 1)
            d["vim_residual"] = ((f - origin) @ null).norm(dim=1)
            return {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}

        s_id = scores("test")
        for name in ood_parts:
            s_ood = scores(name)
            out.setdefault("tta" if view == "" else "plain", {})[name] = {
                k: ood_metrics(s_id[k], s_ood[k])["auroc"] for k in s_id}
    return out


def model_parts(clf, data) -> dict:
    """The run's own test split and training split, as `imgcls calibrate` takes them (decoded
    when first needed); the training split in two parts: ``train_sub``, the seeded subsample
    of MAX_BANK images engine/trust_fit.training_features takes, and ``train_rest``."""
    got: dict = {}

    def split(name):
        if name not in got:
            got[name] = clf.eval_data(data, name, announce=False)[2]
        return got[name]

    def train_part(which):
        train = split("train")
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        idx = (idx[:MAX_BANK] if which == "sub" else idx[MAX_BANK:]).sort().values
        return train.subset(idx)
    return {"test": lambda: split("test"), "train_sub": lambda: train_part("sub"),
            "train_rest": lambda: train_part("rest")}


def merge_train(o: dict) -> dict:
    """``train_*``: all training images when ``train_rest`` is cached, else the subsample."""
    for k in ("z", "f", "s", "z0", "f0", "s0", "y"):
        parts = [o[f"train_sub_{k}"]] + ([o[f"train_rest_{k}"]] if f"train_rest_{k}" in o else [])
        o[f"train_{k}"] = np.concatenate(parts)
    return o


def bench_cifar10(args) -> dict:
    clf = Classifier.load(args.run)
    mnist = np.load(default_data("mnist.npz"), allow_pickle=False)
    parts = model_parts(clf, str(default_data("cifar10.npz")))
    parts.update(mnist=_split(mnist["x_test"][: args.max_ood]),
                 hymenoptera_crops=_split(hymenoptera_crops(default_data("hymenoptera"))),
                 **shifted(np.load(default_data("cifar10.npz"), allow_pickle=False)["x_test"][:5000]))
    parts = {k: parts[k] for k in ("test", "mnist", "hymenoptera_crops", "train_sub", "train_rest", *SHIFTED)
             if k != "train_rest" or not args.no_full_train}
    o = merge_train(cached_outputs(clf, parts, CACHE / f"ood_cifar10_{Path(args.run).name}"))
    y = o["test_y"].astype(np.int64)
    res = {"benchmark": "ood_conformal_cifar10", "run": str(args.run), "model": clf.architecture,
           "tta": clf.tta, "test_images": int(len(y)), "train_images": int(len(o["train_y"])), "k": DEFAULT_K,
           "top1_accuracy_full_test": round(float((o["test_z"].argmax(1) == y).mean()), 5),
           "ood": ood_table(clf, o, ["mnist", "hymenoptera_crops"]),
           "covariate_shift": shift_table(ood_table(clf, o, list(SHIFTED)), {
               n: round(float((o[f"{n}_z"].argmax(1) == y[:5000]).mean()), 4) for n in SHIFTED}),
           "conformal": conformal_table(o["test_z"], y, clf.classes), "inference_s": round(float(o["inference_s"]), 1)}
    if args.explore:
        res["explore"] = explore(clf, o, ["mnist", "hymenoptera_crops"])
    return res


def bench_mnist(args) -> dict:
    from imgcls import train

    data = default_data("mnist.npz")
    run = Path(args.out) / "mnist"
    t0 = time.perf_counter()
    if args.retrain or not (run / "model.json").is_file():
        train({"data": str(data), "model": "reference_cnn", "recipe": "fast", "out": str(args.out), "name": "mnist",
               "seed": 0, "exist_ok": True}, progress=False)
    train_s = time.perf_counter() - t0
    clf = Classifier.load(run)
    arrays = np.load(data, allow_pickle=False)
    x = arrays["x_test"][: args.max_images]
    perm = np.random.default_rng(0).permutation(28 * 28)
    shuffled = x.reshape(len(x), -1)[:, perm].reshape(x.shape)
    parts = model_parts(clf, str(data))
    parts.update(inverted_digits=_split(255 - x), shuffled_pixels=_split(shuffled))
    o = merge_train(cached_outputs(clf, parts, CACHE / "ood_mnist"))
    y = o["test_y"].astype(np.int64)
    res = {"benchmark": "ood_conformal_mnist", "model": "reference_cnn", "recipe": "fast",
           "train_s": round(train_s, 1), "test_images": int(len(y)), "train_images": int(len(o["train_y"])),
           "top1_accuracy": round(float((o["test_z"].argmax(1) == y).mean()), 5),
           "ood": ood_table(clf, o, ["inverted_digits", "shuffled_pixels"]),
           "conformal": conformal_table(o["test_z"], y, clf.classes)}
    if args.explore:
        res["explore"] = explore(clf, o, ["inverted_digits", "shuffled_pixels"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["cifar10", "mnist"])
    ap.add_argument("--run", default="runs/cifar10_fast5",
                    help="cifar10: the trained run folder (imgcls train --data ../shared/data/cifar10.npz --epochs 5 "
                         "--out runs --name cifar10_fast5)")
    ap.add_argument("--max-images", type=int, default=10_000, help="in-distribution test images")
    ap.add_argument("--max-ood", type=int, default=5_000, help="MNIST images as OOD (cifar10)")
    ap.add_argument("--explore", action="store_true", help="also score candidate methods not in the library")
    ap.add_argument("--no-full-train", action="store_true",
                    help="cifar10: only the training subsample the library stores (skip the other 35,000 images)")
    ap.add_argument("--retrain", action="store_true", help="mnist: train the model even when --out holds one")
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
