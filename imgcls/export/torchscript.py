"""TorchScript export (torch.jit.trace) for LibTorch / C++ deployment.

The metadata travels inside the archive as the extra file ``imgcls.json`` (and beside it).
imgcls itself only loads TorchScript files it has just written (for the parity check):
a TorchScript archive is code, so it is never a format imgcls accepts from users.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.data.transforms import Preprocessing
from imgcls.engine.tta import TTAModel

EXTRA_FILE = "imgcls.json"


def export_torchscript(model: torch.nn.Module, pre: Preprocessing, path: Path, meta: dict[str, Any],
                       tta: str = "none") -> dict:
    model = model.eval().float().to("cpu", memory_format=torch.contiguous_format)
    if tta != "none":  # the traced graph averages its own test-time views, as the ONNX export does
        model = TTAModel(model, tta).eval()
    example = torch.randn(2, pre.in_chans, pre.img_size, pre.img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # jit's deprecation / tracer notes are not actionable here
        traced = torch.jit.trace(model, example, check_trace=False)
        traced = torch.jit.freeze(traced)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})
    return {"exporter": "torch.jit.trace + freeze"}


def read_metadata(path: str | Path) -> dict[str, Any]:
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])


class TorchScriptBackend:
    """Runs a TorchScript file this process exported itself (see module docstring)."""

    name = "torchscript"

    def __init__(self, path: Path, pre: Preprocessing):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.pre = pre

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        return self.module(self.pre.normalize(x)).float().numpy()

    def close(self) -> None:
        pass
