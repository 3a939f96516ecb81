"""Custom CNNs written as data: a list of layers in the YAML config, Keras-Sequential style.

    model:
      layers:
        - conv: {filters: 32, kernel: 3, activation: relu}
        - maxpool: 2
        - flatten
        - dense: {units: 64, activation: relu}
        - dense: {units: num_classes}

Layers: conv, maxpool, avgpool, batchnorm, dropout, flatten, global_avg_pool (gap),
global_max_pool, dense, and bare activations (relu, gelu, silu, tanh, sigmoid, elu,
leaky_relu). Shapes are inferred from the input (channels x size x size); a list that
cannot work is refused before any training, naming the layer (``layers[i]``) and the
shapes. The built network has the timm interface (forward_features / forward_head /
get_classifier / reset_classifier), so fine-tuning, summaries and Grad-CAM work on it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from imgcls.errors import ImgclsError, did_you_mean
from imgcls.models.base import FeaturesHeadNet

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "mish": nn.Mish, "hardswish": nn.Hardswish,
}
ALIASES = {"conv2d": "conv", "max_pool": "maxpool", "maxpool2d": "maxpool", "avg_pool": "avgpool",
           "avgpool2d": "avgpool", "batch_norm": "batchnorm", "bn": "batchnorm", "linear": "dense",
           "gap": "global_avg_pool", "global_average_pooling": "global_avg_pool",
           "globalaveragepooling2d": "global_avg_pool", "gmp": "global_max_pool", "globalmaxpooling2d":
           "global_max_pool", "activation": "activation"}
KINDS = ("conv", "maxpool", "avgpool", "batchnorm", "dropout", "flatten", "global_avg_pool", "global_max_pool",
         "dense", "activation", *ACTIVATIONS)
ARGS = {
    "conv": ("filters", "kernel", "stride", "padding", "activation", "bias"),
    "maxpool": ("size", "stride", "padding"), "avgpool": ("size", "stride", "padding"),
    "dense": ("units", "activation", "bias"), "dropout": ("rate",), "batchnorm": (), "flatten": (),
    "global_avg_pool": (), "global_max_pool": (), "activation": ("name",),
}
SHORTHAND = {"conv": "filters", "maxpool": "size", "avgpool": "size", "dense": "units", "dropout": "rate",
             "activation": "name"}

# The reference network (models/reference.py) as a layer list; examples/reference_cnn.yaml holds the same.
REFERENCE_LAYERS: list[Any] = [
    {"conv": {"filters": 32, "kernel": 3, "activation": "relu"}}, {"maxpool": 2},
    {"conv": {"filters": 64, "kernel": 3, "activation": "relu"}}, {"maxpool": 2},
    "flatten", {"dense": {"units": 64, "activation": "relu"}}, {"dense": {"units": "num_classes"}},
]


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _parse(i: int, entry: Any) -> tuple[str, dict[str, Any]]:
    """One list entry -> (kind, args). Accepts 'flatten', {maxpool: 2}, {conv: {...}}."""
    where = f"layers[{i}]"
    if isinstance(entry, str):
        kind, args = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        kind, args = next(iter(entry.items()))
    else:
        raise ImgclsError(f"{where} must be a layer name or a one-key mapping, got {entry!r}",
                          "e.g. `- flatten`, `- maxpool: 2` or `- conv: {filters: 32, kernel: 3}`")
    kind = str(kind).lower()
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ImgclsError(f"{where}: unknown layer type '{kind}'",
                          did_you_mean(kind, KINDS) or "known: " + ", ".join(KINDS))
    if kind in ACTIVATIONS:
        if args not in ({}, None):
            raise ImgclsError(f"{where} ({kind}) takes no arguments", f"write `- {kind}`")
        return "activation", {"name": kind}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        if kind not in SHORTHAND:
            raise ImgclsError(f"{where} ({kind}) takes no value, got {args!r}", f"write `- {kind}`")
        args = {SHORTHAND[kind]: args}
    allowed = ARGS[kind]
    for key in args:
        if key not in allowed:
            raise ImgclsError(f"{where} ({kind}): unknown option '{key}'",
                              did_you_mean(key, allowed) or ("options: " + ", ".join(allowed) if allowed
                                                             else "it takes no options"))
    return kind, dict(args)


def _int(i: int, kind: str, key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ImgclsError(f"layers[{i}] ({kind}): {key} must be an integer >= {minimum}, got {v!r}",
                          f"e.g. {key}: {max(minimum, 2)}")
    return v


def _activation(i: int, kind: str, name: Any, last: bool) -> nn.Module | None:
    if name in (None, "linear", "none"):
        return None
    name = str(name).lower()
    if name == "softmax":
        if last:
            return None  # the loss and the predictor apply softmax to the logits
        raise ImgclsError(f"layers[{i}] ({kind}): softmax only makes sense on the last layer",
                          "use relu (or another activation) inside the network")
    if name not in ACTIVATIONS:
        raise ImgclsError(f"layers[{i}] ({kind}): unknown activation '{name}'",
                          did_you_mean(name, ACTIVATIONS) or "known: " + ", ".join(ACTIVATIONS))
    return ACTIVATIONS[name]()


def _pool_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _conv(i: int, where: str, a: dict, shape: tuple, last: bool, num_classes: int) -> tuple[nn.Module, tuple]:
    kind = "conv"
    if "filters" not in a:
        raise ImgclsError(f"{where} needs filters", "e.g. conv: {filters: 32, kernel: 3}")
    f = _int(i, kind, "filters", a["filters"])
    k = _int(i, kind, "kernel", a.get("kernel", 3))
    s = _int(i, kind, "stride", a.get("stride", 1))
    pad = a.get("padding", "valid")
    if pad == "same":
        p: int | str = "same" if s == 1 else k // 2  # torch's 'same' is for stride 1 only
    elif pad == "valid":
        p = 0
    else:
        p = _int(i, kind, "padding", pad, minimum=0)
    c, h, w = shape
    pn = (k - 1) // 2 if p == "same" else int(p)
    if p != "same" and (h + 2 * pn < k or w + 2 * pn < k):
        raise ImgclsError(f"{where}: kernel {k}x{k} is larger than its input {_fmt(shape)} "
                          f"(padding {pn})", "use a smaller kernel, padding: same, or fewer pooling layers before it")
    oh, ow = (h, w) if p == "same" else (_pool_out(h, k, s, pn), _pool_out(w, k, s, pn))
    conv: nn.Module = nn.Conv2d(c, f, k, stride=s, padding=p, bias=bool(a.get("bias", True)))
    act = _activation(i, kind, a.get("activation"), last)
    return (nn.Sequential(conv, act) if act is not None else conv), (f, oh, ow)


def _pool(kind: str):
    def build(i: int, where: str, a: dict, shape: tuple, last: bool, num_classes: int) -> tuple[nn.Module, tuple]:
        k = _int(i, kind, "size", a.get("size", 2))
        s = _int(i, kind, "stride", a.get("stride", k))
        pad = a.get("padding", "valid")
        pn = (k // 2) if pad == "same" else 0 if pad == "valid" else _int(i, kind, "padding", pad, minimum=0)
        if pn * 2 > k:
            raise ImgclsError(f"{where}: padding {pn} is more than half the pool size {k}", "use padding <= size/2")
        c, h, w = shape
        if h + 2 * pn < k or w + 2 * pn < k:
            raise ImgclsError(f"{where}: pool size {k} is larger than its input {_fmt(shape)}",
                              "use a smaller pool, or a larger --img-size")
        cls = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
        return cls(k, stride=s, padding=pn), (c, _pool_out(h, k, s, pn), _pool_out(w, k, s, pn))
    return build


def _batchnorm(i, where, a, shape, last, num_classes):
    return (nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])), shape


def _dropout(i, where, a, shape, last, num_classes):
    rate = a.get("rate", 0.5)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ImgclsError(f"{where}: rate must be in [0, 1), got {rate!r}", "e.g. dropout: 0.25")
    return nn.Dropout(rate), shape


def _activation_layer(i, where, a, shape, last, num_classes):
    act = _activation(i, "activation", a.get("name"), last)
    return (act if act is not None else nn.Identity()), shape


def _flatten(i, where, a, shape, last, num_classes):
    if len(shape) != 3:
        raise ImgclsError(f"{where}: its input {_fmt(shape)} is already flat", "remove the extra flatten")
    return nn.Flatten(), (shape[0] * shape[1] * shape[2],)


def _global_pool(kind: str):
    def build(i, where, a, shape, last, num_classes):
        pool = nn.AdaptiveAvgPool2d(1) if kind == "global_avg_pool" else nn.AdaptiveMaxPool2d(1)
        return nn.Sequential(pool, nn.Flatten()), (shape[0],)
    return build


def _dense(i, where, a, shape, last, num_classes):
    if len(shape) == 3:
        raise ImgclsError(f"{where}: its input {_fmt(shape)} is image-shaped",
                          "add flatten or global_avg_pool before the first dense layer")
    units = a.get("units")
    if units == "num_classes":
        units = num_classes
    units = _int(i, "dense", "units", units)
    if last and units != num_classes:
        raise ImgclsError(f"{where}: the last layer has {units} units but the data has {num_classes} classes",
                          "write units: num_classes")
    if last and str(a.get("activation", "linear")).lower() not in ("linear", "none", "softmax"):
        raise ImgclsError(f"{where}: the last layer gives logits and takes no {a['activation']} activation",
                          "drop its activation (softmax is applied by the loss and the predictor)")
    lin = nn.Linear(shape[0], units, bias=bool(a.get("bias", True)))
    act = _activation(i, "dense", a.get("activation"), last)
    return (nn.Sequential(lin, act) if act is not None else lin), (units,)


# one builder per layer kind: (index, "layers[i] (kind)", options, input shape, is last, classes)
# -> (module, output shape)
BUILDERS = {"conv": _conv, "maxpool": _pool("maxpool"), "avgpool": _pool("avgpool"), "batchnorm": _batchnorm,
            "dropout": _dropout, "activation": _activation_layer, "flatten": _flatten,
            "global_avg_pool": _global_pool("global_avg_pool"), "global_max_pool": _global_pool("global_max_pool"),
            "dense": _dense}
SPATIAL_ONLY = ("conv", "maxpool", "avgpool", "global_avg_pool", "global_max_pool")


def build_layers(spec: list[Any], num_classes: int, in_chans: int, img_size: int
                 ) -> tuple[list[nn.Module], list[tuple[int, ...]], int]:
    """Modules for each entry, the output shape after each, and the index of the first
    layer that works on flat vectors (where forward_features ends)."""
    if not isinstance(spec, list) or not spec:
        raise ImgclsError("model.layers must be a non-empty list of layers", "see examples/reference_cnn.yaml")
    shape: tuple[int, ...] = (in_chans, img_size, img_size)
    modules: list[nn.Module] = []
    shapes: list[tuple[int, ...]] = []
    flat_at = None
    parsed = [_parse(i, e) for i, e in enumerate(spec)]
    last = len(parsed) - 1
    if parsed[-1][0] != "dense":
        raise ImgclsError(f"the last layer (layers[{last}]) must be dense with units: num_classes, "
                          f"not {parsed[-1][0]}", "end the list with `- dense: {units: num_classes}`")
    for i, (kind, a) in enumerate(parsed):
        where = f"layers[{i}] ({kind})"
        if kind in SPATIAL_ONLY and len(shape) != 3:
            raise ImgclsError(f"{where} needs an image-shaped input but gets flat vectors {_fmt(shape)}",
                              "put convolutions and pooling before flatten / global pooling")
        module, shape = BUILDERS[kind](i, where, a, shape, i == last, num_classes)
        modules.append(module)
        if flat_at is None and len(shape) == 1:
            flat_at = i
        if any(d < 1 for d in shape):
            raise ImgclsError(f"{where}: the output shape {_fmt(shape)} is empty (input "
                              f"{_fmt(shapes[-1] if shapes else (in_chans, img_size, img_size))})",
                              "use fewer pooling / strided layers or a larger --img-size")
        shapes.append(shape)
    if flat_at is None:  # cannot happen: the last layer is dense, which needs flat input
        raise AssertionError("no flat layer")
    return modules, shapes, flat_at


class LayerListNet(FeaturesHeadNet):
    """A Sequential network from a layer list, split the timm way: ``features`` (the
    image-shaped part), ``pre_logits`` (flatten / pooling / hidden dense layers), ``fc``."""

    def __init__(self, layers: list[Any], num_classes: int, in_chans: int = 3, img_size: int = 32):
        super().__init__()
        modules, shapes, flat_at = build_layers(layers, num_classes, in_chans, img_size)
        self.layers_spec = layers
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.shapes = shapes
        self.features = nn.Sequential(*modules[:flat_at])
        self.pre_logits = nn.Sequential(*modules[flat_at:-1])
        self.fc = modules[-1]
        self.num_features = shapes[-2][0]  # what the classifier sees (always flat: dense needs flat input)
