"""imgcls export RUN --format onnx|torchscript [--int8] [--opset N]"""

from __future__ import annotations

import argparse
import json

NAME = "export"
# the defaults of imgcls.export.core, repeated so `imgcls --help` does not import torch
DEFAULT_PARITY_IMAGES, DEFAULT_CALIB_IMAGES = 2000, 256
HELP = "export a trained model to ONNX (optionally int8) or TorchScript, with a parity check against PyTorch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `imgcls train`")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="export format (default: onnx)")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (static quantization, calibrated on training images)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--data", default=None,
                   help="data for the parity check (default: the run's own data, from config.yaml / model.json)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="refuse the int8 model if it loses more accuracy points than this (default: 1)")
    p.add_argument("--parity-images", type=int, default=DEFAULT_PARITY_IMAGES,
                   help=f"validation images for the parity check, 0 = all (default: {DEFAULT_PARITY_IMAGES})")
    p.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                   help=f"training images to calibrate int8 ranges on (default: {DEFAULT_CALIB_IMAGES})")
    p.add_argument("--json", action="store_true", help="print the export descriptions as JSON")


def run(args: argparse.Namespace) -> int:
    import sys

    from imgcls.api import Classifier
    from imgcls.errors import ImgclsError
    from imgcls.export import export_run

    if args.parity_images < 0 or args.calib_images < 1:
        raise ImgclsError("--parity-images must be >= 0 and --calib-images >= 1", "e.g. --parity-images 2000")
    if args.max_drop < 0:
        raise ImgclsError(f"--max-drop {args.max_drop} is negative", "give accuracy points, e.g. --max-drop 1")
    clf = Classifier.load(args.run)
    results = export_run(clf, args.format, args.out, int8=args.int8, opset=args.opset, data=args.data,
                         max_drop=args.max_drop, parity_images=args.parity_images or None,
                         calib_images=args.calib_images, log=lambda m: print(m, file=sys.stderr))
    for r in results:
        if args.json:
            print(json.dumps({"path": str(r.path), "sidecar": str(r.sidecar), **r.meta}))
        else:
            print(f"wrote {r.path} ({r.path.stat().st_size / 2**20:.2f} MiB, {r.meta['precision']}) and {r.sidecar.name}")
    return 0
