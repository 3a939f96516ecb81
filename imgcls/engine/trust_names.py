"""The names the trust features accept, in a module that imports nothing, so the command line
lists them without loading numpy or torch (``imgcls --help`` stays fast)."""

CONFORMAL_METHODS = ("aps", "lac")
OOD_METHODS = ("msp", "energy", "knn")
DEFAULT_OOD_METHOD = "energy"  # a model never calibrated scores with energy (no stored features needed)
BEST_OOD_METHOD = "knn"  # the best on bench/ood_conformal.py (docs/benchmarks.md): what --ood-method alone picks
DEFAULT_ACCEPT = 0.95  # the unknown threshold accepts this share of in-distribution images
