"""What an exported model needs to be used correctly, written into the file and beside it.

Every export carries the preprocessing the model was trained with (size, mean/std,
channels, resize mode), its class names and the sha256 of the weights it came from, so a
consumer in any language can build the right input without imgcls, and ``imgcls
predict --backend auto`` can tell whether an export still matches its run.
"""

from __future__ import annotations

import json
from typing import Any

from imgcls.artifact import SIDECAR_SUFFIX, read_sidecar, sidecar_path, write_sidecar  # noqa: F401 (re-exported)
from imgcls.bundle import ModelBundle
from imgcls.version import __version__

META_KEY = "imgcls"  # the whole metadata as one JSON string, besides one key per field


def export_metadata(clf: ModelBundle, fmt: str, precision: str, opset: int | None = None) -> dict[str, Any]:
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
        # test-time augmentation is part of the graph: it takes the batch and averages its views
        "tta": clf.tta,
        "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": ["batch", pre.in_chans,
                                                                                   pre.img_size, pre.img_size],
                  "note": "RGB (or L) pixels / 255, resized as 'resize' says, then (x - mean) / std per channel"},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", clf.num_classes],
                   "note": "probabilities = sigmoid(logits) per class; labels = those >= thresholds"
                   if clf.multi_label else "probabilities = softmax(logits / temperature)"},
        "source_weights_sha256": clf.card.get("weights_sha256"),
        "imgcls_version": __version__,
    }
    if opset is not None:
        meta["opset"] = opset
    if clf.multi_label:  # a label set per image: every class at or above its threshold
        meta["task"] = "multi"
        meta["thresholds"] = dict(zip(clf.classes, clf.decision_thresholds()))
    return meta


def flat_props(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props are string -> string: scalars as text, the rest as JSON."""
    props = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items() if k != "parity"}
    props[META_KEY] = json.dumps(meta)
    return props
