"""imgcls lr-find: the learning-rate range test for a training setup (same flags as train)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgcls.cli import train as _train

NAME = "lr-find"
HELP = "suggest a learning rate with a range test (takes the same flags as train)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    _train.add_arguments(p)
    p.add_argument("--steps", type=int, default=100, help="batches to test (default: 100)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="smallest rate tried (default: 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="largest rate tried (default: 10)")
    p.add_argument("--json", metavar="FILE", help="also write the curve and suggestion as JSON")


def run(args: argparse.Namespace) -> int:
    from imgcls.runs import find_lr
    from imgcls.errors import ImgclsError

    if args.steps < 5:
        raise ImgclsError(f"--steps {args.steps} is too few for a range test", "use at least 5 (default 100)")
    cfg = _train.config_from_args(args)
    res, cfg = find_lr(cfg, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    # a compact view of the curve: about a dozen points, log-spaced
    stride = max(1, len(res.lrs) // 12)
    for lr, loss in list(zip(res.lrs, res.losses))[::stride]:
        print(f"  lr {lr:9.2e}  loss {loss:.4f}")
    print(f"loss was lowest at lr {res.min_loss_lr:.3g}" + (" (then diverged)" if res.stopped_early else ""))
    print(f"suggested learning rate for {cfg.model} with {cfg.optimizer}, batch {cfg.batch_size}: "
          f"{res.suggestion:g}  (use --lr {res.suggestion:g}, or --lr auto to do this inside train)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg.model_dump(), **res.to_dict()}, indent=1) + "\n")
    return 0
