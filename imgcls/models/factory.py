"""One registry of built-in architectures and one factory that also reaches every timm
architecture by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from imgcls.errors import ImgclsError
from imgcls.models import fastnets
from imgcls.models.reference import ReferenceCNN
from imgcls.registry import Registry

MODELS: Registry = Registry("model", list_command="imgcls models")

# Defaults a built-in model suggests when the user gives no --img-size / --in-chans.
MODEL_DEFAULTS: dict[str, dict[str, int]] = {"reference_cnn": {"img_size": 28, "in_chans": 1},
                                             "airbench": {"img_size": 32, "in_chans": 3},
                                             "airbench_small": {"img_size": 28, "in_chans": 1}}


@MODELS.register("reference_cnn")
def reference_cnn(num_classes: int, in_chans: int = 1, img_size: int = 28, **_: Any) -> nn.Module:
    return ReferenceCNN(num_classes=num_classes, in_chans=in_chans, img_size=img_size)


MODELS.register("airbench")(fastnets.airbench)
MODELS.register("airbench_small")(fastnets.airbench_small)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model or any timm architecture, randomly initialised, with
    ``num_classes`` outputs and ``in_chans`` input channels."""
    if name in MODELS:
        try:
            return MODELS.get(name)(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
        except ValueError as exc:
            raise ImgclsError(f"cannot build {name}: {exc}", "change --img-size") from None
    if is_timm_model(name):
        import timm

        extra = dict(kwargs)
        # ViT-style models bake the input size into position embeddings: pass it on
        if _accepts_img_size(name):
            extra.setdefault("img_size", img_size)
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)
        except TypeError:
            extra.pop("img_size", None)
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)
    raise MODELS.unknown(name, extra_choices=_timm_names())


def _accepts_img_size(name: str) -> bool:
    return any(name.startswith(p) for p in ("vit", "deit", "beit", "swin", "eva", "cait", "xcit", "levit"))


def list_models(pattern: str = "") -> dict[str, list[str]]:
    import fnmatch

    pat = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
    return {"imgcls": [n for n in MODELS.names() if fnmatch.fnmatch(n, pat)],
            "timm": [n for n in _timm_names() if fnmatch.fnmatch(n, pat)]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
