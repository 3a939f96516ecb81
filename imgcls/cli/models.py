"""imgcls models [FILTER]"""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list model architectures (imgcls built-ins and timm), optionally filtered"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter", nargs="?", default="", help="substring or wildcard, e.g. resnet or 'efficientnet_b*'")
    p.add_argument("--pretrained", action="store_true",
                   help="only timm architectures with pretrained weights (for --pretrained / --weights)")


def run(args: argparse.Namespace) -> int:
    from imgcls.models import list_models

    found = list_models(args.filter, pretrained=args.pretrained)
    if not args.pretrained:
        print("imgcls built-in: " + (", ".join(found["imgcls"]) or "(none match)"))
    what = "timm with pretrained weights" if args.pretrained else "timm"
    print(f"{what} ({len(found['timm'])}): " + (", ".join(found["timm"]) or "(none match)"))
    return 0
