"""ONNX export (torch.onnx, dynamic batch dimension) and int8 static quantization
(ONNX Runtime, QDQ format, per-channel weights, calibrated on training images)."""

from __future__ import annotations

import contextlib
import io
import logging
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


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImgclsError("ONNX export needs onnx and onnxruntime", "pip install 'imgcls[export]'") from None


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warns about internals the user cannot act on."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """torch.export-based exporter first; the TorchScript-based one for models it cannot trace."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), verbose=False)
        return "torch.export"
    except Exception as first:  # exporter errors come in many types; try the older exporter
        try:
            with _quiet():
                torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                                  opset_version=min(opset, 17), dynamo=False,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            return "torchscript"
        except Exception as second:
            raise ImgclsError(f"torch.onnx cannot export this model: {type(first).__name__}: {first}"
                              .splitlines()[0], f"the TorchScript-based exporter failed too ({second})"
                              .splitlines()[0]) from None


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
    opset = opset or DEFAULT_OPSET
    model = model.eval().float().to("cpu", memory_format=torch.contiguous_format)
    if tta != "none":
        model = TTAModel(model, tta).eval()
    example = torch.randn(2, pre.in_chans, pre.img_size, pre.img_size)
    exporter = _torch_export(model, example, path, opset)
    import onnx

    return {"opset": next((o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")),
                          opset), "exporter": exporter}


class _Calibration:
    """Feeds normalised calibration batches to ONNX Runtime's calibrator."""

    def __init__(self, split: Split, pre: Preprocessing, input_name: str, batch_size: int = 32):
        from onnxruntime.quantization import CalibrationDataReader

        from imgcls.data.pipeline import eval_batches

        batches = eval_batches(split, pre, batch_size)
        self._it = ({input_name: pre.normalize(x).numpy()} for x, _ in batches)

        class Reader(CalibrationDataReader):
            def get_next(reader_self):  # noqa: N805 - ORT's interface
                return next(self._it, None)

        self.reader = Reader()


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
            quantize_static(str(prep), str(out_path), _Calibration(calib, pre, name).reader,
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"CalibTensorRangeSymmetric": False})
    return {"calibration_images": len(calib), "quantization": "static QDQ, uint8 activations, "
            "int8 per-channel weights, min/max calibration"}


def file_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3)

