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
               bank: torch.Tensor | None = None, k: int = DEFAULT_K, temperature: float = 1.0,
               multi_label: bool = False) -> np.ndarray:
    """(N,) scores, higher = more unusual. ``msp`` uses the calibration temperature;
    ``multi_label``: ``energy`` is the per-label JointEnergy (``msp`` is refused)."""
    check_method(method)
    if multi_label:
        check_multi_label(method)
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    if method == "msp":
        return (1 - torch.softmax(z / temperature, dim=1).max(1).values).numpy()
    if method == "energy":
        return (-torch.nn.functional.softplus(z).sum(1) if multi_label else -torch.logsumexp(z, dim=1)).numpy()
    if features is None or bank is None:
        raise ImgclsError("the kNN OOD score needs the network's penultimate features",
                          "use the torch backend (--backend torch), or recalibrate with --ood-method energy")
    return knn_distance(features, bank, k)


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


def load_bank(folder: str | Path | None) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(folder or ".") / FEATURES_FILE
    if folder is None or not path.is_file():
        raise ImgclsError(f"the kNN OOD score needs {path}, which is missing",
                          f"recreate it: imgcls calibrate {folder or 'RUN'} --data DATA --ood-method knn")
    try:
        return load_file(str(path))["features"]
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ImgclsError(f"cannot read {path}: {exc}".splitlines()[0],
                          f"recreate it: imgcls calibrate {folder} --data DATA --ood-method knn") from None
