"""imgcls models [FILTER]"""

from __future__ import annotations

import argparse

NAME = "models"
HELP = "list model architectures (imgcls built-ins and timm), optionally filtered"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter", nargs="?", default="", help="substring or wildcard, e.g. resnet or 'efficientnet_b*'")


def run(args: argparse.Namespace) -> int:
    from imgcls.models import list_models

    found = list_models(args.filter)
    print("imgcls built-in: " + (", ".join(found["imgcls"]) or "(none match)"))
    print(f"timm ({len(found['timm'])}): " + (", ".join(found["timm"]) or "(none match)"))
    return 0
