"""The library version and the versions of what decides its numbers (recorded in every
model card). Kept apart from the package root so lower layers can import it without
importing the API."""

from __future__ import annotations

import platform
import sys

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    # from the installed distributions' metadata: importing timm and torchvision just for
    # their version strings cost ~2 s at the end of every run that never used them
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        loaded = sys.modules.get(name)
        if getattr(loaded, "__version__", None):
            return str(loaded.__version__)
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    import torch

    return {"imgcls": __version__, "torch": torch.__version__, "torchvision": ver("torchvision"),
            "timm": ver("timm"), "numpy": ver("numpy"), "python": platform.python_version()}
