"""Inference backends behind one interface, and the choice between them.

A backend turns a uint8 batch ``(N, C, H, W)`` (what every loader yields) into float32
logits ``(N, K)``. ``torch`` runs the Classifier's own module (bf16 autocast where the
hardware is fast at it); ``onnx`` runs an exported ``model.onnx`` (or ``model.int8.onnx``)
with ONNX Runtime. ``auto`` takes ONNX Runtime on a CPU when the run folder holds an
export made from the very same weights (checked by sha256) that passed its parity check,
because it measured faster there (docs/bench-deploy.md); on a GPU it keeps torch.

Decoding overlaps compute: image files are decoded by DataLoader worker processes
(imgcls.data.loaders.Batches) while the backend works on the previous batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from imgcls.data.loaders import Batches
from imgcls.data.records import Split
from imgcls.data.transforms import Preprocessing
from imgcls.engine.device import autocast, resolve_device, resolve_precision
from imgcls.errors import ImgclsError

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")  # onnx-int8: the run's model.int8.onnx
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"


class TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module, pre: Preprocessing, device: str = "auto",
                 precision: str = "auto"):
        self.device = resolve_device(device)
        self.amp = resolve_precision(precision, self.device)
        self.channels_last = self.device.type != "mps"
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.pre = pre

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        x = self.pre.normalize(x.to(self.device, non_blocking=self.device.type == "cuda"), self.channels_last)
        with autocast(self.device, self.amp):
            out = self.model(x)
        return out.float().cpu().numpy()

    def close(self) -> None:
        # hand the module back as the Classifier expects it: on the CPU, contiguous
        self.model.to("cpu").to(memory_format=torch.contiguous_format)


def ort_session(path: str | Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImgclsError("the onnx backend needs onnxruntime", "pip install 'imgcls[export]'") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # warnings about unused initialisers etc. are noise for users
    # ORT's worker threads spin after each run by default; between runs this process decodes and
    # normalises the next batch, and spinning threads steal those cores (measured: ~1.3x slower
    # end to end on 2 cores, docs/bench-deploy.md)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (InvalidGraph, NoSuchFile, ...)
        raise ImgclsError(f"ONNX Runtime cannot load {path}: {exc}".splitlines()[0],
                          "re-export it with `imgcls export RUN`") from None


def normalize_numpy(x: torch.Tensor, pre: Preprocessing) -> np.ndarray:
    """uint8 (N, C, S, S) -> normalised float32, as Preprocessing.normalize does, in one
    multiply-add per pixel on numpy (hand-written: ~4x faster than the torch ops on small
    batches, and it leaves torch's thread pool idle while ONNX Runtime works). Other
    shapes or channel counts go through Preprocessing.normalize."""
    if x.dtype != torch.uint8 or x.shape[1] != pre.in_chans or tuple(x.shape[-2:]) != (pre.img_size, pre.img_size):
        return pre.normalize(x).numpy()
    std = np.asarray(pre.std, dtype=np.float32).reshape(1, -1, 1, 1)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    y = x.numpy().astype(np.float32)
    y *= 1.0 / (255.0 * std)
    y -= mean / std
    return y


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: str | Path, pre: Preprocessing, threads: int | None = None):
        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.pre = pre

    def logits(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: normalize_numpy(x, self.pre)})[0]

    def close(self) -> None:
        pass


def usable_export(run_dir: str | Path | None, weights_sha256: str | None, int8: bool = False) -> Path | None:
    """The run's ONNX export if it exists, was made from these weights and passed parity."""
    if run_dir is None:
        return None
    from imgcls.export.metadata import read_sidecar

    path = Path(run_dir) / (ONNX_INT8_FILE if int8 else ONNX_FILE)
    if not path.is_file():
        return None
    try:
        meta = read_sidecar(path)
    except ImgclsError:
        return None
    if weights_sha256 and meta.get("source_weights_sha256") != weights_sha256:
        return None
    return path if meta.get("parity", {}).get("passed") else None


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(clf, backend: str = "auto", device: str = "auto", precision: str = "auto"):
    """The backend for a Classifier (``clf.path`` is its run folder when it was loaded)."""
    if backend not in BACKENDS:
        raise ImgclsError(f"unknown backend '{backend}'", "use auto, torch, onnx or onnx-int8")
    int8 = backend == "onnx-int8"
    run_dir = getattr(clf, "path", None)
    sha = clf.card.get("weights_sha256")
    if backend == "torch":
        return TorchBackend(clf.model, clf.preprocessing, device, precision)
    export = usable_export(run_dir, sha, int8) if _onnxruntime_available() else None
    if backend in ("onnx", "onnx-int8"):
        if export is None:
            name = ONNX_INT8_FILE if int8 else ONNX_FILE
            raise ImgclsError(f"no up-to-date {name} in {run_dir or 'this model'}",
                              f"export it first: imgcls export {run_dir or 'RUN'} --format onnx"
                              + (" --int8" if int8 else ""))
        return OnnxBackend(export, clf.preprocessing)
    # auto: torch on accelerators; ONNX Runtime on a CPU when a matching export exists
    if export is not None and resolve_device(device).type == "cpu":
        return OnnxBackend(export, clf.preprocessing)
    return TorchBackend(clf.model, clf.preprocessing, device, precision)


def split_batches(split: Split, pre: Preprocessing, batch_size: int, workers: int | None = None,
                  pin_memory: bool = False, skipped: dict[int, str] | None = None) -> Batches:
    """Eval-order batches of uint8 images; files are decoded in worker processes (files
    that fail: an error, or recorded in ``skipped``, see :class:`Batches`)."""
    if split.in_memory:
        return Batches(split, batch_size, pin_memory=pin_memory)
    return Batches(split, batch_size, transform=pre.pil_transform(), channels=pre.in_chans, size=pre.img_size,
                   workers=workers, pin_memory=pin_memory, skipped=skipped)


def run_backend(backend, batches: Batches, on_batch: Callable[[int], None] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch, in order."""
    outs, labels = [], []
    for x, y in batches:
        outs.append(backend.logits(x))
        labels.append(y.numpy())
        if on_batch is not None:
            on_batch(len(y))
    if not outs:
        return np.empty((0, 0), np.float32), np.empty(0, np.int64)
    return np.concatenate(outs), np.concatenate(labels)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def backend_proba(clf, split: Split, backend: str = "auto", batch_size: int = 64, device: str = "auto",
                  precision: str = "auto", workers: int | None = None, progress: bool = False,
                  skipped: dict[int, str] | None = None) -> np.ndarray:
    """Class probabilities for a Split through the chosen backend (Classifier.predict_proba
    delegates here for any backend other than plain torch). ``skipped``: see split_batches."""
    be = make_backend(clf, backend, device, precision)
    bar = task = None
    if progress and len(split) > 4 * batch_size:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(transient=True, console=Console(stderr=True))
        task = bar.add_task(f"predicting ({be.name})", total=len(split))
        bar.start()
    try:
        pin = isinstance(be, TorchBackend) and be.device.type == "cuda"
        logits, _ = run_backend(be, split_batches(split, clf.preprocessing, batch_size, workers, pin, skipped),
                                (lambda n: bar.advance(task, n)) if bar else None)
    finally:
        if bar is not None:
            bar.stop()
        be.close()
    return softmax(logits, clf.temperature)
