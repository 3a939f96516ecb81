"""ONNX export (torch.onnx, dynamic batch dimension) and int8 static quantization
(ONNX Runtime, QDQ format, per-channel weights, calibrated on training images)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from imgcls.data.records import Split
from imgcls.data.transforms import Preprocessing
from imgcls.engine.tta import TTAModel
from imgcls.errors import ImgclsError
from imgcls.export.metadata import flat_props

DEFAULT_OPSET = 18  # the lowest opset the torch.export-based exporter emits
TORCHSCRIPT_OPSETS = (7, 20)  # what the TorchScript-based exporter writes (torch.onnx._constants)


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImgclsError("ONNX export needs onnx and onnxruntime", "pip install 'imgcls[export]'") from None


# torch.onnx logs progress and, when it cannot convert its graph to the asked opset, a warning
# with the converter's traceback (onnxscript's version converter): internals the user cannot act on
_NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warns about internals the user cannot act on."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def _native_stdout_silenced():
    """The TorchScript-based exporter prints the whole graph from C++ when it fails ("Torch IR
    graph at exception": torch's setup_onnx_logging switches its ONNX log on whatever it is
    asked), past Python's redirect_stdout: point file descriptor 1 at /dev/null meanwhile."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def written_opset(path: Path) -> int | None:
    """The default-domain opset of the ONNX file at ``path``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> str:
    """torch.export-based exporter first; the TorchScript-based one for models it cannot trace
    and for opsets it cannot write. ``opset`` None: any (18 if the first exporter works).

    Below 18 the first exporter converts its opset-18 graph down, and where the converter has
    no adapter for an operator (opset 13: Shape) it keeps opset 18 *without raising*: so the
    written file's opset is checked, and a file of another opset than asked is never kept."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=opset or DEFAULT_OPSET, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), verbose=False)
        got = written_opset(path)
        if opset is None or got == opset:
            return "torch.export"
        first = (f"the torch.export-based exporter wrote opset {got} (it writes 18 and up, and converts down only "
                 "some graphs)")
    except Exception as exc:  # exporter errors come in many types; try the older exporter
        first = f"the torch.export-based exporter failed ({_first_line(exc)})"
    lo, hi = TORCHSCRIPT_OPSETS
    ts_opset = 17 if opset is None else opset  # its default where the first exporter failed (as before)
    try:
        if not lo <= ts_opset <= hi:
            raise ValueError(f"it writes opsets {lo}-{hi} only")
        with _quiet(), _native_stdout_silenced():
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=ts_opset, dynamo=False, verbose=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        got = written_opset(path)
        if got != ts_opset:
            raise ValueError(f"it wrote opset {got}")
        return "torchscript"
    except Exception as exc:
        path.unlink(missing_ok=True)  # never leave a file of another opset, or half a file
        second = f"the TorchScript-based one failed too ({_first_line(exc)})"
        if opset is None:
            raise ImgclsError(f"torch.onnx cannot export this model: {first}", second) from None
        raise ImgclsError(f"cannot write ONNX opset {opset} for this model: {first}; {second}",
                          f"use --opset {DEFAULT_OPSET} (the default) or higher, or another opset from "
                          f"{lo} to {hi} that has this model's operators") from None


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in flat_props(meta).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "imgcls"
    model.doc_string = (f"imgcls {meta['architecture']} classifier, {meta['num_classes']} classes; "
                        "input/preprocessing/classes in metadata_props")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def export_onnx(model: torch.nn.Module, pre: Preprocessing, path: Path, opset: int | None,
                tta: str = "none") -> dict[str, Any]:
    """Write ``model`` as ONNX; with ``tta`` the graph itself averages the test-time views
    of each image (TTAModel), so the file predicts what imgcls predicts."""
    _require_onnx()
    model = model.eval().float().to("cpu", memory_format=torch.contiguous_format)
    if tta != "none":
        model = TTAModel(model, tta).eval()
    example = torch.randn(2, pre.in_chans, pre.img_size, pre.img_size)
    exporter = _torch_export(model, example, path, opset)
    return {"opset": written_opset(path), "exporter": exporter}


class _Calibration:
    """Feeds normalised calibration batches to ONNX Runtime's calibrator."""

    def __init__(self, split: Split, pre: Preprocessing, input_name: str, batch_size: int = 32):
        from onnxruntime.quantization import CalibrationDataReader

        from imgcls.data.pipeline import eval_batches

        self.batches = batches = eval_batches(split, pre, batch_size)
        self._it = ({input_name: pre.normalize(x).numpy()} for x, _ in batches)

        class Reader(CalibrationDataReader):
            def get_next(reader_self):  # noqa: N805 - ORT's interface
                return next(self._it, None)

        self.reader = Reader()

    def close(self) -> None:
        """Stop the decode workers now: left to the garbage collector, the loader could be
        collected in a worker process forked later (the parity check's), which then printed
        DataLoader's "can only test a child process" traceback."""
        self.batches.close()


def quantize_int8(fp32_path: Path, out_path: Path, calib: Split, pre: Preprocessing) -> dict[str, Any]:
    """Static int8 quantization: uint8 activations / int8 per-channel weights (the
    combination ONNX Runtime recommends for x86 CPUs with VNNI/AMX), ranges from
    min/max over the calibration images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="imgcls-quant-") as tmp:
        prep = Path(tmp) / "prep.onnx"
        with _quiet():
            quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
            import onnxruntime as ort

            name = ort.InferenceSession(str(prep), providers=["CPUExecutionProvider"]).get_inputs()[0].name
            calibration = _Calibration(calib, pre, name)
            try:
                quantize_static(str(prep), str(out_path), calibration.reader,
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                                extra_options={"CalibTensorRangeSymmetric": False})
            finally:
                calibration.close()
    return {"calibration_images": len(calib), "quantization": "static QDQ, uint8 activations, "
            "int8 per-channel weights, min/max calibration"}


def file_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3)

