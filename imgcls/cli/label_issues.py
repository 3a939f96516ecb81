"""imgcls label-issues: training labels that are probably wrong (out-of-fold probabilities + cleanlab)."""

from __future__ import annotations

import argparse
import json

NAME = "label-issues"
HELP = "find probably-wrong training labels: K-fold out-of-fold probabilities + cleanlab (issues.csv + .html)"

# TrainConfig fields this command takes (the rest keep their defaults / the data's recipe)
_FIELDS = {"model": str, "weights": str, "img_size": int, "epochs": int, "batch_size": int, "lr": str,
           "group_by": str, "seed": int, "device": str, "precision": str, "workers": int, "recipe": str}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="class folders, a CSV/TSV manifest, a Keras-style .npz or a data set name")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--out", default="issues.csv", help="CSV to write (issues.html goes beside it)")
    p.add_argument("--freeze", choices=["none", "backbone"], default=None,
                   help="backbone (with --weights/--pretrained): the fast path, features once + a linear head per fold")
    p.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (hub)")
    p.add_argument("--classes", help="comma-separated class names (fixes the class list and order)")
    for name, typ in _FIELDS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"as in imgcls train ({name.replace('_', ' ')})")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from imgcls.config import TrainConfig
    from imgcls.curation.label_issues import find_issues

    values = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    if args.freeze:
        values["freeze"] = args.freeze
    if args.pretrained:
        values["pretrained"] = True
    if args.classes:
        values["classes"] = [c.strip() for c in args.classes.split(",")]
    cfg = TrainConfig.from_dict({"data": args.data, **values})
    summary = find_issues(cfg, folds=args.folds, out=args.out, progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['issues']} of {summary['images_checked']} labels look wrong ({100 * summary['share']:.1f}%; "
          f"out-of-fold accuracy {100 * summary['out_of_fold_accuracy']:.1f}%, {summary['folds']} folds, "
          f"{summary['seconds']:.0f}s): {summary['csv']}, {summary['html']}")
    for r in summary["top"][:5]:
        where = r["path"] or f"#{r['index']}"
        print(f"  {where}: given {r['given_label']}, suggested {r['suggested_label']} (score {r['score']})")
    return 0
