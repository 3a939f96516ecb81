"""Exported models (ONNX, int8 ONNX, TorchScript) with parity checks, and the inference
backends that run them: ``export_run(clf, "onnx", int8=True)``, ``make_backend(clf, "auto")``."""

from imgcls.export.core import EXPORTERS, ExportResult, export_run
from imgcls.export.runtime import BACKENDS, make_backend

__all__ = ["BACKENDS", "EXPORTERS", "ExportResult", "export_run", "make_backend"]
