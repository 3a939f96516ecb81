"""What an exported model needs to be used correctly, written into the file and beside it.

Every export carries the preprocessing the model was trained with (size, mean/std,
channels, resize mode), its class names and the sha256 of the weights it came from, so a
consumer in any language can build the right input without imgcls, and ``imgcls
predict --backend auto`` can tell whether an export still matches its run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgcls import __version__
from imgcls.artifact import read_json
from imgcls.errors import ImgclsError

SIDECAR_SUFFIX = ".json"
META_KEY = "imgcls"  # the whole metadata as one JSON string, besides one key per field


def export_metadata(clf, fmt: str, precision: str, opset: int | None = None) -> dict[str, Any]:
    pre = clf.preprocessing
    meta: dict[str, Any] = {
        "format": fmt,
        "precision": precision,
        "architecture": clf.architecture,
        "classes": list(clf.classes),
        "num_classes": clf.num_classes,
        "img_size": pre.img_size,
        "in_chans": pre.in_chans,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "resize": pre.resize,
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "temperature": clf.temperature,
        "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": ["batch", pre.in_chans,
                                                                                   pre.img_size, pre.img_size],
                  "note": "RGB (or L) pixels / 255, resized as 'resize' says, then (x - mean) / std per channel"},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", clf.num_classes],
                   "note": "probabilities = softmax(logits / temperature)"},
        "source_weights_sha256": clf.card.get("weights_sha256"),
        "imgcls_version": __version__,
    }
    if opset is not None:
        meta["opset"] = opset
    return meta


def flat_props(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props are string -> string: scalars as text, the rest as JSON."""
    props = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items() if k != "parity"}
    props[META_KEY] = json.dumps(meta)
    return props


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + SIDECAR_SUFFIX)


def write_sidecar(model_path: Path, meta: dict[str, Any]) -> Path:
    path = sidecar_path(model_path)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_sidecar(model_path: Path) -> dict[str, Any]:
    path = sidecar_path(Path(model_path))
    if not path.is_file():
        raise ImgclsError(f"{model_path} has no {path.name} beside it",
                          "re-export it with `imgcls export RUN`")
    meta = read_json(path, "re-export with `imgcls export RUN`")
    if not isinstance(meta, dict) or "classes" not in meta or "img_size" not in meta:
        raise ImgclsError(f"{path} is not an imgcls export description", "re-export with `imgcls export RUN`")
    return meta
