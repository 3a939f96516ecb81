"""imgcls predict RUN IMAGE_OR_FOLDER..."""

from __future__ import annotations

import argparse
import json

NAME = "predict"
HELP = "predict the class of images (files or folders)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `imgcls train`")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=1, help="how many classes to show per image")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes")


def run(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier

    clf = Classifier.load(args.run)
    preds = clf.predict(args.images, top_k=args.top_k, batch_size=args.batch_size, device=args.device,
                        workers=args.workers, progress=True)
    for p in preds:
        if args.json:
            print(json.dumps(p.to_dict()))
        else:
            print(f"{p.source}: " + "  ".join(f"{c} {prob:.4f}" for c, prob in p.top))
    return 0
