"""imgcls: labelled images in, a trained, evaluated and deployable classifier out.

The names below are imported on first use (PEP 562), so ``import imgcls`` - and the
``imgcls`` command, whose ``--help`` needs none of them - does not pay for torch, timm and
the rest until something is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgcls.version import __version__

_LAZY = {"Classifier": "imgcls.api", "Prediction": "imgcls.api", "TrainConfig": "imgcls.config",
         "ImgclsError": "imgcls.errors", "TrainResult": "imgcls.runs", "find_lr": "imgcls.runs",
         "train": "imgcls.runs"}

__all__ = ["Classifier", "ImgclsError", "Prediction", "TrainConfig", "TrainResult", "__version__", "find_lr",
           "train"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from imgcls.api import Classifier, Prediction
    from imgcls.config import TrainConfig
    from imgcls.errors import ImgclsError
    from imgcls.runs import TrainResult, find_lr, train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
