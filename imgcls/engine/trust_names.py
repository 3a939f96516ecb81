"""The names the trust features accept, in a module that imports nothing, so the command line
lists them without loading numpy or torch (``imgcls --help`` stays fast)."""

CONFORMAL_METHODS = ("aps", "lac", "raps")
OOD_METHODS = ("msp", "energy", "knn", "mahalanobis", "react", "vim")
FEATURE_METHODS = ("knn", "mahalanobis", "react", "vim")  # scores on the penultimate features, with training statistics stored beside the weights
DEFAULT_OOD_METHOD = "energy"  # a model never calibrated scores with energy (no stored features needed)
BEST_OOD_METHOD = "knn"  # the best on bench/ood_conformal.py (docs/benchmarks.md): what --ood-method alone picks
MULTI_LABEL_OOD_METHODS = ("energy", "knn")  # energy is per-label (JointEnergy) for a multi-label model
BEST_MULTI_LABEL_OOD_METHOD = "energy"  # the choice (per-label energy); not benchmarked on real multi-label OOD


def resolve_ood_method(method: str | None, multi_label: bool) -> str | None:
    """``auto`` (what a bare ``--ood-method`` gives): the best method for the model's task."""
    if method != "auto":
        return method
    return BEST_MULTI_LABEL_OOD_METHOD if multi_label else BEST_OOD_METHOD
DEFAULT_ACCEPT = 0.95  # the unknown threshold accepts this share of in-distribution images
