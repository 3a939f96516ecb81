"""Which layer a class-activation map explains, and how to turn its output into a map.

* CNNs (reference_cnn, timm ResNets, EfficientNets, ConvNeXts ...): the last module whose
  output is still a spatial (B, C, h, w) map with h, w > 1, found by one probing forward
  pass -- i.e. the end of the last conv block, what forward_features returns.
* timm vision transformers (ViT, DeiT, EVA ...): the last block's first norm, whose
  tokens are reshaped to the patch grid after dropping class/register tokens
  (pytorch-grad-cam's documented recipe for ViTs).
* Swin-style models that keep NHWC maps: permuted to NCHW.
``--layer NAME`` (a name from ``model.named_modules()``) overrides the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from imgcls.errors import ImgclsError, did_you_mean


@dataclass
class TargetLayer:
    name: str
    module: nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Identity)


def _vit_reshape(grid: tuple[int, int], prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(t: torch.Tensor) -> torch.Tensor:  # (B, prefix + h*w, D) -> (B, D, h, w)
        t = t[:, prefix:, :]
        return t.reshape(t.shape[0], grid[0], grid[1], t.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _probe(model: nn.Module, example: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every named module, in the order their forward returned."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, mod in model.named_modules():
        if not name:
            continue
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, name=name: seen.append((name, tuple(o.shape))) if isinstance(o, torch.Tensor) else None))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _reshape_for(model: nn.Module, shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if len(shape) == 3:  # tokens
        pe = getattr(model, "patch_embed", None)
        grid = tuple(getattr(pe, "grid_size", ()) or ())
        if len(grid) != 2:
            raise ImgclsError("cannot map this layer's tokens to an image grid",
                              "choose a layer with spatial output via --layer")
        return _vit_reshape(grid, int(getattr(model, "num_prefix_tokens", shape[1] - grid[0] * grid[1])))
    if len(shape) == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        return _nhwc_to_nchw
    return None


def find_target_layer(model: nn.Module, example: torch.Tensor, name: str | None = None) -> TargetLayer:
    modules = dict(model.named_modules())
    seen = _probe(model, example)
    shapes = dict(seen)
    if name is not None:
        if name not in modules or not name:
            hint = did_you_mean(name, [n for n in modules if n]) or "names are those of model.named_modules()"
            raise ImgclsError(f"the model has no layer '{name}' (--layer)", hint)
        if name not in shapes or len(shapes[name]) not in (3, 4):
            raise ImgclsError(f"layer '{name}' does not output a feature map (--layer)",
                              "choose a conv block or transformer block")
        return TargetLayer(name, modules[name], _reshape_for(model, shapes[name]))
    blocks = getattr(model, "blocks", None)
    if getattr(model, "patch_embed", None) is not None and isinstance(blocks, nn.Sequential) and len(blocks):
        last = f"blocks.{len(blocks) - 1}"
        norm = f"{last}.norm1" if f"{last}.norm1" in modules else last
        if len(shapes.get(norm, ())) == 3:
            return TargetLayer(norm, modules[norm], _reshape_for(model, shapes[norm]))
    nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
    pooled: set[str] = set()  # pooling layers and the containers that end with one
    for i, (lname, _) in enumerate(seen):
        mod = modules[lname]
        prev = seen[i - 1] if i else None
        if isinstance(mod, _POOLS) or (prev and prev[0] in pooled and prev[0].startswith(lname + ".")):
            pooled.add(lname)
        elif prev and prev[0] in pooled and isinstance(mod, _POINTWISE) and seen[i][1] == prev[1]:
            pooled.add(lname)  # an activation after the pool (pool -> ReLU): as coarse as the pool
    for lname, shape in reversed(seen):
        spatial = shape[1:3] if nhwc else shape[2:]
        # a trailing max/avg-pool only coarsens the map: explain the activations before it,
        # as Grad-CAM does for VGG (its last ReLU, not the last pool)
        if len(shape) == 4 and min(spatial) > 1 and lname not in pooled:
            return TargetLayer(lname, modules[lname], _reshape_for(model, shape))
    raise ImgclsError("found no layer with a spatial feature map for a class-activation map",
                      "name one with --layer, or use --method ig|occlusion|lime|shap")
