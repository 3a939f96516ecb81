"""imgcls rank: the unlabelled images to label next (active learning), for Label Studio."""

from __future__ import annotations

import argparse
import json

NAME = "rank"
HELP = "rank unlabelled images by how much their labels would help (margin, entropy, coreset, hybrid)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from imgcls.curation import STRATEGIES

    p.add_argument("run", metavar="RUN", help="a run folder (imgcls train's output)")
    p.add_argument("unlabeled", metavar="UNLABELED", help="a folder of unlabelled images, or an .npz of them")
    p.add_argument("--budget", type=int, required=True, help="how many images to pick")
    p.add_argument("--strategy", choices=STRATEGIES, default="hybrid",
                   help="margin/entropy: uncertainty; coreset: diversity of features; hybrid: both (default)")
    p.add_argument("--out", default="ranked", help="folder for ranked.csv, tasks.json (Label Studio), ranked.html")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from imgcls.curation.rank import rank

    s = rank(args.run, args.unlabeled, args.budget, args.strategy, args.out, seed=args.seed, device=args.device,
             batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"{s['budget']} of {s['pool']} images ranked ({s['strategy']}): {s['out']}/ranked.csv, tasks.json "
              "(Label Studio import), ranked.html")
    return 0
