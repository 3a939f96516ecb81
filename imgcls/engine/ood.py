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
  most ``MAX_BANK`` images), so a run folder stays self-contained.

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

# docs/benchmarks.md (bench/ood_conformal.py): kNN has the best mean AUROC over the four OOD sets
# (CIFAR-10 model vs MNIST / hymenoptera crops, MNIST model vs inverted / shuffled digits), so a
# bare `--ood-method` fits it; a model never fitted scores with energy, the best score that needs
# only logits (3 of the 4 sets against msp), so it works on every backend without a feature bank.
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


def fit_threshold(scores: np.ndarray, accept: float = DEFAULT_ACCEPT) -> float:
    """The score below which ``accept`` of the in-distribution ``scores`` lie."""
    if not 0 < accept < 1:
        raise ImgclsError(f"--accept {accept} is not between 0 and 1", "e.g. --accept 0.95")
    if not len(scores):
        raise ImgclsError("no validation images to fit the unknown threshold on", "give data with a validation split")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), accept, method="inverted_cdf"))


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
