"""imgcls predict RUN SOURCE --output DIR/ [--devices N]: one part file per process (see
imgcls/engine/batch_predict.py); under torchrun every process runs this."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def parts_mode(args: argparse.Namespace) -> bool:
    """Part files: --devices > 1, torchrun, or an --output that is a folder (ends in /)."""
    from imgcls.data.shardset import is_shard_spec
    from imgcls.errors import ImgclsError

    out = args.output or ""
    parts = args.devices > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1 or out.endswith(("/", os.sep)) \
        or bool(out and Path(out).is_dir())
    if not parts and len(args.images) == 1 and is_shard_spec(args.images[0]):
        raise ImgclsError(f"{args.images[0]} is a shard set: its predictions are written as part files",
                          "add --output DIR/ (and --devices N for several processes)")
    return parts


def _argv(args: argparse.Namespace) -> list[str]:
    """The same command for each torchrun process."""
    argv = [args.run, *args.images, "--top-k", str(args.top_k), "--backend", args.backend, "--output", args.output,
            "--batch-size", str(args.batch_size), "--device", args.device, "--part-format", args.part_format]
    argv += ["--workers", str(args.workers)] if args.workers is not None else []
    trust = {"sets": args.sets, "reject-unknown": args.reject_unknown}  # None: the model's default
    argv += [f"--{flag}" if on else f"--no-{flag}" for flag, on in trust.items() if on is not None]
    return argv + [f for f, on in (("--int8", args.int8), ("--strict", args.strict)) if on]


def run_parts(args: argparse.Namespace) -> int:
    from imgcls.api import Classifier
    from imgcls.engine import distributed as D
    from imgcls.engine.batch_predict import Ranks, announce
    from imgcls.errors import ImgclsError

    if not args.output:
        raise ImgclsError("--devices needs --output DIR/ (one part file per process)", "e.g. --output preds/")
    if args.devices > 1 and not D.launched_by_torchrun():
        return D.launch(args.devices, _argv(args), command="predict")
    backend = "onnx-int8" if args.int8 else args.backend
    clf = Classifier.load(args.run)
    summary = clf.predict_parts(args.images, args.output, fmt=args.part_format, top_k=args.top_k,
                                batch_size=args.batch_size, device=args.device, backend=backend,
                                workers=args.workers, strict=args.strict, sets=args.sets,
                                reject_unknown=args.reject_unknown)
    announce(summary, Ranks.from_env())
    return 0
