"""imgcls thresholds RUN --data DATA [--target f1|precision:0.9|recall:0.9]"""

from __future__ import annotations

import argparse

NAME = "thresholds"
HELP = "tune a multi-label model's per-class thresholds on the validation split and store them in model.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of a multi-label model")
    p.add_argument("--data", required=True, help="the run's data (its validation split is held out as in training)")
    p.add_argument("--target", default="f1", help="f1 (max F1 per class), precision:0.9 or recall:0.9")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier
    from imgcls.rundir import RunDir

    clf = Classifier.load(args.run)
    t = clf.tune_thresholds(args.data, args.target, batch_size=args.batch_size, device=args.device)
    RunDir(args.run).update_card(thresholds=t)
    print(f"thresholds ({t['target']}) on {t['num_images']} validation images, saved in {args.run}/model.json:")
    for c, v in t["values"].items():
        at = t["val"].get(c, {})
        extra = f"  (val precision {at['precision']:.3f}, recall {at['recall']:.3f})" if "precision" in at else ""
        print(f"  {c}: {v:.4f}{extra}")
    return 0
