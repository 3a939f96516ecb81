"""``export_run``: write an exported model, check it against PyTorch, describe it.

One registry entry per format; each writes the file and returns a backend that can run it
for the parity check. The run's test-time augmentation is written into the graph, and the
check compares it with PyTorch running the same TTA: like with like. Anything that is an
``nn.Module`` taking ``(N, C, H, W)`` float images and returning ``(N, K)`` logits exports:
reference_cnn, timm models and layer-list models alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.bundle import ModelBundle
from imgcls.engine.backends import ONNX_FILE, ONNX_INT8_FILE, OnnxBackend
from imgcls.engine.predictor import Predictor
from imgcls.errors import ImgclsError
from imgcls.export import parity
from imgcls.export.metadata import export_metadata, sidecar_path, write_sidecar
from imgcls.registry import Registry

EXPORTERS: Registry = Registry("export format")
DEFAULT_PARITY_IMAGES = 2000
DEFAULT_CALIB_IMAGES = 256
INT8_MIN_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) is opset 13's


@dataclass
class ExportResult:
    path: Path
    meta: dict[str, Any]
    sidecar: Path


@EXPORTERS.register("onnx")
def _onnx(clf: ModelBundle, path: Path, opset: int | None, meta: dict[str, Any]):
    from imgcls.export.onnx import export_onnx, write_metadata

    meta.update(export_onnx(clf.model, clf.preprocessing, path, opset, tta=clf.tta))
    write_metadata(path, meta)
    return OnnxBackend(path, clf.preprocessing)


@EXPORTERS.register("torchscript")
def _torchscript(clf: ModelBundle, path: Path, opset: int | None, meta: dict[str, Any]):
    from imgcls.export.torchscript import TorchScriptBackend, export_torchscript

    if opset is not None:
        raise ImgclsError("--opset is for --format onnx", "drop --opset for TorchScript")
    meta.update(export_torchscript(clf.model, clf.preprocessing, path, meta, tta=clf.tta))
    return TorchScriptBackend(path, clf.preprocessing)


DEFAULT_NAMES = {"onnx": ONNX_FILE, "torchscript": "model.torchscript.pt"}


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def export_run(clf: ModelBundle, fmt: str = "onnx", out: str | Path | None = None, *, int8: bool = False,
               opset: int | None = None, data: str | None = None, max_drop: float = 1.0,
               parity_images: int | None = DEFAULT_PARITY_IMAGES, calib_images: int = DEFAULT_CALIB_IMAGES,
               log=print) -> list[ExportResult]:
    """Export ``clf`` (loaded from a run folder) and check parity; with ``int8`` also write a
    statically quantized model and refuse it when accuracy drops by more than ``max_drop``
    points. Returns the written files (fp32 first)."""
    write = EXPORTERS.get(fmt)
    if int8 and fmt != "onnx":
        raise ImgclsError("--int8 is for --format onnx", "use --format onnx --int8")
    if int8 and opset is not None and opset < INT8_MIN_OPSET:  # ORT wrote an invalid int8 graph below it
        raise ImgclsError(f"--int8 needs --opset {INT8_MIN_OPSET} or higher (per-channel int8 weights), "
                          f"not {opset}", f"drop --opset, or export --opset {opset} without --int8")
    run_dir = Path(clf.path) if getattr(clf, "path", None) else None
    out_dir = Path(out) if out else run_dir
    if out_dir is None:
        raise ImgclsError("no output folder", "pass --out FOLDER")
    out_dir.mkdir(parents=True, exist_ok=True)

    data_set = parity.load_run_data(clf, data)  # relabelled to the model's class order
    split_name, full = parity.check_split(data_set)
    check = parity.sample(full, parity_images)
    log(f"parity data: {data_set.name} {split_name} split, {len(check)} of {len(full)} images")
    ref_logits, labels = parity.reference_logits(clf, check)

    path = out_dir / DEFAULT_NAMES[fmt]
    meta = export_metadata(clf, fmt, "fp32")
    with Predictor.over(clf, write(clf, path, opset, meta)) as exported:
        logits, _ = exported.run(check)
    report = parity.compare(ref_logits, logits, labels, clf.temperature, clf.decision_thresholds())
    report["split"], report["min_agreement"] = split_name, parity.MIN_AGREEMENT
    report["passed"] = report["top1_agreement"] >= parity.MIN_AGREEMENT
    meta["parity"] = report
    what = "label-set" if clf.multi_label else "top-1"
    log(f"{path.name}: {what} agreement with PyTorch {report['top1_agreement']:.2%} on {report['images']} images, "
        f"max probability difference {report['max_prob_diff']:.2g}")
    if not report["passed"]:
        _discard(path, sidecar_path(path))
        raise ImgclsError(f"{path.name} agrees with PyTorch on only {report['top1_agreement']:.2%} of the images "
                          f"(needs {parity.MIN_AGREEMENT:.1%}); the export was removed",
                          "report this model as an export bug; try --format torchscript or another --opset")
    if fmt == "onnx":
        from imgcls.export.onnx import write_metadata

        write_metadata(path, meta)  # again, now with the parity result inside
    results = [ExportResult(path, meta, write_sidecar(path, meta))]
    if int8:
        results.append(_int8(clf, path, out_dir, data_set, check, ref_logits, labels, max_drop, calib_images, log))
    return results


def _int8(clf: ModelBundle, fp32_path: Path, out_dir: Path, data_set, check, ref_logits, labels, max_drop: float,
          calib_images: int, log) -> ExportResult:
    from imgcls.export.onnx import quantize_int8, write_metadata

    # calibrate on training images, never on the images the accuracy is checked on
    calib = parity.sample(data_set.train, calib_images, seed=1) if data_set.train is not None else check
    path = out_dir / ONNX_INT8_FILE
    meta = export_metadata(clf, "onnx", "int8")
    meta.update({k: v for k, v in _read_fp32_meta(fp32_path).items() if k in ("opset", "exporter")})
    meta.update(quantize_int8(fp32_path, path, calib, clf.preprocessing))
    with Predictor.over(clf, OnnxBackend(path, clf.preprocessing)) as exported:
        logits, _ = exported.run(check)
    report = parity.compare(ref_logits, logits, labels, clf.temperature, clf.decision_thresholds())
    drop = -report["accuracy_change_points"]
    report.update({"max_drop_points": max_drop, "passed": drop <= max_drop})
    meta["parity"] = report
    log(f"{path.name}: accuracy {report['accuracy_export']:.2%} vs {report['accuracy_torch']:.2%} in fp32 "
        f"({report['accuracy_change_points']:+.2f} points), top-1 agreement {report['top1_agreement']:.2%}, "
        f"max probability difference {report['max_prob_diff']:.2g}")
    if not report["passed"]:
        _discard(path, sidecar_path(path))
        raise ImgclsError(f"int8 loses {drop:.2f} accuracy points (more than --max-drop {max_drop:g}); "
                          f"{path.name} was not kept", "use the fp32 export, raise --max-drop, or calibrate on "
                          "more images with --calib-images")
    write_metadata(path, meta)
    return ExportResult(path, meta, write_sidecar(path, meta))


def _read_fp32_meta(path: Path) -> dict[str, Any]:
    from imgcls.export.metadata import read_sidecar

    try:
        return read_sidecar(path)
    except ImgclsError:
        return {}
