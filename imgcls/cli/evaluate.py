"""imgcls evaluate RUN --data DATA"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def run(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier
    from imgcls.evaluation.metrics import format_metrics

    clf = Classifier.load(args.run)
    m = clf.evaluate(args.data, split=args.split, batch_size=args.batch_size, device=args.device)
    path = Path(args.run) / "metrics.json"
    previous = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = {}
    previous["evaluation"] = m
    path.write_text(json.dumps(previous, indent=2) + "\n")
    if args.json:
        print(json.dumps(m))
    else:
        print(format_metrics(m, title=f"{args.run} on {m['data']} ({m['split']} split)"))
        print(f"\nmetrics written to {path}")
    return 0
