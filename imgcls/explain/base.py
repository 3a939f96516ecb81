"""What every explainer shares: the registry, the prepared input, the counted model and
the :class:`Explanation` it returns.

An explainer works in the model's input space (the preprocessed ``(C, S, S)`` image); the
attribution is then mapped back onto the original image, so ``Explanation.attribution``
has the picture's own size. Faithfulness is measured in the model's input space, where
the ranking of pixels was made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from imgcls.registry import Registry

# name -> fn(ctx: ExplainContext, item: ExplainImage, target: int, **opts) -> np.ndarray (S, S) attribution
EXPLAINERS: Registry = Registry("explanation method", list_command=None)


class CountingModel(nn.Module):
    """The classifier as the explainers see it: normalised input in, logits (divided by
    the model's temperature) out; counts the images it was asked to evaluate."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.evaluations = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.evaluations += int(x.shape[0])
        return self.model(x) / self.temperature


@dataclass
class ExplainImage:
    """One image ready for explaining."""

    source: str
    original: Image.Image  # RGB, as decoded (display and the attribution's size)
    pixels: torch.Tensor  # (C, S, S) float in [0, 1]: what the model sees, before normalisation
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) of the original the model sees


@dataclass
class ExplainContext:
    """The model, preprocessing and device an explainer works with."""

    model: CountingModel
    preprocessing: Any  # imgcls.data.transforms.Preprocessing
    device: torch.device
    classes: list[str]
    layer: str | None = None  # target layer name for CAM methods (None: automatic)
    seed: int = 0
    multi_label: bool = False  # a sigmoid per class: the target label's own probability, not a softmax share

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] float pixels (N, C, S, S) -> the model's normalised input on the device."""
        return self.preprocessing.normalize(pixels.to(self.device))

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's normalised input -> [0, 1] pixels."""
        mean = torch.tensor(self.preprocessing.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocessing.std, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def baseline(self) -> torch.Tensor:
        """The 'removed' image: every pixel at the training mean, i.e. zero after
        normalisation. Used by IG, occlusion, LIME, SHAP and the faithfulness curves alike,
        so all methods and their scores mean the same thing by 'absent'."""
        s = self.preprocessing.img_size
        return torch.zeros(1, self.preprocessing.in_chans, s, s, device=self.device)

    def mean_pixels(self) -> np.ndarray:
        """The baseline in [0, 1] pixel space, one value per channel."""
        return np.asarray(self.preprocessing.mean, dtype=np.float32)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """Softmax (multi-label: sigmoid) of normalised inputs (N, C, S, S), evaluated in batches."""
        act = torch.sigmoid if self.multi_label else (lambda z: F.softmax(z, dim=1))
        outs = [act(self.model(x[i:i + batch_size]).float()) for i in range(0, len(x), batch_size)]
        return torch.cat(outs)


@dataclass
class Explanation:
    source: str
    method: str
    target: str  # the explained class's name
    target_index: int
    attribution: np.ndarray  # (H, W) float32, the original image's size; larger = more evidence for target
    image: Image.Image = field(repr=False)  # the original, RGB
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    evaluations: int = 0  # images the model evaluated to make this explanation
    faithfulness: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    layer: str | None = None  # CAM methods: the layer explained
    input_attribution: np.ndarray | None = field(default=None, repr=False)  # (S, S): in the model's input space

    @property
    def overlay(self) -> Image.Image:
        from imgcls.explain.render import overlay

        return overlay(self.image, self.attribution)

    def figure(self) -> Image.Image:
        """Original | heatmap overlay | top-k bars, with the faithfulness scores beside them."""
        from imgcls.explain.render import figure

        return figure(self)

    def save(self, out_dir: str | Path, stem: str | None = None) -> tuple[Path, Path]:
        """Write ``STEM.METHOD.png`` (the figure) and ``STEM.METHOD.npy`` (raw attribution)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or Path(self.source).stem or "image"
        tag = self.method.replace("+", "p")
        png, npy = out / f"{stem}.{tag}.png", out / f"{stem}.{tag}.npy"
        self.figure().save(png)
        np.save(npy, self.attribution.astype(np.float32))
        return png, npy

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "method": self.method, "target": self.target,
                "top": [{"class": c, "probability": round(p, 6)} for c, p in self.top],
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3), "layer": self.layer,
                "faithfulness": self.faithfulness, "shape": list(self.attribution.shape)}


def to_original(attr: np.ndarray, item: ExplainImage) -> np.ndarray:
    """Map an (S, S) input-space attribution back onto the original image: resize into the
    region the model saw (all of it, or the centre crop); zero outside it."""
    w, h = item.original.size
    left, top, right, bottom = item.crop_box
    t = torch.from_numpy(np.ascontiguousarray(attr, dtype=np.float32))[None, None]
    inner = F.interpolate(t, size=(bottom - top, right - left), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros((h, w), dtype=np.float32)
    out[top:bottom, left:right] = inner
    return out


def normalize_attribution(attr: np.ndarray) -> np.ndarray:
    """Positive evidence scaled to [0, 1] (for display)."""
    a = np.clip(np.nan_to_num(attr.astype(np.float32)), 0, None)
    m = float(a.max())
    return a / m if m > 0 else a


Explainer = Callable[..., np.ndarray]
