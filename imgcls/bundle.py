"""ModelBundle: a network together with everything needed to use it the way it was
trained: classes, preprocessing, calibration temperature, test-time augmentation and the
model card. Like torchvision's ``Weights`` (weights + transforms + meta in one object).

Everything below the API (``engine``, ``evaluation``, ``explain``, ``export``, ``serve``)
is written against this type; :class:`imgcls.Classifier` is a ModelBundle with training
and prediction methods on top.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from imgcls.artifact import atomic_write, load_weights, read_card, save_model
from imgcls.data.records import ImageData
from imgcls.data.sources import with_classes
from imgcls.data.transforms import Preprocessing
from imgcls.errors import ImgclsError
from imgcls.models import count_params, create_model
from imgcls.version import library_versions

# card fields a save rewrites from the bundle itself (never copied from an old card)
_DERIVED = ("format", "format_version", "weights_sha256")
OOD_FEATURES_FILE = "ood_features.safetensors"  # training features of the kNN unknown score (engine/ood.py)


def save_features(folder: str | Path, stats: dict[str, torch.Tensor] | torch.Tensor) -> Path:
    """The feature OOD score's training statistics (the kNN bank: ``features``) beside the
    weights (safetensors, written atomically)."""
    from safetensors.torch import save_file

    if isinstance(stats, torch.Tensor):
        stats = {"features": stats}
    path = Path(folder) / OOD_FEATURES_FILE
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in stats.items()}, str(p)))
    return path


class ModelBundle:
    def __init__(self, model: torch.nn.Module, *, architecture: str, classes: list[str],
                 preprocessing: Preprocessing, model_kwargs: dict[str, Any] | None = None,
                 card: dict[str, Any] | None = None):
        self.model = model
        self.architecture = architecture
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.model_kwargs = dict(model_kwargs or {})
        self.card: dict[str, Any] = dict(card or {})
        self.temperature: float = float(self.card.get("temperature", 1.0))
        self.path: Path | None = None  # the folder it was loaded from: exports (model.onnx) live there
        # a feature OOD score's fitted training statistics not yet saved (else read from path)
        self.ood_features: dict[str, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def tta(self) -> str:
        """Test-time augmentation every prediction applies: none, flip or flip-shift."""
        return str(self.card.get("tta", "none"))

    @property
    def pretrained(self) -> bool:
        return bool(self.card.get("pretrained"))

    @property
    def multi_label(self) -> bool:
        """A multi-label model: sigmoid per class, answers a set of labels (model.json ``task``)."""
        return self.card.get("task") == "multi"

    @property
    def thresholds(self) -> list[float] | None:
        """Per-class decision thresholds of a multi-label model, in class order (model.json
        ``thresholds``: tuned on the validation split), or None when the card has none."""
        t = self.card.get("thresholds")
        if not t:
            return None
        return [float(t["values"][c]) for c in self.classes]

    def decision_thresholds(self) -> list[float] | None:
        """What ``decide`` applies: None for a single-label model; a multi-label model's tuned
        thresholds, or 0.5 per class (with a note naming the command that tunes them)."""
        if not self.multi_label:
            return None
        found = self.thresholds
        if found is None:
            import sys

            where = self.path or "RUN"
            print(f"imgcls: model.json has no tuned thresholds: using 0.5 per class "
                  f"(`imgcls thresholds {where} --data DATA` tunes them on the validation split)", file=sys.stderr)
            return [0.5] * self.num_classes
        return found

    def refuse_multi_label(self, feature: str) -> None:
        """The one-line refusal of a feature that only means something for one class per image."""
        if self.multi_label:
            raise ImgclsError(f"{feature} is for single-label models; this one is multi-label (a sigmoid per class)",
                              "multi-label models use per-class thresholds (model.json 'thresholds') instead")

    def check_classes(self, data: ImageData) -> ImageData:
        """``data`` relabelled to the model's class order (its classes may be a subset), its
        labels as the model's task has them (one-hot rows for a multi-label model; a
        single-label model refuses images with several labels)."""
        from imgcls.data.multilabel import as_task

        if data.multi_label != self.multi_label:
            data = as_task(data, "multi" if self.multi_label else "single")
        return self._check_class_names(data)

    def _check_class_names(self, data: ImageData) -> ImageData:
        if data.classes != self.classes and set(data.classes) <= set(self.classes):
            return with_classes(data, self.classes)
        if data.classes != self.classes:
            more = lambda c: "…" if len(c) > 6 else ""  # noqa: E731
            raise ImgclsError(f"the data's classes {data.classes[:6]}{more(data.classes)} differ from the "
                              f"model's {self.classes[:6]}{more(self.classes)}", "use data with the same class names")
        return data

    # ------------------------------------------------------------------ persistence
    def build_card(self, best_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        card = {k: v for k, v in self.card.items() if k not in _DERIVED}
        card.update({
            "architecture": self.architecture, "model_kwargs": self.model_kwargs,
            "num_classes": self.num_classes, "classes": self.classes,
            "in_chans": self.preprocessing.in_chans, "img_size": self.preprocessing.img_size,
            "preprocessing": self.preprocessing.to_dict(), "temperature": self.temperature,
            "num_params": count_params(self.model), "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if best_metrics is not None:
            card.setdefault("metrics", {})["best_val"] = dict(best_metrics)
        return card

    def write(self, folder: str | Path, best_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Weights + card into ``folder`` (the bundle's own card is left as it is)."""
        card = save_model(Path(folder), self.model, self.build_card(best_metrics))
        if self.ood_features is not None:
            save_features(folder, self.ood_features)
        return card

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.card = self.write(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path):
        """The model of a run folder (or of a ``model.json`` path): card checked, network
        rebuilt, weights' sha256 verified; nothing is unpickled."""
        card = read_card(folder)
        pre = Preprocessing.from_dict(card["preprocessing"])
        try:
            model = create_model(card["architecture"], int(card["num_classes"]), in_chans=pre.in_chans,
                                 img_size=pre.img_size, **card.get("model_kwargs", {}))
        except ImgclsError as exc:
            raise ImgclsError(f"cannot rebuild the model of {folder}: {exc.message}", exc.hint) from None
        state = load_weights(folder, card)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ImgclsError(f"the weights in {folder} do not fit architecture '{card['architecture']}' "
                              f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)",
                              "the files do not belong together; retrain or restore them")
        model.eval()
        bundle = cls(model, architecture=card["architecture"], classes=card["classes"], preprocessing=pre,
                     model_kwargs=card.get("model_kwargs"), card=card)
        bundle.path = Path(folder) if Path(folder).is_dir() else Path(folder).parent
        return bundle
