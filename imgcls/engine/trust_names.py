"""The names the trust features accept, in a module that imports nothing, so the command line
lists them without loading numpy or torch (``imgcls --help`` stays fast)."""

CONFORMAL_METHODS = ("aps", "lac", "raps")
OOD_METHODS = ("msp", "energy", "knn", "layers", "mahalanobis", "react", "vim")
# scores on the network's features (penultimate; layers: block statistics too), with training
# statistics stored beside the weights
FEATURE_METHODS = ("knn", "layers", "mahalanobis", "react", "vim")
DEFAULT_OOD_METHOD = "energy"  # a model never calibrated scores with energy (no stored features needed)
# the best on bench/ood_conformal.py (docs/benchmarks.md: mean AUROC 0.979 over the four OOD sets,
# kNN 0.945, energy 0.928): what --ood-method alone picks
BEST_OOD_METHOD = "layers"
MULTI_LABEL_OOD_METHODS = ("energy", "knn", "layers")  # energy is per-label (JointEnergy) for a multi-label model
BEST_MULTI_LABEL_OOD_METHOD = "energy"  # the choice (per-label energy); not benchmarked on real multi-label OOD


def resolve_ood_method(method: str | None, multi_label: bool) -> str | None:
    """``auto`` (what a bare ``--ood-method`` gives): the best method for the model's task."""
    if method != "auto":
        return method
    return BEST_MULTI_LABEL_OOD_METHOD if multi_label else BEST_OOD_METHOD
DEFAULT_ACCEPT = 0.95  # the unknown threshold accepts this share of in-distribution images


def feature_kind(method: str | None) -> bool | str:
    """What an OOD method reads besides the logits: False, True (penultimate features) or
    ``"layers"`` (those followed by the block statistics, engine/layer_stats.py)."""
    if method == "layers":
        return "layers"
    return method in FEATURE_METHODS
