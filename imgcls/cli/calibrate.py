"""imgcls calibrate RUN --data DATA [--coverage 0.9] [--ood-method energy]"""

from __future__ import annotations

import argparse
import json

NAME = "calibrate"
HELP = ("fit temperature scaling, conformal prediction sets (--coverage) and the 'unknown' threshold "
        "(--ood-method) on images training never saw; stored in the run's model.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from imgcls.engine.trust_names import (BEST_MULTI_LABEL_OOD_METHOD, BEST_OOD_METHOD, CONFORMAL_METHODS,
                                           DEFAULT_ACCEPT, OOD_METHODS)

    p.add_argument("run", help="run folder written by `imgcls train`")
    p.add_argument("--data", required=True, help="data to calibrate on (folder, .npz or dataset name)")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"],
                   help="which split (default: val, held out as in training; all: what `evaluate` takes - the "
                        "test split, else every image - for a calibration set of its own)")
    p.add_argument("--coverage", type=float, default=None,
                   help="fit conformal prediction sets holding the true class with this probability, e.g. 0.9")
    p.add_argument("--method", default="aps", choices=CONFORMAL_METHODS,
                   help="conformal score: aps (adaptive sets, even coverage across classes), lac (smallest sets) "
                        "or raps (APS with a penalty on unlikely classes, tuned on 30%% of the calibration images)")
    p.add_argument("--ood-method", default=None, choices=(*OOD_METHODS, "auto"), nargs="?", const="auto",
                   help="fit the 'unknown' threshold for this OOD score (knn and layers also store training statistics; "
                        f"alone or auto: {BEST_OOD_METHOD}, the best on docs/benchmarks.md; for a multi-label model "
                        f"{BEST_MULTI_LABEL_OOD_METHOD}, per-label)")
    p.add_argument("--accept", type=float, default=DEFAULT_ACCEPT,
                   help=f"fraction of in-distribution images the threshold accepts (default {DEFAULT_ACCEPT})")
    p.add_argument("--no-temperature", action="store_true", help="keep the model's temperature as it is")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print what was fitted as JSON")


def _data(args: argparse.Namespace):
    """--split all: what `evaluate` takes (the test split, else every image, held as the test split)."""
    if args.split != "all":
        return args.data, args.split
    from imgcls.data.pipeline import evaluation_data

    data, _, _ = evaluation_data(args.data, None)
    return data, None


def run(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier
    from imgcls.bundle import save_features
    from imgcls.rundir import RunDir

    clf = Classifier.load(args.run)
    data, split = _data(args)
    info = clf.calibrate(data, batch_size=args.batch_size, device=args.device, split=split or "test",
                         temperature=not args.no_temperature, coverage=args.coverage, conformal=args.method,
                         ood_method=args.ood_method, accept=args.accept)
    fields = {k: clf.card[k] for k in ("calibration", "conformal", "ood") if k in clf.card}
    RunDir(args.run).update_card(temperature=round(float(clf.temperature), 6), **fields)
    if clf.ood_features is not None:
        save_features(args.run, clf.ood_features)
    _note_stale_exports(clf, args.run)
    if args.json:
        print(json.dumps(info))
        return 0
    print(_summary(clf, info, args.run))
    return 0


def _note_stale_exports(clf, run: str) -> None:
    """An ONNX export carries the temperature (and a multi-label model's thresholds) it was
    made with: once they change it is stale (`--backend auto` no longer uses it), so say so."""
    import sys
    from pathlib import Path

    from imgcls.engine.backends import ONNX_FILE, ONNX_INT8_FILE, export_problem

    for name in (ONNX_FILE, ONNX_INT8_FILE):
        path = Path(run) / name
        problem = export_problem(clf, path) if path.is_file() else None
        if problem:
            again = " --int8" if name == ONNX_INT8_FILE else ""
            print(f"imgcls: {path} is stale ({problem}); --backend auto uses PyTorch until it is re-exported: "
                  f"`imgcls export {run} --format onnx{again}`", file=sys.stderr)


def _summary(clf, info: dict, run: str) -> str:
    lines = []
    if "val_ece_before" in info:
        lines.append(f"temperature {clf.temperature:.3f}: ECE {info['val_ece_before']:.4f} -> {info['val_ece_after']:.4f} "
                     f"on {info.get('num_images')} images")
    if "conformal" in info:
        c = info["conformal"]
        lines.append(f"conformal sets ({c['method']}): {c['coverage']:.0%} coverage from {c['num_images']} "
                     f"{c['fitted_on']} images, q = {c['qhat'] if c['qhat'] is not None else 'every class'}")
    if "ood" in info:
        o = info["ood"]
        lines.append(f"unknown threshold ({o['method']}): {o['threshold']:.4f}, accepting {o['accept']:.0%} of "
                     f"{o['num_images']} {o['fitted_on']} images" + (f"; {o['bank_images']} training features "
                                                                    "stored" if "bank_images" in o else ""))
    lines.append(f"saved in {run}/model.json")
    return "\n".join(lines)
