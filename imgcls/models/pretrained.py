"""Pretrained backbones: timm's own download mechanism (Hugging Face hub) when online, or a
local state-dict file (``--weights FILE``) when not; a new head for the user's classes.

The pretrained config (mean, std, input size, interpolation, crop) comes back with the
model so the caller can put it into :class:`~imgcls.data.transforms.Preprocessing` and
``model.json``: a pretrained network only works with the normalisation it was trained with.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from imgcls.errors import ImgclsError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass
class PretrainedInfo:
    """Where the weights came from and the input they expect."""

    source: str  # "hf-hub:timm/..." or "file:/path"
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_card(self) -> dict[str, Any]:
        d = {"source": self.source, "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
             "interpolation": self.interpolation, "crop_pct": self.crop_pct}
        if self.sha256:
            d["sha256"] = self.sha256
        return d


def _timm():
    import timm

    return timm


def _check_timm_name(name: str) -> None:
    from imgcls.models.factory import MODELS

    timm = _timm()
    if timm.is_model(name):
        return
    if name in MODELS:
        raise ImgclsError(f"--pretrained / --weights need a timm architecture; '{name}' is an imgcls built-in "
                          "trained from scratch", "pick a timm model, e.g. --model tf_efficientnet_lite0")
    raise MODELS.unknown(name, extra_choices=timm.list_models())


def _info_from_cfg(cfg: dict[str, Any], source: str, in_chans: int) -> PretrainedInfo:
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if in_chans != len(mean):  # timm averages the first conv over RGB for 1-channel input
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    interp = cfg.get("interpolation", "bilinear")
    return PretrainedInfo(source=source, input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                          mean=tuple(round(float(v), 6) for v in mean), std=tuple(round(float(v), 6) for v in std),
                          interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
                          crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875))


def pretrained_input(name: str) -> tuple[int, bool]:
    """(input side, whether the architecture needs exactly that side) of a timm name's default
    pretrained weights, from timm's config table (no weights are read); (224, False) when
    timm has none for it. ViTs and Swins are fixed; convolutional nets take any size."""
    try:
        cfg = _timm().models.get_pretrained_cfg(name)
    except Exception:  # unknown names are refused, with close matches, when the model is built
        cfg = None
    if cfg is None:
        return 224, False
    return int(cfg.input_size[-1]), bool(getattr(cfg, "fixed_input_size", False))


# ---------------------------------------------------------------------- local files
# Reading a torch file without unpickling objects (weights files here; checkpoints in
# engine/checkpoint.py use the same helpers).
def looks_like_plain_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode + version


def load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` without its warning about a plain pickle's protocol
    (2 lines before the refusal that follows for such a file)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def pickled_objects(exc: BaseException) -> str:
    """Why torch's weights-only loader refused a file, in a few words of our own: the first
    class it would have had to import (torch's own text is several sentences of advice to load
    the file unsafely), or ''."""
    import re

    found = re.search(r"(?:Unsupported global|GLOBAL)\W+(?:GLOBAL )?([\w.]+)", str(exc))
    return f"; this file would import {found.group(1)}" if found else ""


def is_pickle_refusal(exc: BaseException) -> bool:
    text = str(exc)
    return "weights_only" in text or "Weights only load failed" in text or "Unsupported global" in text \
        or "Unsupported operand" in text


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file (read with
    ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and containers).
    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, DDP's ``module.``) are undone."""
    path = Path(path)
    if not path.is_file():
        raise ImgclsError(f"weights file not found: {path}", "check the path given to --weights")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ImgclsError(f"--weights {path}: unsupported file type '{path.suffix}'",
                          "give a .safetensors or a .pth/.pt state dict")
    give = "give a .safetensors file, or a plain state dict saved with torch.save(model.state_dict(), FILE)"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = load_weights_only(path)  # weights_only=True, without torch's pickle-protocol warning
    except Exception as exc:  # safetensors / torch raise many types for damaged or pickled files
        # torch's own text here is several sentences of advice to load the file unsafely (cut
        # mid-sentence, with a terminal escape in it): said in our words instead
        if is_pickle_refusal(exc) or looks_like_plain_pickle(path):
            raise ImgclsError(f"cannot read weights file {path}: refused, it holds pickled Python objects (a whole "
                              f"model saved with torch.save(model)?), which imgcls never loads (they can run "
                              f"arbitrary code{pickled_objects(exc)}); nothing of it was loaded", give) from None
        raise ImgclsError(f"cannot read weights file {path}: it is damaged, truncated or not a weights file",
                          give) from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImgclsError(f"{path} does not hold a state dict of tensors",
                          "save one with torch.save(model.state_dict(), FILE) or safetensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _classifier_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    name = cfg.get("classifier")
    if isinstance(name, (list, tuple)):  # distilled models have two heads; the first is the one we replace
        name = name[0]
    return name


def load_weights_file(name: str, path: str | Path, num_classes: int, in_chans: int = 3,
                      **kwargs: Any) -> tuple[nn.Module, PretrainedInfo]:
    """timm architecture ``name`` with the backbone from a local state dict and a new head."""
    from imgcls.data.download import sha256sum

    _check_timm_name(name)
    timm = _timm()
    state = read_state_dict(path)
    probe = timm.create_model(name, pretrained=False, **kwargs)
    clf = _classifier_name(probe)
    head_w = state.get(f"{clf}.weight") if clf else None
    # build with the file's own head size so every tensor loads strictly, then swap the head
    file_classes = int(head_w.shape[0]) if head_w is not None and head_w.ndim >= 1 else 0
    first_conv = probe.pretrained_cfg.get("first_conv")
    src_chans = None
    if first_conv and f"{first_conv}.weight" in state:
        src_chans = int(state[f"{first_conv}.weight"].shape[1])
    model = timm.create_model(name, pretrained=False, num_classes=file_classes, in_chans=src_chans or in_chans,
                              **kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = (f"missing {len(missing)} tensor(s), e.g. '{missing[0]}'" if missing else "") + \
               ("; " if missing and unexpected else "") + \
               (f"{len(unexpected)} unexpected, e.g. '{unexpected[0]}'" if unexpected else "")
        raise ImgclsError(f"--weights {path} does not fit architecture '{name}' ({what})",
                          f"give weights saved from timm's {name} (timm parameter names)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ImgclsError(f"--weights {path} does not fit architecture '{name}': tensor '{k}' is "
                              f"{tuple(v.shape)} in the file but {tuple(expected[k].shape)} in the model",
                              "give weights saved from the same architecture and variant")
    model.load_state_dict(state, strict=False)
    if src_chans is not None and src_chans != in_chans:
        # timm's own rule for pretrained weights on 1-channel (or other) inputs
        from timm.models import adapt_input_conv

        conv_w = adapt_input_conv(in_chans, state[f"{first_conv}.weight"])
        rebuilt = timm.create_model(name, pretrained=False, num_classes=file_classes, in_chans=in_chans, **kwargs)
        rebuilt.load_state_dict({**state, f"{first_conv}.weight": conv_w}, strict=False)
        model = rebuilt
    model.reset_classifier(num_classes)
    cfg = dict(model.pretrained_cfg)
    info = _info_from_cfg(cfg, f"file:{Path(path).resolve()}", in_chans)
    info.sha256 = sha256sum(Path(path))
    return model, info


# ---------------------------------------------------------------------- hub
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast when offline: huggingface_hub otherwise retries for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_on_disk(cfg: dict[str, Any]) -> bool:
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for fname in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, fname), str):
            return True
    return False


def load_from_hub(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> tuple[nn.Module, PretrainedInfo]:
    """timm's own mechanism (``pretrained=True``): weights from the HF hub or its local cache."""
    _check_timm_name(name)
    timm = _timm()
    cfg_obj = timm.models.get_pretrained_cfg(name)
    cfg = cfg_obj.to_dict() if cfg_obj is not None else {}
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise ImgclsError(f"timm has no pretrained weights for '{name}'",
                          "`imgcls models --pretrained` lists architectures that have some")
    offline_hint = f"download them elsewhere and pass --weights FILE (.safetensors or .pth state dict of {name})"
    if not _cached_on_disk(cfg) and not _hub_reachable():
        raise ImgclsError(f"cannot download pretrained weights for '{name}': the Hugging Face hub is unreachable",
                          offline_hint)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except OSError as exc:  # huggingface_hub's connection / not-found errors are OSErrors
        raise ImgclsError(f"cannot download pretrained weights for '{name}': {str(exc).splitlines()[0][:160]}",
                          offline_hint) from None
    source = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else f"url:{cfg.get('url') or cfg.get('file')}"
    return model, _info_from_cfg(dict(model.pretrained_cfg), source, in_chans)


def create_pretrained(name: str, num_classes: int, in_chans: int = 3, weights: str | Path | None = None,
                      **kwargs: Any) -> tuple[nn.Module, PretrainedInfo]:
    """A pretrained timm model with a fresh ``num_classes`` head: from ``weights`` (a local
    file) if given, else from the hub. ``kwargs`` must be options timm models take
    (:data:`~imgcls.models.factory.TIMM_OPTIONS`)."""
    from imgcls.models.factory import check_model_kwargs

    check_model_kwargs(name, kwargs)
    if weights:
        return load_weights_file(name, weights, num_classes, in_chans, **kwargs)
    return load_from_hub(name, num_classes, in_chans, **kwargs)
