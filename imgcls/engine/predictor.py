"""The one predictor: every prediction - ``Classifier.predict`` / ``evaluate``, ``imgcls
predict``, the web service, the export parity check - goes through a :class:`Predictor`,
so they cannot disagree.

It owns the backend (torch, ONNX fp32, ONNX int8: engine/backends.py), test-time
augmentation (inside every backend: torch runs the views, an ONNX graph contains them),
the calibration temperature, batching from the data pipeline and the progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.bundle import ModelBundle
from imgcls.data.pipeline import as_split, decode_split, eval_batches, evaluation_data
from imgcls.data.records import ImageData
from imgcls.data.records import Split
from imgcls.data.sources import model_classes
from imgcls.engine.backends import TorchBackend, make_backend
from imgcls.engine.multilabel import sigmoid
from imgcls.engine.trust import Assessment, Trust
from imgcls.errors import ImgclsError


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def iter_backend(backend, batches, on_batch: Callable[[int], None] | None = None, features: bool | str = False):
    """``(logits, labels)`` of each batch - with ``features``, ``(logits, labels, penultimate
    features)``; ``features="layers"``: the block statistics follow the penultimate features
    (engine/layer_stats.py) - in order, one batch at a time (memory stays flat). The batches'
    decode workers stop when the pass ends (:meth:`~imgcls.data.loaders.Batches.close`)."""
    try:
        for x, y in batches:
            if features == "layers":
                got = backend.outputs(x, layers=True)
            else:
                got = backend.outputs(x) if features else (backend.logits(x),)
            if on_batch is not None:
                on_batch(len(y))
            yield (got[0], y.numpy(), *got[1:])
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def run_backend(backend, batches, on_batch: Callable[[int], None] | None = None,
                features: bool | str = False) -> tuple[np.ndarray, ...]:
    """Logits and labels for every batch, in order (``features``: and the penultimate features)."""
    outs, feats, labels = [], [], []
    for got in iter_backend(backend, batches, on_batch, features):
        outs.append(got[0])
        labels.append(got[1])
        if features:
            feats.append(got[2])
    if not outs:
        empty = np.empty((0, 0), np.float32), np.empty(0, np.int64)
        return (*empty, np.empty((0, 0), np.float32)) if features else empty
    got = np.concatenate(outs), np.concatenate(labels)
    return (*got, np.concatenate(feats)) if features else got


class Predictor:
    """``Predictor(bundle, backend="auto")``; ``logits(x)`` for one uint8 batch,
    ``run(split)`` for a whole split, ``probabilities(logits)`` calibrated. Use it as a
    context manager (or call ``close``) to hand the model back to the CPU."""

    def __init__(self, bundle: ModelBundle, backend: str = "torch", device: str = "auto", precision: str = "auto",
                 batch_size: int = 256, workers: int | None = None, _backend=None):
        self.bundle = bundle
        self.backend = _backend if _backend is not None else make_backend(bundle, backend, device, precision)
        self.batch_size, self.workers = batch_size, workers
        self._trust: Trust | None = None
        if _backend is None and self.trust.needs_features and not isinstance(self.backend, TorchBackend):
            if backend != "auto":  # an ONNX graph gives logits only; kNN needs the penultimate features
                self.backend.outputs(None)  # the one-line refusal naming the way out
            self.backend = TorchBackend(bundle.model, bundle.preprocessing, device, precision, bundle.tta)

    @classmethod
    def reference(cls, bundle: ModelBundle, batch_size: int = 128) -> Predictor:
        """fp32 PyTorch on the CPU, TTA included: what an export is checked against."""
        return cls(bundle, batch_size=batch_size,
                   _backend=TorchBackend(bundle.model, bundle.preprocessing, "cpu", "fp32", bundle.tta))

    @classmethod
    def over(cls, bundle: ModelBundle, backend, batch_size: int = 128) -> Predictor:
        """A predictor over a backend built elsewhere (an export just written and being
        checked, before the run knows it as usable)."""
        return cls(bundle, batch_size=batch_size, _backend=backend)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def device(self) -> torch.device:
        return getattr(self.backend, "device", torch.device("cpu"))

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """One uint8 batch (N, C, H, W) -> float32 logits (N, K), TTA applied."""
        return self.backend.logits(x)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax over classes (temperature-calibrated); a multi-label model's sigmoid per class."""
        if self.bundle.multi_label:
            return sigmoid(logits)
        return softmax(logits, self.bundle.temperature)

    # ------------------------------------------------------------------ trust (engine/trust.py)
    @property
    def trust(self) -> Trust:
        """The model's OOD score, unknown threshold and conformal sets (from model.json)."""
        if self._trust is None:
            self._trust = Trust(self.bundle)
        return self._trust

    def use_trust(self, sets: bool | None = None, reject: bool | None = None) -> Predictor:
        """Switch sets / unknown rejection off (False) or require them (True: an error naming
        ``imgcls calibrate`` when the model has none)."""
        self._trust = Trust(self.bundle, sets, reject)
        return self

    def packed(self, x: torch.Tensor) -> np.ndarray:
        """``[logits | features]`` of one batch when the OOD score needs features, else logits:
        one array per image, as the web service's batcher hands rows out (:meth:`unpack`)."""
        if not self.trust.needs_features:
            return self.backend.logits(x)
        z, f = self.backend.outputs(x, layers=True) if self.trust.features == "layers" else self.backend.outputs(x)
        return np.concatenate([z, f], 1)

    def unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        k = self.bundle.num_classes
        return (rows[:, :k], rows[:, k:]) if self.trust.needs_features else (rows, None)

    def assess(self, logits: np.ndarray, features: np.ndarray | None = None) -> Assessment:
        """OOD scores, unknown flags and conformal sets of these rows (a multi-label model:
        per-label energy or kNN scores and its unknown threshold; no sets)."""
        return self.trust.assess(logits, features)

    # ------------------------------------------------------------------ whole splits
    def run(self, split: Split, progress: bool = False,
            skipped: dict[int, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of every image of ``split``, in order. Unreadable files: an
        error, or recorded in ``skipped`` (index -> reason; their rows are meaningless)."""
        return self._run(split, progress, skipped, False)

    def run_outputs(self, split: Split, progress: bool = False, skipped: dict[int, str] | None = None,
                    features: bool | str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Logits, labels and - with ``features`` (None: what the model's OOD score needs;
        ``"layers"``: block statistics after the penultimate features) - the features (else
        None) of every image of ``split``."""
        features = self.trust.features if features is None else features
        out = self._run(split, progress, skipped, features)
        return out if features else (*out, None)

    def _run(self, split: Split, progress: bool, skipped: dict[int, str] | None, features: bool | str) -> tuple:
        batches = eval_batches(split, self.bundle.preprocessing, self.batch_size, workers=self.workers,
                               device=self.device, skipped=skipped)
        if not progress or len(split) <= 4 * self.batch_size:
            return run_backend(self.backend, batches, features=features)
        from rich.console import Console
        from rich.progress import Progress

        with Progress(transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task(f"predicting ({self.name})", total=len(split))
            return run_backend(self.backend, batches, lambda n: bar.advance(task, n), features=features)

    def stream(self, split: Split, skipped: dict[int, str] | None = None, on_batch: Callable[[int], None] | None = None,
               on_sources: Callable[[list[str]], None] | None = None, shard: tuple[int, int] | None = None):
        """``(logits, labels[, features])`` of each batch of ``split`` (features when the OOD
        score needs them), in order, as they are computed:
        what a job over millions of images (engine/batch_predict.py) consumes without
        holding them. ``on_sources``: a streamed split's source names per batch; ``shard``:
        (rank, world), read only this process's share."""
        batches = eval_batches(split, self.bundle.preprocessing, self.batch_size, workers=self.workers,
                               device=self.device, skipped=skipped)
        if shard is not None:
            batches.shard(*shard, even=False)
        if on_sources is not None:
            batches.on_sources = on_sources
        return iter_backend(self.backend, batches, on_batch, features=self.trust.features)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eval_data(bundle: ModelBundle, data: Any, split: str | None = None, *, strict: bool = False, cache: bool = True,
              announce: bool = True) -> tuple[ImageData, str, Split, list]:
    """What to evaluate ``bundle`` on: the data relabelled to its classes, the name of the
    split (:func:`~imgcls.data.pipeline.evaluation_data`: test, else the data's own
    validation split, else all of it; ``split="val"``: held out as in training), that
    split decoded once, and the files that could not be read."""
    training = bundle.card.get("training", {})
    with model_classes(bundle.classes):  # images of one of the model's classes can be evaluated
        data, name, attr = evaluation_data(data, split, training.get("val_split", 0.1), training.get("seed", 0),
                                           training.get("group_by"), classes=bundle.classes)
    data = bundle.check_classes(data)
    if getattr(data, attr, None) is None or not len(getattr(data, attr)):
        have = split_names(data)  # only splits it has: naming a missing one again sends the user round
        raise ImgclsError(f"the data has no '{name}' split",
                          f"it has {', '.join(have)}: use --split {' or '.join(have)}" if have else "give data with images")
    part, skipped = decode_split(data, attr, bundle.preprocessing, strict=strict, cache=cache, announce=announce)
    return data, name, part, skipped


def split_names(data: ImageData) -> list[str]:
    """The splits ``data`` holds images in, of train, val and test (as loaded: a validation
    split held out of train is among them once it has been held out)."""
    return [s for s in ("train", "val", "test") if getattr(data, s, None) is not None and len(getattr(data, s))]


def ood_split(bundle: ModelBundle, data: Any, announce: bool = True) -> tuple[str, Split]:
    """Other data to tell apart from the model's (``evaluate --ood``): a data set's test split,
    else all of it, whatever its classes (even one, or none: an .npz without labels, a folder
    of loose images, arrays), decoded for the model; unreadable files are left out."""
    try:
        found, _, attr = evaluation_data(data, None)
    except ImgclsError:
        found, attr = _unlabelled(data, bundle), "test"
    part, _ = decode_split(found, attr, bundle.preprocessing, cache=True, announce=announce)
    if not len(part):
        raise ImgclsError(f"--ood {data} holds no readable images", "give a folder, .npz or dataset name with images")
    return found.name, part


def _unlabelled(data: Any, bundle: ModelBundle) -> ImageData:
    name = Path(str(data)).stem if isinstance(data, (str, Path)) else "ood"
    if isinstance(data, (str, Path)) and str(data).endswith(".npz") and Path(data).is_file():
        with np.load(data, allow_pickle=False) as arrays:
            key = "x_test" if "x_test" in arrays else "x_train" if "x_train" in arrays else None
            if key is None:
                raise ImgclsError(f"{data} has no x_test or x_train array", "save the images as x_test")
            data = arrays[key]
    split, _ = as_split(data, bundle.preprocessing)
    return ImageData(classes=["?", "?"], train=None, test=split, name=name)
