"""One imgcls training run, reported as one JSON line (used by the side-by-side benches).

    python bench/imgcls_run.py --data ../shared/data/mnist.npz --recipe fast --val-split 0

Any ``imgcls train`` flag may follow. Adds per-epoch *test* accuracy (evaluated outside the
timed training: the evaluation time is subtracted), time-to-accuracy and peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls.api import Classifier  # noqa: E402
from imgcls.runs import recipe_context  # noqa: E402
from imgcls.cli.train import add_arguments, config_from_args  # noqa: E402
from imgcls.data.sources import load_data  # noqa: E402
from imgcls.engine.callbacks import Callback  # noqa: E402
from imgcls.engine.recipes import resolve_recipe  # noqa: E402


class TestEachEpoch(Callback):
    """Test accuracy after every epoch; its own time is recorded so it can be excluded."""

    def __init__(self, clf, test, device: str, precision: str):
        self.clf, self.test, self.device, self.precision = clf, test, device, precision
        self.rows: list[dict] = []
        self.eval_time = 0.0

    def on_epoch_end(self, state, model) -> None:
        from imgcls.data.pipeline import eval_batches
        from imgcls.engine.device import resolve_device, resolve_precision
        from imgcls.engine.trainer import predict_logits

        t0 = time.perf_counter()
        dev = next(model.parameters()).device
        amp = resolve_precision(self.precision, resolve_device(self.device))
        logits, labels = predict_logits(model, eval_batches(self.test, self.clf.preprocessing, 1000, device=dev),
                                        self.clf.preprocessing, dev, amp, tta=self.clf.tta)
        self.eval_time += time.perf_counter() - t0
        train_time = time.perf_counter() - state.fit_start - self.eval_time
        self.rows.append({"epoch": state.epoch, "train_time_s": round(train_time, 2),
                          "test_accuracy": round(float((logits.argmax(1) == labels).float().mean()), 5)})
        print(json.dumps(self.rows[-1]), file=sys.stderr, flush=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    ap.add_argument("--per-epoch-test", action="store_true", help="test accuracy after every epoch")
    ap.add_argument("--keep-run", metavar="DIR", help="write the run folder here instead of a temporary one")
    args = ap.parse_args()
    cfg = config_from_args(args)
    data = load_data(cfg.data, val_split=cfg.val_split, seed=cfg.seed)
    cfg = resolve_recipe(cfg, recipe_context(cfg, data))
    clf = Classifier.from_config(cfg, data)
    cbs = []
    if args.per_epoch_test:
        cbs.append(TestEachEpoch(clf, data.test, cfg.device, cfg.precision))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep_run) if args.keep_run else Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = clf.fit(data, cfg, run_dir=run_dir, progress=False, callbacks=cbs)
    metrics = clf.evaluate(data, device=cfg.device, precision=cfg.precision)
    eval_time = cbs[0].eval_time if cbs else 0.0
    out = {"tool": "imgcls", "recipe": cfg.recipe, "model": cfg.model, "epochs": summary["epochs_run"],
           "batch_size": cfg.batch_size, "train_time_s": round(summary["train_time_s"] - eval_time, 2),
           "test_accuracy": round(metrics["accuracy"], 5), "precision": summary["precision"],
           "threads": summary.get("threads"), "tta": summary.get("tta"), "recipe_choice": cfg.recipe_choice,
           "img_per_s": [round(h["img_per_s"], 1) for h in clf.history],
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "config": {k: v for k, v in cfg.model_dump().items() if k not in ("out", "name")}}
    if cbs:
        out["per_epoch"] = cbs[0].rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
