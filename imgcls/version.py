"""The library version and the versions of what decides its numbers (recorded in every
model card). Kept apart from the package root so lower layers can import it without
importing the API."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    import numpy as np
    import timm
    import torch
    import torchvision

    return {"imgcls": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "python": platform.python_version()}
