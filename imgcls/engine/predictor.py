"""The one predictor: every prediction - ``Classifier.predict`` / ``evaluate``, ``imgcls
predict``, the web service, the export parity check - goes through a :class:`Predictor`,
so they cannot disagree.

It owns the backend (torch, ONNX fp32, ONNX int8: engine/backends.py), test-time
augmentation (inside every backend: torch runs the views, an ONNX graph contains them),
the calibration temperature, batching from the data pipeline and the progress bar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from imgcls.bundle import ModelBundle
from imgcls.data.pipeline import decode_split, eval_batches, evaluation_data
from imgcls.data.records import ImageData
from imgcls.data.records import Split
from imgcls.engine.backends import TorchBackend, make_backend
from imgcls.engine.multilabel import sigmoid
from imgcls.errors import ImgclsError


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def iter_backend(backend, batches, on_batch: Callable[[int], None] | None = None):
    """Logits and labels of each batch, in order, one batch at a time (memory stays flat)."""
    for x, y in batches:
        out = backend.logits(x)
        if on_batch is not None:
            on_batch(len(y))
        yield out, y.numpy()


def run_backend(backend, batches, on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch, in order."""
    outs, labels = [], []
    for out, y in iter_backend(backend, batches, on_batch):
        outs.append(out)
        labels.append(y)
    if not outs:
        return np.empty((0, 0), np.float32), np.empty(0, np.int64)
    return np.concatenate(outs), np.concatenate(labels)


class Predictor:
    """``Predictor(bundle, backend="auto")``; ``logits(x)`` for one uint8 batch,
    ``run(split)`` for a whole split, ``probabilities(logits)`` calibrated. Use it as a
    context manager (or call ``close``) to hand the model back to the CPU."""

    def __init__(self, bundle: ModelBundle, backend: str = "torch", device: str = "auto", precision: str = "auto",
                 batch_size: int = 256, workers: int | None = None, _backend=None):
        self.bundle = bundle
        self.backend = _backend if _backend is not None else make_backend(bundle, backend, device, precision)
        self.batch_size, self.workers = batch_size, workers

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

    def run(self, split: Split, progress: bool = False,
            skipped: dict[int, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of every image of ``split``, in order. Unreadable files: an
        error, or recorded in ``skipped`` (index -> reason; their rows are meaningless)."""
        batches = eval_batches(split, self.bundle.preprocessing, self.batch_size, workers=self.workers,
                               device=self.device, skipped=skipped)
        if not progress or len(split) <= 4 * self.batch_size:
            return run_backend(self.backend, batches)
        from rich.console import Console
        from rich.progress import Progress

        with Progress(transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task(f"predicting ({self.name})", total=len(split))
            return run_backend(self.backend, batches, lambda n: bar.advance(task, n))

    def run_features(self, split: Split, skipped: dict[int, str] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and penultimate features of every image of ``split`` (torch backend, one
        view): what diversity-based ranking (imgcls rank --strategy coreset) needs."""
        fn = getattr(self.backend, "logits_and_features", None)
        if fn is None:
            raise ImgclsError(f"the {self.name} backend gives no features", "use the torch backend")
        batches = eval_batches(split, self.bundle.preprocessing, self.batch_size, workers=self.workers,
                               device=self.device, skipped=skipped)
        outs = [fn(x) for x, _ in batches]
        if not outs:
            return np.empty((0, 0), np.float32), np.empty((0, 0), np.float32)
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def stream(self, split: Split, skipped: dict[int, str] | None = None, on_batch: Callable[[int], None] | None = None,
               on_sources: Callable[[list[str]], None] | None = None, shard: tuple[int, int] | None = None):
        """``(logits, labels)`` of each batch of ``split``, in order, as they are computed:
        what a job over millions of images (engine/batch_predict.py) consumes without
        holding them. ``on_sources``: a streamed split's source names per batch; ``shard``:
        (rank, world), read only this process's share."""
        batches = eval_batches(split, self.bundle.preprocessing, self.batch_size, workers=self.workers,
                               device=self.device, skipped=skipped)
        if shard is not None:
            batches.shard(*shard, even=False)
        if on_sources is not None:
            batches.on_sources = on_sources
        return iter_backend(self.backend, batches, on_batch)

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
    data, name, attr = evaluation_data(data, split, training.get("val_split", 0.1), training.get("seed", 0),
                                         training.get("group_by"))
    data = bundle.check_classes(data)
    if getattr(data, attr, None) is None or not len(getattr(data, attr)):
        raise ImgclsError(f"the data has no '{name}' split", "use --split train, val or test")
    part, skipped = decode_split(data, attr, bundle.preprocessing, strict=strict, cache=cache, announce=announce)
    return data, name, part, skipped
