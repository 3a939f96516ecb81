"""imgcls summary MODEL_OR_RUN"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "summary"
HELP = "layers, output shapes, parameters and FLOPs per image of a model, run folder or config file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="MODEL_OR_RUN",
                   help="architecture name (reference_cnn, resnet18, ...), run folder, or YAML config with a model")
    p.add_argument("--img-size", type=int, help="input side in pixels (default: the run's / config's / model's)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the run's / config's / model's)")
    p.add_argument("--num-classes", type=int, help="outputs (default: the run's; 10 for built-ins, 1000 for timm)")
    p.add_argument("--depth", type=int, default=2, help="how many levels of nested modules to list (default: 2)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _resolve(args: argparse.Namespace):
    """(model, (C, H, W), title, trained side) for a run folder, a YAML config or an architecture
    name (the side the run was trained at; None for the others)."""
    from imgcls.config import TrainConfig
    from imgcls.errors import ImgclsError
    from imgcls.models import MODEL_DEFAULTS, MODELS, create_model, model_from_config

    target = Path(args.target)
    if target.is_dir() or target.name == "model.json":
        from imgcls.api import Classifier

        clf = Classifier.load(target)
        if args.num_classes or args.in_chans:
            raise ImgclsError("--num-classes / --in-chans cannot change a trained run", "drop them for a run folder")
        pre = clf.preprocessing
        return clf.model, (pre.in_chans, args.img_size or pre.img_size, args.img_size or pre.img_size), \
            f"{clf.architecture} ({target}, {clf.num_classes} classes)", pre.img_size
    if target.suffix in (".yaml", ".yml"):
        cfg = TrainConfig.from_yaml(target)
        arch, kwargs = model_from_config(cfg.model)
        img_size, in_chans = args.img_size or cfg.img_size, args.in_chans or cfg.in_chans
        label = str(target)
    else:
        if target.exists():
            raise ImgclsError(f"{target} is neither a run folder nor a YAML config", "give a run folder, a .yaml "
                              "config or an architecture name")
        arch, kwargs = args.target, {}
        img_size, in_chans = args.img_size, args.in_chans
        label = arch
    defaults = MODEL_DEFAULTS.get(arch, {})
    img_size = img_size or defaults.get("img_size", 32 if arch == "layers" else 224)
    in_chans = in_chans or defaults.get("in_chans", 3)
    num_classes = args.num_classes or (10 if arch in MODELS else 1000)
    model = create_model(arch, num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    return model, (in_chans, img_size, img_size), f"{label} ({num_classes} classes)", None


def run(args: argparse.Namespace) -> int:
    from imgcls.errors import ImgclsError
    from imgcls.models.summary import format_summary, summarize

    if args.depth < 1:
        raise ImgclsError("--depth must be at least 1", "e.g. --depth 2")
    for flag in ("img_size", "in_chans", "num_classes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ImgclsError(f"--{flag.replace('_', '-')} {value} must be at least 1",
                              f"give --{flag.replace('_', '-')} 1 or more, or leave it out")
    model, shape, title, fixed = _resolve(args)
    try:
        s = summarize(model, shape, depth=args.depth)
    except RuntimeError as exc:  # the forward pass refused the input shape
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if fixed is not None and args.img_size not in (None, fixed):  # e.g. a flatten + dense head
            raise ImgclsError(f"--img-size {args.img_size}: this run's model takes {fixed} px inputs ({why})",
                              f"drop --img-size or use --img-size {fixed}") from None
        raise ImgclsError(f"{title} cannot take {'x'.join(map(str, shape))} inputs ({why})",
                          "try a larger --img-size") from None
    print(json.dumps(s) if args.json else format_summary(s, title=title))
    return 0
