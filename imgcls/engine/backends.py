"""Inference backends: a uint8 batch ``(N, C, H, W)`` (what every loader yields) in,
float32 logits ``(N, K)`` out, test-time augmentation included.

``torch`` runs the bundle's own module (bf16 autocast where the hardware is fast at it)
through :func:`~imgcls.engine.tta.tta_forward`; ``onnx`` runs an exported ``model.onnx``
(or ``model.int8.onnx``) with ONNX Runtime, whose graph averages its own TTA views (the
export wraps the network in :class:`~imgcls.engine.tta.TTAModel`). ``auto`` takes ONNX
Runtime on a CPU when the run folder holds an export made from the very same weights
(checked by sha256, in the description beside it and in the file's own metadata) with the
same TTA, temperature and thresholds that passed its parity check, because it measured
faster there (docs/bench-deploy.md); on a GPU it keeps torch.

Used only through :class:`imgcls.engine.predictor.Predictor`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch

from imgcls.artifact import read_sidecar
from imgcls.bundle import ModelBundle
from imgcls.data.transforms import Preprocessing
from imgcls.engine.device import autocast, chunked, resolve_device, resolve_precision
from imgcls.engine.tta import tta_forward
from imgcls.errors import ImgclsError

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")  # onnx-int8: the run's model.int8.onnx
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"


class TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module, pre: Preprocessing, device: str | torch.device = "auto",
                 precision: str = "auto", tta: str = "none"):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.amp = resolve_precision(precision, self.device)
        self.channels_last = self.device.type != "mps"
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.pre, self.tta = pre, tta

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        x = self.pre.normalize(x.to(self.device, non_blocking=self.device.type == "cuda"), self.channels_last)
        with autocast(self.device, self.amp):
            out = self._forward(self.model, x)
        return out.float().cpu().numpy()

    def _forward(self, net, x: torch.Tensor) -> torch.Tensor:
        # chunked on a CPU: large batches of large images are slower there (engine/device.py)
        return chunked(partial(tta_forward, net, tta=self.tta), x, self.device)

    @torch.inference_mode()
    def outputs(self, x: torch.Tensor, layers: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Logits and penultimate features (timm's ``forward_head(pre_logits=True)``) of one
        batch, from the same forward pass; with TTA both are averaged over the same views.
        ``layers``: the features are followed by the block statistics of the same pass
        (engine/layer_stats.py), ``[penultimate | statistics]``."""
        x = self.pre.normalize(x.to(self.device, non_blocking=self.device.type == "cuda"), self.channels_last)
        net = partial(features_and_logits, self.model)
        if layers:
            from imgcls.engine.layer_stats import LayerStats

            hooks = LayerStats(self.model)
            net = partial(_with_stats, net, hooks)
            with hooks, autocast(self.device, self.amp):
                out = self._forward(net, x).float().cpu().numpy()
            nf = self.num_features
            k = out.shape[1] - nf - sum(2 * m.out_channels for m in hooks.layers)
            return out[:, nf:nf + k], np.concatenate([out[:, :nf], out[:, nf + k:]], 1)
        with autocast(self.device, self.amp):
            out = self._forward(net, x).float().cpu().numpy()
        nf = self.num_features
        return out[:, nf:], out[:, :nf]

    @property
    def num_features(self) -> int:
        if not hasattr(self, "_num_features"):
            self._num_features = _probe_features(self.model, self.pre, self.device)
        return self._num_features

    def close(self) -> None:
        # hand the module back as the bundle expects it: on the CPU, contiguous
        self.model.to("cpu").to(memory_format=torch.contiguous_format)


def _with_stats(net, hooks, x: torch.Tensor) -> torch.Tensor:
    """``[penultimate | logits | block statistics]`` of one view, so TTA averages all three."""
    out = net(x)
    return torch.cat([out, hooks.take()], 1) if hooks.layers else out  # no convolution: kNN alone


def features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[penultimate features | logits]`` side by side, so TTA averages both at once."""
    f = model.forward_features(x)
    return torch.cat([model.forward_head(f, pre_logits=True).flatten(1).float(), model.forward_head(f).float()], 1)


@torch.inference_mode()
def _probe_features(model: torch.nn.Module, pre: Preprocessing, device: torch.device) -> int:
    x = torch.zeros(1, pre.in_chans, pre.img_size, pre.img_size, device=device)
    return int(model.forward_head(model.forward_features(x), pre_logits=True).flatten(1).shape[1])


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
    """An exported graph; its TTA (recorded in the description beside it) is inside it."""

    name = "onnx"

    def __init__(self, path: str | Path, pre: Preprocessing, threads: int | None = None):
        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.pre = pre

    @property
    def metadata(self) -> dict[str, str]:
        """The file's own metadata_props (what the export wrote into it), as ONNX Runtime read them."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def logits(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: normalize_numpy(x, self.pre)})[0]

    def outputs(self, x: torch.Tensor, layers: bool = False) -> tuple[np.ndarray, np.ndarray]:
        raise ImgclsError(f"{self.path.name} gives logits only, and this model's unknown score (knn, layers, "
                          "mahalanobis, react or vim) needs the network's penultimate features",
                          "use --backend torch, or recalibrate with "
                          "`imgcls calibrate RUN --data DATA --ood-method energy`")

    def close(self) -> None:
        pass


def _export_file(bundle: ModelBundle, int8: bool) -> Path | None:
    if bundle.path is None:
        return None
    path = Path(bundle.path) / (ONNX_INT8_FILE if int8 else ONNX_FILE)
    return path if path.is_file() else None


def usable_export(bundle: ModelBundle, int8: bool = False) -> Path | None:
    """The run's ONNX export if it exists and :func:`export_problem` finds nothing stale in it."""
    path = _export_file(bundle, int8)
    return path if path is not None and export_problem(bundle, path) is None else None


def export_problem(bundle: ModelBundle, path: Path, props: Mapping[str, str] | None = None) -> str | None:
    """Why the export at ``path`` no longer describes ``bundle`` (None: it does): other weights
    (sha256), another TTA (an export made before TTA was part of the graph is stale), a
    temperature or multi-label thresholds that ``imgcls calibrate`` / ``imgcls thresholds``
    have changed since (a consumer of the export applies them from its metadata), a failed
    parity check - all from the description beside it - or an ONNX file whose own metadata
    (``props``, else read from the file) names other weights: another export copied over it."""
    problem = _description_problem(bundle, path)
    if problem is None and (props is not None or path.is_file()):
        problem = file_problem(bundle, props if props is not None else _file_props(path))
    return problem


def _description_problem(bundle: ModelBundle, path: Path) -> str | None:
    try:
        meta = read_sidecar(path)
    except ImgclsError:
        return "it has no readable description beside it"
    sha = bundle.card.get("weights_sha256")
    if sha and meta.get("source_weights_sha256") != sha:
        return "it was made from other weights"
    if meta.get("tta", "none") != bundle.tta:
        return f"it was made with tta {meta.get('tta', 'none')!r}, model.json has {bundle.tta!r}"
    t = meta.get("temperature", 1.0)
    if not isinstance(t, (int, float)) or abs(float(t) - bundle.temperature) > 1e-6:
        return f"it carries temperature {t}, model.json has {bundle.temperature:g}"
    if bundle.multi_label and meta.get("thresholds") != dict(zip(bundle.classes, bundle.thresholds or
                                                                 [0.5] * bundle.num_classes)):
        return "its per-class thresholds are not model.json's"
    return None if meta.get("parity", {}).get("passed") else "it did not pass its parity check"


def file_problem(bundle: ModelBundle, props: Mapping[str, str] | None) -> str | None:
    """What the ONNX file's own metadata (written into it by ``imgcls export``) says against
    ``bundle``: the description beside a file says nothing of a file copied over it since.
    ``props`` None: the file has none that can be read (onnx is not installed: not checked)."""
    if props is None:
        return None
    sha = bundle.card.get("weights_sha256")
    if sha and props.get("source_weights_sha256") != sha:
        return ("the file itself was made from other weights than its description says, e.g. another export "
                "copied over it")
    if props.get("tta", "none") != bundle.tta:
        return f"the file itself was made with tta {props.get('tta', 'none')!r}, model.json has {bundle.tta!r}"
    return None


def _file_props(path: Path) -> dict[str, str] | None:
    """metadata_props of the ONNX file, read without its external data (nothing is run)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # not a readable ONNX file: it describes nothing
        return {}


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _no_export(bundle: ModelBundle, int8: bool, problem: str | None = None) -> ImgclsError:
    """The refusal of --backend onnx / onnx-int8 without a usable export, saying why a present one is stale."""
    name, where = ONNX_INT8_FILE if int8 else ONNX_FILE, bundle.path or "RUN"
    return ImgclsError(f"no up-to-date {name} in {bundle.path or 'this model'}" + (f" ({problem})" if problem else ""),
                       f"export it first: imgcls export {where} --format onnx" + (" --int8" if int8 else ""))


def make_backend(bundle: ModelBundle, backend: str = "auto", device: str = "auto", precision: str = "auto"):
    """The backend for a bundle (``bundle.path`` is its run folder when it was loaded)."""
    if backend not in BACKENDS:
        raise ImgclsError(f"unknown backend '{backend}'", "use auto, torch, onnx or onnx-int8")
    int8 = backend == "onnx-int8"
    if backend == "torch":
        return TorchBackend(bundle.model, bundle.preprocessing, device, precision, bundle.tta)
    export = _export_file(bundle, int8) if _onnxruntime_available() else None
    problem = _description_problem(bundle, export) if export is not None else None
    # the file's own metadata is checked once its session is built: ONNX Runtime has read it
    # then, so the check costs nothing at start-up
    if backend in ("onnx", "onnx-int8"):
        if export is None or problem is not None:
            raise _no_export(bundle, int8, problem)
        onnx_backend = OnnxBackend(export, bundle.preprocessing)
        problem = file_problem(bundle, onnx_backend.metadata)
        if problem is not None:
            raise _no_export(bundle, int8, problem)
        return onnx_backend
    # auto: torch on accelerators; ONNX Runtime on a CPU when a matching export exists
    if export is not None and problem is None and resolve_device(device).type == "cpu":
        onnx_backend = OnnxBackend(export, bundle.preprocessing)
        if file_problem(bundle, onnx_backend.metadata) is None:
            return onnx_backend
    return TorchBackend(bundle.model, bundle.preprocessing, device, precision, bundle.tta)
