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


@MODELS.register("layers")
def layer_list(num_classes: int, in_chans: int = 3, img_size: int = 32, layers: list | None = None,
               **_: Any) -> nn.Module:
    """A network written as a list of layers (models/layers.py); the reference network if none is given."""
    from imgcls.models.layers import REFERENCE_LAYERS, LayerListNet

    return LayerListNet(layers if layers is not None else REFERENCE_LAYERS, num_classes, in_chans, img_size)


# Options a model card or a config may pass to an architecture. A model.json is untrusted
# input, and timm.create_model also takes arguments that read or fetch files
# (checkpoint_path, pretrained_cfg, pretrained_cfg_overlay, cache_dir, ...), which run before
# the weights' sha256 is checked; so only these plain hyper-parameters are passed on.
TIMM_OPTIONS = frozenset({
    "drop_rate", "drop_path_rate", "drop_block_rate", "drop_connect_rate", "attn_drop_rate", "proj_drop_rate",
    "pos_drop_rate", "patch_drop_rate", "global_pool", "act_layer", "output_stride", "layer_scale_init_value",
    "class_token", "qkv_bias"})
_AIRBENCH_OPTIONS = frozenset({"bn_momentum", "scaling_factor", "whiten_eps", "whiten_bias_epochs"})
BUILTIN_OPTIONS: dict[str, frozenset[str]] = {"reference_cnn": frozenset(), "airbench": _AIRBENCH_OPTIONS,
                                              "airbench_small": _AIRBENCH_OPTIONS, "layers": frozenset({"layers"})}


def model_options(name: str) -> frozenset[str]:
    """The option names ``name`` takes from a config or model card."""
    if name in BUILTIN_OPTIONS:
        return BUILTIN_OPTIONS[name]
    if name in MODELS:  # a built-in registered elsewhere: the keyword parameters it names
        import inspect

        params = inspect.signature(MODELS.get(name)).parameters.values()
        return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY or (
            p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("num_classes", "in_chans", "img_size")))
    return TIMM_OPTIONS


def _is_scalar(v: Any) -> bool:
    if isinstance(v, float):
        return v == v and abs(v) != float("inf")
    return v is None or isinstance(v, (bool, int, str))


def model_kwargs_problem(name: str, kwargs: Any) -> str | None:
    """Why ``kwargs`` may not be passed to architecture ``name``, or None when they may."""
    if not isinstance(kwargs, dict):
        return "model options must be a mapping"
    allowed = model_options(name)
    for key, value in kwargs.items():
        if key not in allowed:
            return (f"'{key}' is not an option imgcls passes to {name} (allowed: "
                    f"{', '.join(sorted(allowed)) or 'none'})")
        if key != "layers" and not _is_scalar(value):
            return f"option '{key}' must be a number, string, boolean or null"
    return None


def check_model_kwargs(name: str, kwargs: Any) -> None:
    problem = model_kwargs_problem(name, kwargs)
    if problem:
        raise ImgclsError(f"model options: {problem}", "remove it from the config's model mapping")


def model_from_config(model: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A config's ``model`` value -> (architecture, keyword arguments).

    ``"resnet18"``; ``{layers: [...]}`` (a custom CNN, models/layers.py); or
    ``{name: resnet18, drop_rate: 0.2, ...}`` (an architecture with options)."""
    if isinstance(model, str):
        return model, {}
    if not isinstance(model, dict):
        raise ImgclsError(f"model must be a name or a mapping, got {model!r}", "e.g. model: resnet18")
    if "layers" in model:
        extra = [k for k in model if k != "layers"]
        if extra:
            raise ImgclsError(f"model: unknown key '{extra[0]}' next to layers", "model: {layers: [...]} takes only layers")
        return "layers", {"layers": model["layers"]}
    if "name" in model:
        kwargs = {k: v for k, v in model.items() if k != "name"}
        return str(model["name"]), kwargs
    raise ImgclsError(f"model mapping needs 'layers' or 'name', got keys {sorted(model)}",
                      "e.g. model: {layers: [...]} or model: {name: resnet18}")


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model or any timm architecture, randomly initialised, with
    ``num_classes`` outputs and ``in_chans`` input channels. ``kwargs`` must be options the
    architecture takes (:func:`model_options`)."""
    check_model_kwargs(name, kwargs)
    if name in MODELS:
        try:
            return MODELS.get(name)(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
        except ValueError as exc:
            raise ImgclsError(f"cannot build {name}: {exc}", "change --img-size") from None
        except TypeError as exc:  # an option the architecture does not take
            raise ImgclsError(f"cannot build {name}: {exc}", "check the model options in the config") from None
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


def list_models(pattern: str = "", pretrained: bool = False) -> dict[str, list[str]]:
    """Architecture names matching ``pattern``; with ``pretrained`` only timm ones that have
    pretrained weights (imgcls built-ins have none)."""
    import fnmatch

    import timm

    pat = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
    timm_names = timm.list_models(pretrained=True) if pretrained else _timm_names()
    if pretrained:  # 'resnet18.a1_in1k' -> 'resnet18': the architecture name is what --model takes
        timm_names = list(dict.fromkeys(n.split(".")[0] for n in timm_names))
    return {"imgcls": [] if pretrained else [n for n in MODELS.names() if fnmatch.fnmatch(n, pat)],
            "timm": [n for n in timm_names if fnmatch.fnmatch(n, pat)]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
