"""imgcls evaluate RUN --data DATA"""

from __future__ import annotations

import argparse
import json

NAME = "evaluate"
HELP = "evaluate a trained model: accuracy, top-k, per-class precision/recall/F1, confusion matrix"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `imgcls train` (or any saved model folder)")
    p.add_argument("--data", required=True, help="data to evaluate on (folder, .npz or dataset name)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="which split (default: test if the data has one, else validation)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--report", nargs="?", const="", metavar="DIR",
                   help="also write report.html (self-contained) + metrics.json, into DIR (default: the run "
                        "folder); on the run's own training data, fits temperature scaling on its validation "
                        "split and saves it in model.json (other data: left as it is; see imgcls calibrate)")
    p.add_argument("--mistakes", type=int, default=8, help="--report: how many confident mistakes to show")
    p.add_argument("--ood", default=None, metavar="OTHER_DATA",
                   help="data the model should call unknown (folder, .npz or dataset name): reports AUROC and "
                        "FPR at 95%% TPR of the OOD score (metrics.json ood.auroc, ood.fpr95)")


def run(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier
    from imgcls.evaluation.metrics import format_metrics
    from imgcls.rundir import RunDir

    if args.report is not None:
        return _report(args)
    clf = Classifier.load(args.run)
    m = clf.evaluate(args.data, split=args.split, batch_size=args.batch_size, device=args.device, ood=args.ood)
    path = RunDir(args.run).update_metrics(evaluation=m, **trust_sections(m))
    if args.json:
        print(json.dumps(m))
    elif m.get("task") == "multi":
        from imgcls.evaluation.multilabel import format_multilabel

        print(format_multilabel(m, title=f"{args.run} on {m['data']}: {_which(m)}"))
        for line in trust_lines(m):
            print(line)
        print(f"\nmetrics written to {path}")
    else:
        print(format_metrics(m, title=f"{args.run} on {m['data']}: {_which(m)}"))
        for line in trust_lines(m):
            print(line)
        print(f"\nmetrics written to {path}")
    return 0


def trust_sections(m: dict) -> dict:
    """metrics.json's top-level ``conformal`` and ``ood`` sections (also inside ``evaluation``)."""
    return {k: m[k] for k in ("conformal", "ood") if k in m}


def trust_lines(m: dict) -> list[str]:
    lines = []
    if "conformal" in m:
        c = m["conformal"]
        lines.append(f"conformal sets ({c['method']}, target {c['target_coverage']:.0%}): coverage "
                     f"{c['coverage']:.2%}, mean set size {c['mean_set_size']:.2f}"
                     + (f" (note: {c['note']})" if "note" in c else ""))
    if "ood" in m:
        o = m["ood"]
        lines.append(f"unknown vs {o['data']} ({o['method']}): AUROC {o['auroc']:.4f}, FPR95 {o['fpr95']:.4f}"
                     + (f"; at the threshold {o['id_accepted']:.1%} accepted, {o['ood_rejected']:.1%} of "
                        f"{o['data']} rejected" if "threshold" in o else "")
                     + (f" (note: {o['note']})" if "note" in o else ""))
    return lines


def _report(args: argparse.Namespace) -> int:
    from imgcls.evaluation.metrics import format_metrics
    from imgcls.evaluation.report import build_report

    r = build_report(args.run, args.data, split=args.split, out_dir=args.report or None, batch_size=args.batch_size,
                     device=args.device, mistakes=args.mistakes, ood=args.ood)
    m, cal = r.metrics, r.calibration
    if m.get("task") == "multi":
        from imgcls.evaluation.multilabel import format_multilabel

        print(json.dumps(m) if args.json else format_multilabel(m, title=f"{args.run} on {m['data']}: {_which(m)}")
              + f"\nreport written to {r.html_path}\nmetrics written to {r.json_path}")
        return 0
    if args.json:
        print(json.dumps({**m, "calibration": {k: v for k, v in cal.items() if not k.startswith("reliability")}}))
        return 0
    print(format_metrics(m, title=f"{args.run} on {m['data']}: {_which(m)}"))
    fitted = f"fitted on {cal['num_images']} validation images, saved in model.json" if cal.get("fitted_on") \
        else "not refitted"
    print(f"\ncalibration: temperature {cal['temperature']:.3f} ({fitted}); "
          f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} on the {m['split']} split"
          + (f"\n  note: {cal['note']}" if cal.get("note") else ""))
    print("".join(f"{line}\n" for line in trust_lines(m)), end="")
    print(f"report written to {r.html_path}\nmetrics written to {r.json_path}")
    return 0


def _which(m: dict) -> str:
    """Which images were evaluated: ``test split, 500 images`` / ``all 240 images``."""
    n = m.get("num_images", "?")
    return f"all {n} images" if m["split"] == "all" else f"{m['split']} split, {n} images"
