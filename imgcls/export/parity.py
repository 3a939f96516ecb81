"""Parity checks: the exported model must agree with the PyTorch model it came from.

The reference is the PyTorch module in fp32 on the CPU *with the run's test-time
augmentation* (the export carries the same TTA inside its graph), run through the same
:class:`~imgcls.engine.predictor.Predictor` every prediction uses, on the run's own
validation split (rebuilt from config.yaml / model.json with the same val_split and
seed, relabelled to the model's class order), or on a seeded sample of it. Float exports
must agree on top-1 for >= 99.9% of the images; int8 exports are judged by their
accuracy change against the labels instead (int8 is allowed to flip a few borderline
images, not to lose accuracy beyond ``max_drop`` points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.bundle import ModelBundle
from imgcls.data.records import ImageData, Split
from imgcls.data.sources import load_data
from imgcls.engine.multilabel import sigmoid
from imgcls.engine.predictor import Predictor, softmax
from imgcls.errors import ImgclsError
from imgcls.rundir import RunDir

MIN_AGREEMENT = 0.999


def data_spec(run_dir: Path | None, card: dict[str, Any], override: str | None) -> str:
    """Where the run's data is: --data, else config.yaml's data, else the card's data name."""
    if override:
        return override
    configured = RunDir(run_dir).config_values().get("data") if run_dir is not None else None
    if configured:
        return str(configured)
    name = card.get("training", {}).get("data")
    if name:
        return str(name)
    raise ImgclsError(f"{run_dir or 'the model'} does not record its training data",
                      "pass --data with the validation data for the parity check")


def load_run_data(bundle: ModelBundle, override: str | None) -> ImageData:
    """The run's data, its validation split held out as in training, relabelled to the
    model's class order (the data's own order may differ: its labels would not match)."""
    spec = data_spec(bundle.path, bundle.card, override)
    training = bundle.card.get("training", {})
    try:
        data = load_data(spec, val_split=training.get("val_split", 0.1), seed=training.get("seed", 0),
                         group_by=training.get("group_by"), like=bundle.classes)  # held out in the model's order
    except ImgclsError as exc:
        raise ImgclsError(f"cannot load the data for the parity check ({exc.message})",
                          "pass --data FOLDER|FILE.npz|NAME with the run's data") from None
    return bundle.check_classes(data)


def sample(split: Split, n: int | None, seed: int = 0) -> Split:
    """A seeded random sample of ``n`` images (all of them when n is None or larger)."""
    if n is None or n >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return split.subset(idx.sort().values)


def check_split(data: ImageData) -> tuple[str, Split]:
    if data.val is not None and len(data.val):
        return "val", data.val
    return data.eval_split()


def reference_logits(bundle: ModelBundle, split: Split, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """fp32 PyTorch logits on the CPU, TTA included: the ground truth an export is compared with."""
    with Predictor.reference(bundle, batch_size) as p:
        return p.run(split)


def compare_multilabel(ref_logits: np.ndarray, other_logits: np.ndarray, labels: np.ndarray,
                       thresholds: list[float]) -> dict[str, Any]:
    """A multi-label export: sigmoid per class; ``top1_agreement`` is the share of images whose
    whole label set (at the model's thresholds) is the same, accuracy the exact-match ratio."""
    t = np.asarray(thresholds)[None, :]
    p_ref, p_other = sigmoid(ref_logits), sigmoid(other_logits)
    s_ref, s_other, y = p_ref >= t, p_other >= t, labels > 0.5
    diff = np.abs(p_ref - p_other)
    acc_ref, acc_other = float((s_ref == y).all(1).mean()), float((s_other == y).all(1).mean())
    return {"images": int(len(labels)), "top1_agreement": round(float((s_ref == s_other).all(1).mean()), 6),
            "label_decision_agreement": round(float((s_ref == s_other).mean()), 6),
            "max_prob_diff": float(f"{diff.max():.3g}"), "mean_prob_diff": float(f"{diff.mean():.3g}"),
            "accuracy_torch": round(acc_ref, 6), "accuracy_export": round(acc_other, 6),
            "accuracy_change_points": round(100 * (acc_other - acc_ref), 3), "accuracy_is": "exact match"}


def compare(ref_logits: np.ndarray, other_logits: np.ndarray, labels: np.ndarray,
            temperature: float = 1.0, thresholds: list[float] | None = None) -> dict[str, Any]:
    if thresholds is not None:
        return compare_multilabel(ref_logits, other_logits, labels, thresholds)
    p_ref, p_other = softmax(ref_logits, temperature), softmax(other_logits, temperature)
    agree = float((p_ref.argmax(1) == p_other.argmax(1)).mean())
    diff = np.abs(p_ref - p_other)
    acc_ref = float((p_ref.argmax(1) == labels).mean())
    acc_other = float((p_other.argmax(1) == labels).mean())
    return {"images": int(len(labels)), "top1_agreement": round(agree, 6),
            "max_prob_diff": float(f"{diff.max():.3g}"), "mean_prob_diff": float(f"{diff.mean():.3g}"),
            "accuracy_torch": round(acc_ref, 6), "accuracy_export": round(acc_other, 6),
            "accuracy_change_points": round(100 * (acc_other - acc_ref), 3)}
