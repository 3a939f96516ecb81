"""Exported models (ONNX, int8 ONNX, TorchScript) with parity checks:
``export_run(bundle, "onnx", int8=True)``. The backends that run them for prediction live
with the predictor (imgcls.engine.backends, imgcls.engine.predictor)."""

from imgcls.engine.backends import BACKENDS, make_backend
from imgcls.export.core import EXPORTERS, ExportResult, export_run

__all__ = ["BACKENDS", "EXPORTERS", "ExportResult", "export_run", "make_backend"]
