"""Out-of-distribution ("unknown") scores: how unlike the training images an image is.

Every score is "higher = more unusual", so one threshold rule serves all methods:

- ``msp``: 1 - the maximum softmax probability (Hendrycks & Gimpel, 2017);
- ``energy``: the free energy ``-T logsumexp(logits / T)`` (Liu et al., 2020), T = 1; for a
  multi-label model (a sigmoid per label) the per-label energy summed over labels, JointEnergy
  (Wang et al., "Can multi-label classification networks know what they don't know?", NeurIPS
  2021): ``-sum_j log(1 + exp(logit_j))``: an image that no label fits gets low logits on all;
- ``knn``: the distance from the image's L2-normalised penultimate features to their k-th
  nearest neighbour among the training images' (Sun et al., 2022). The training features are
  stored beside the weights (``ood_features.safetensors``, float16, a seeded subsample of at
  most ``MAX_BANK`` images), so a run folder stays self-contained;
- ``layers``: kNN plus the block statistics of the network's middle convolutions
  (engine/layer_stats.py: each channel's mean and standard deviation): a Gaussian per hooked
  layer (Mahalanobis distance, as Lee et al., NeurIPS 2018, do at several layers), each score
  standardised on held-out training images, summed with the standardised kNN distance, so an
  image whose mid-level statistics are unlike every training image's (a grey digit among
  photos) is caught even when its penultimate features sit near a class;
- ``mahalanobis``, ``react``, ``vim``: on the penultimate features (see their functions).

The threshold is the ``accept`` quantile of the scores of in-distribution validation images
(default 95% accepted); a prediction whose score is above it answers "unknown".

kNN is a brute-force matrix product in torch: with <= 10,000 stored vectors that is ~1 ms a
batch on a CPU, so FAISS (what the paper uses) would be a dependency without a gain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imgcls.bundle import OOD_FEATURES_FILE as FEATURES_FILE
from imgcls.errors import ImgclsError

# docs/benchmarks.md (bench/ood_conformal.py): layers has the best mean AUROC over the four OOD sets
# (CIFAR-10 model vs MNIST / hymenoptera crops, MNIST model vs inverted / shuffled digits), so a
# bare `--ood-method` fits it; a model never fitted scores with energy, the best score that needs
# only logits (3 of the 4 sets against msp), so it works on every backend without stored statistics.
from imgcls.engine.trust_names import BEST_OOD_METHOD, DEFAULT_ACCEPT, DEFAULT_OOD_METHOD, OOD_METHODS  # noqa: E402,F401
MAX_BANK = 10_000
DEFAULT_K = 10  # Sun et al.: k=50 for all 50k CIFAR-10 images, k scales with the stored fraction


def check_method(method: str) -> str:
    if method not in OOD_METHODS:
        raise ImgclsError(f"unknown --ood-method '{method}'", f"use {', '.join(OOD_METHODS)}")
    return method


def normalise(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn_distance(features: np.ndarray, bank: torch.Tensor, k: int = DEFAULT_K, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance of each normalised feature row to its k-th nearest bank row."""
    q = normalise(features)
    bank = bank.float()
    k = max(1, min(k, len(bank)))
    out = []
    for i in range(0, len(q), chunk):
        sim = q[i:i + chunk] @ bank.T
        kth = sim.topk(k, dim=1).values[:, -1]
        out.append((2 - 2 * kth).clamp_min(0).sqrt())
    return torch.cat(out).numpy() if out else np.empty(0, np.float32)


def check_multi_label(method: str) -> str:
    """The methods that mean something for a multi-label model (a sigmoid per label)."""
    from imgcls.engine.trust_names import MULTI_LABEL_OOD_METHODS

    if method not in MULTI_LABEL_OOD_METHODS:
        raise ImgclsError(f"--ood-method {method} is a softmax score, and this model is multi-label (a sigmoid per "
                          "label)", f"use {' or '.join(MULTI_LABEL_OOD_METHODS)} (energy is per-label there)")
    return method


def ood_scores(method: str, logits: np.ndarray, features: np.ndarray | None = None,
               stats: dict[str, torch.Tensor] | torch.Tensor | None = None, k: int = DEFAULT_K,
               temperature: float = 1.0, multi_label: bool = False) -> np.ndarray:
    """(N,) scores, higher = more unusual. ``msp`` uses the calibration temperature;
    ``multi_label``: ``energy`` is the per-label JointEnergy (``msp`` is refused). The
    feature scores take the penultimate ``features`` and the training statistics ``stats``
    (:func:`fit_stats`; for kNN a bare bank tensor is accepted too)."""
    check_method(method)
    if multi_label:
        check_multi_label(method)
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    if method == "msp":
        return (1 - torch.softmax(z / temperature, dim=1).max(1).values).numpy()
    if method == "energy":
        return (-torch.nn.functional.softplus(z).sum(1) if multi_label else -torch.logsumexp(z, dim=1)).numpy()
    if features is None or stats is None:
        raise ImgclsError(f"the {method} OOD score needs the network's penultimate features",
                          "use the torch backend (--backend torch), or recalibrate with --ood-method energy")
    if isinstance(stats, torch.Tensor):
        stats = {"features": stats}
    if method == "knn":
        return knn_distance(features, stats["features"], k)
    if method == "layers":
        return layer_scores(features, stats, k).sum(1).numpy()
    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if method == "mahalanobis":
        return mahalanobis(f, stats["means"].float(), stats["precision"].float()).numpy()
    if method == "react":
        z = f.clamp(max=float(stats["clip"])) @ stats["weight"].float().T + stats["bias"].float()
        return (-torch.logsumexp(z, dim=1)).numpy()
    if method == "vim":
        residual = ((f - stats["origin"].float()) @ stats["null"].float()).norm(dim=1)
        return (float(stats["alpha"]) * residual - torch.logsumexp(z, dim=1)).numpy()
    raise AssertionError(method)  # check_method lets only known names through


def mahalanobis(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """min over classes of (f - mu_c)^T P (f - mu_c), the class-conditional Gaussian score
    with one shared covariance (Lee et al., NeurIPS 2018)."""
    mp = means @ precision
    const = (mp * means).sum(1)
    out = [((f[i:i + chunk] @ precision) * f[i:i + chunk]).sum(1, keepdim=True) - 2 * f[i:i + chunk] @ mp.T + const
           for i in range(0, len(f), chunk)]
    return torch.cat(out).min(1).values.clamp_min(0) if out else torch.empty(0)


REACT_PERCENTILE = 0.9  # ReAct (Sun et al., NeurIPS 2021): clip at the 90th percentile of training activations


def linear_head(model: torch.nn.Module, features: np.ndarray, logits: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier on the penultimate features as ``logits = f @ W.T + b`` (a model's output
    scale folded in), checked against the network's own logits on these images."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear):
        raise ImgclsError(f"--ood-method react clips the features before a linear classifier, and this network's "
                          f"is {type(head).__name__}", "use --ood-method knn or energy")
    scale = float(getattr(model, "scaling_factor", 1.0))
    w = head.weight.detach().float().cpu() * scale
    b = (head.bias.detach().float().cpu() if head.bias is not None else torch.zeros(len(w))) * scale
    f, z = torch.as_tensor(np.asarray(features, np.float32)), torch.as_tensor(np.asarray(logits, np.float32))
    err = float((f @ w.T + b - z).abs().max()) if len(z) else 0.0
    if err > 0.05 * max(1.0, float(z.abs().max())):
        raise ImgclsError(f"--ood-method react: the classifier does not map the penultimate features to the logits "
                          f"(max error {err:.3g})", "use --ood-method knn or energy")
    return w.contiguous(), b.contiguous()


def fit_stats(method: str, features: np.ndarray, labels: np.ndarray | None = None, seed: int = 0,
              model: torch.nn.Module | None = None, logits: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """What a feature score keeps of the training images (ood_features.safetensors): the kNN
    bank; the class means and shared precision matrix (Mahalanobis); the clip value and the
    linear classifier (ReAct)."""
    if method == "knn":
        return {"features": make_bank(features, seed=seed)}
    if method == "layers":
        return fit_layers(features, _stat_dims(model, features), seed)
    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if method == "mahalanobis":
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        classes = torch.unique(y)
        means = torch.zeros(int(y.max()) + 1 if len(y) else 0, f.shape[1])
        for c in classes:
            means[c] = f[y == c].mean(0)
        centred = f - means[y]
        cov = centred.T.double() @ centred.double() / max(1, len(f))
        return {"means": means[classes].contiguous(), "precision": torch.linalg.pinv(cov, hermitian=True).float()}
    if method == "react":
        w, b = linear_head(model, features, logits)
        clip = torch.quantile(f.flatten()[torch.randperm(f.numel(), generator=torch.Generator().manual_seed(seed))
                                          [:1_000_000]], REACT_PERCENTILE)
        return {"clip": clip.reshape(1), "weight": w, "bias": b}
    if method == "vim":
        return fit_vim(f, *linear_head(model, features, logits), torch.as_tensor(np.asarray(logits, np.float32)))
    raise AssertionError(method)


def fit_vim(f: torch.Tensor, w: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """ViM (Wang et al., CVPR 2022): the norm of the features' part outside their principal
    subspace (about the origin where the logits are 0), scaled to the mean maximum logit, as
    a virtual logit next to the energy. Principal dimensions: min(6 K, D / 2)."""
    origin = -(torch.linalg.pinv(w) @ b)
    x = (f - origin).double()
    _, vecs = torch.linalg.eigh(x.T @ x / max(1, len(x)))  # ascending eigenvalues
    dim = min(6 * len(w), f.shape[1] // 2)
    null = vecs[:, : f.shape[1] - dim].float()
    alpha = z.max(1).values.mean() / ((f - origin) @ null).norm(dim=1).mean().clamp_min(1e-12)
    return {"origin": origin.contiguous(), "null": null.contiguous(), "alpha": alpha.reshape(1).float()}


# ---------------------------------------------------------------------- layers: block statistics + kNN
# covariance shrinkage towards a scaled identity (cov + SHRINK * mean variance * I): a layer's
# statistics are strongly correlated, and 5,000 images fit up to 2 x 256 of them; on the CIFAR-10
# network 1.0 beat 0.1 and 0.3 (AUROC vs MNIST 0.992 vs 0.982 / 0.988 for the fifth convolution)
SHRINK = 1.0


def _stat_dims(model: torch.nn.Module | None, features: np.ndarray) -> list[int]:
    if model is None:
        raise ImgclsError("the layers OOD score is fitted from the network itself",
                          "pass the model (fit_stats(model=))")
    from imgcls.engine.layer_stats import stat_dims

    return stat_dims(model)


def _gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision matrix of the rows of ``x``, the covariance shrunk by SHRINK."""
    mean = x.mean(0)
    c = (x - mean).double()
    cov = c.T @ c / max(1, len(c) - 1)
    cov += SHRINK * torch.trace(cov) / len(cov) * torch.eye(len(cov), dtype=cov.dtype)
    return mean, torch.linalg.inv(cov).float()


def fit_layers(features: np.ndarray, dims: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """The ``layers`` score's statistics from training rows ``[penultimate | block statistics]``:
    one half (seeded) fits a Gaussian per hooked layer and the kNN bank; the other half gives
    each of those scores' mean and spread on images the fit never saw, so they can be
    compared on one scale (the score is their sum)."""
    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if len(f) < 20:
        raise ImgclsError(f"the layers OOD score needs at least 20 training images, got {len(f)}",
                          "give more training images, or use --ood-method knn")
    nf = f.shape[1] - sum(dims)
    if nf < 1:
        raise ImgclsError("the features hold no block statistics", "compute them with features='layers'")
    perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))
    fit, held = f[perm[: len(f) // 2].sort().values], f[perm[len(f) // 2:].sort().values]
    stats: dict[str, torch.Tensor] = {"features": make_bank(fit[:, :nf].numpy(), seed=seed),
                                      "dims": torch.tensor([nf, *dims], dtype=torch.int64)}
    start = nf
    for i, d in enumerate(dims):
        stats[f"mean{i}"], stats[f"precision{i}"] = _gaussian(fit[:, start:start + d])
        start += d
    ref = layer_scores(held, {**stats, "loc": torch.zeros(len(dims) + 1), "scale": torch.ones(len(dims) + 1)})
    stats["loc"], stats["scale"] = ref.mean(0), ref.std(0).clamp_min(1e-6)
    return stats


def layer_scores(features: np.ndarray | torch.Tensor, stats: dict[str, torch.Tensor], k: int = DEFAULT_K,
                 chunk: int = 4096) -> torch.Tensor:
    """(N, layers + 1) standardised scores: the Mahalanobis distance of each hooked layer's
    statistics to the training images', then the penultimate kNN distance."""
    f = torch.as_tensor(np.asarray(features, dtype=np.float32))
    nf, *dims = (int(v) for v in stats["dims"])
    if f.shape[1] != nf + sum(dims):
        raise ImgclsError(f"the layers OOD score expects {nf + sum(dims)} features per image, got {f.shape[1]}",
                          "the run's ood_features.safetensors belongs to another network: recalibrate it")
    cols, start = [], nf
    for i, d in enumerate(dims):
        mean, prec = stats[f"mean{i}"].float(), stats[f"precision{i}"].float()
        x = f[:, start:start + d] - mean
        cols.append(torch.cat([((x[j:j + chunk] @ prec) * x[j:j + chunk]).sum(1) for j in range(0, len(x), chunk)])
                    if len(x) else torch.empty(0))
        start += d
    cols.append(torch.from_numpy(knn_distance(f[:, :nf].numpy(), stats["features"], k)))
    return (torch.stack(cols, 1) - stats["loc"].float()) / stats["scale"].float()


def fit_threshold(scores: np.ndarray, accept: float = DEFAULT_ACCEPT) -> float:
    """The score below which ``accept`` of the in-distribution ``scores`` lie: halfway between
    the ``accept`` quantile (an actual score, ``inverted_cdf``) and the next higher score, so
    the same images are accepted and none sits on the threshold, where float noise between
    backends (or a CLI and a Python road) would make it unknown on one and known on the other."""
    if not 0 < accept < 1:
        raise ImgclsError(f"--accept {accept} is not between 0 and 1", "e.g. --accept 0.95")
    if not len(scores):
        raise ImgclsError("no validation images to fit the unknown threshold on", "give data with a validation split")
    scores = np.asarray(scores, dtype=np.float64)
    t = float(np.quantile(scores, accept, method="inverted_cdf"))
    above = scores[scores > t]
    return (t + float(above.min())) / 2 if len(above) else t


def make_bank(features: np.ndarray, max_rows: int = MAX_BANK, seed: int = 0) -> torch.Tensor:
    """L2-normalised float16 training features, a seeded subsample of at most ``max_rows``."""
    f = normalise(features)
    if len(f) > max_rows:
        idx = torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))[:max_rows]
        f = f[idx.sort().values]
    return f.half().contiguous()


def load_stats(folder: str | Path | None, method: str = "knn") -> dict[str, torch.Tensor]:
    """The training statistics of a feature score, stored beside the weights."""
    from safetensors.torch import load_file

    path = Path(folder or ".") / FEATURES_FILE
    hint = f"recreate it: imgcls calibrate {folder or 'RUN'} --data DATA --ood-method {method}"
    if folder is None or not path.is_file():
        raise ImgclsError(f"the {method} OOD score needs {path}, which is missing", hint)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ImgclsError(f"cannot read {path}: {exc}".splitlines()[0], hint) from None
