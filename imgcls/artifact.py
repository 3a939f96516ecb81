"""Saved models: ``model.safetensors`` (weights) + ``model.json`` (the model card).

Loading reads JSON and safetensors only: nothing is unpickled. The card records the
sha256 of the weights file and loading checks it, so a truncated or altered file is
refused instead of producing silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file

from imgcls.data.download import sha256sum
from imgcls.errors import ImgclsError

WEIGHTS = "model.safetensors"
CARD = "model.json"
FORMAT = "imgcls-model"
FORMAT_VERSION = 1
REQUIRED = ("architecture", "num_classes", "classes", "preprocessing")
SIDECAR_SUFFIX = ".json"  # an export's description beside it: model.onnx -> model.onnx.json
TTA_MODES = ("none", "flip", "flip-shift")  # a card's 'tta' (engine/tta.py defines each view)


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder + fsync + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path, hint: str) -> Any:
    """Parse a JSON file; anything unparsable is one ImgclsError naming the file and ``hint``."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImgclsError(f"{path} is not valid JSON ({exc})", hint) from None


def save_model(folder: str | Path, model: torch.nn.Module, card: dict[str, Any]) -> dict[str, Any]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    card = {"format": FORMAT, "format_version": FORMAT_VERSION, **card,
            "weights_file": WEIGHTS, "weights_sha256": sha256sum(folder / WEIGHTS)}
    atomic_write(folder / CARD, lambda p: Path(p).write_text(json.dumps(card, indent=2) + "\n"))
    return card


def read_card(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.exists():
        raise ImgclsError(f"run folder not found: {folder}", "give the folder `imgcls train` printed, e.g. runs/train")
    path = folder / CARD if folder.is_dir() else folder
    if not path.is_file():
        raise ImgclsError(f"{folder} has no trained model ({CARD} is missing)",
                          "train one first with `imgcls train`, or give the run folder it printed")
    card = read_json(path, "the model card is damaged; retrain or restore it")
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ImgclsError(f"{path} is not an imgcls model card", "give a run folder written by `imgcls train`")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ImgclsError(f"{path} lacks '{missing[0]}'", "the model card is incomplete; retrain or restore it")
    version = card.get("format_version", 0)
    if not _is_int(version):
        raise ImgclsError(f"{path} has an invalid format_version {version!r}", "the model card is damaged; retrain or "
                          "restore it")
    if version > FORMAT_VERSION:
        raise ImgclsError(f"{path} was written by a newer imgcls (format {card['format_version']})",
                          "upgrade imgcls to load it")
    problem = _card_problem(card)
    if problem:
        raise ImgclsError(f"{path} is invalid: {problem}", "the model card is damaged; retrain or restore it")
    return card


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v and abs(v) != float("inf")


def _card_problem(card: dict[str, Any]) -> str | None:
    """The first field whose type or value cannot be used to rebuild the model, if any:
    the card is the only input a model folder gives, so it is checked before any use."""
    if not isinstance(card["architecture"], str) or not card["architecture"]:
        return "'architecture' must be a model name"
    n, classes = card["num_classes"], card["classes"]
    if not _is_int(n) or n < 1:
        return "'num_classes' must be a positive integer"
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) != n:
        return f"'classes' must be a list of {n} names"
    pre = card["preprocessing"]
    if not isinstance(pre, dict):
        return "'preprocessing' must be a mapping"
    if not _is_int(pre.get("img_size")) or not 1 <= pre["img_size"] <= 8192:
        return "'preprocessing.img_size' must be an integer in [1, 8192]"
    if pre.get("in_chans") not in (1, 3) or isinstance(pre.get("in_chans"), bool):
        return "'preprocessing.in_chans' must be 1 or 3"
    for key in ("mean", "std"):
        v = pre.get(key)
        if not isinstance(v, list) or len(v) != pre["in_chans"] or not all(_is_num(x) for x in v):
            return f"'preprocessing.{key}' must be a list of {pre['in_chans']} numbers"
    if any(x <= 0 for x in pre["std"]):
        return "'preprocessing.std' must be positive"
    if not isinstance(pre.get("resize", "squash"), str):
        return "'preprocessing.resize' must be a resize mode name"
    crop = pre.get("crop_pct", 1.0)
    if not _is_num(crop) or not 0 < crop <= 1:
        return "'preprocessing.crop_pct' must be in (0, 1]"
    from torchvision.transforms import InterpolationMode

    interp = pre.get("interpolation", "bilinear")
    if not isinstance(interp, str) or interp not in {m.value for m in InterpolationMode}:
        return "'preprocessing.interpolation' is not a known interpolation"
    for key, typ in (("model_kwargs", dict), ("weights_file", str), ("weights_sha256", str)):
        if key in card and not isinstance(card[key], typ):
            return f"'{key}' has the wrong type"
    from imgcls.models.factory import model_kwargs_problem

    problem = model_kwargs_problem(card["architecture"], card.get("model_kwargs") or {})
    if problem:  # checked here, before anything builds a model from it (see TIMM_OPTIONS)
        return f"'model_kwargs': {problem}"
    if "temperature" in card and (not _is_num(card["temperature"]) or card["temperature"] <= 0):
        return "'temperature' must be a positive number"
    if card.get("tta", "none") not in TTA_MODES:
        return f"'tta' is {repr(card['tta'])[:40]}, not one of {', '.join(TTA_MODES)}"
    return _thresholds_problem(card.get("thresholds"), classes)


def _thresholds_problem(t: Any, classes: list[str]) -> str | None:
    """A multi-label card's per-class decision thresholds: a number in [0, 1] for every class."""
    if not t:
        return None
    values = t.get("values") if isinstance(t, dict) else None
    if not isinstance(values, dict):
        return "'thresholds.values' must map each class to its threshold"
    bad = next((c for c in classes if not _is_num(values.get(c)) or not 0 <= values[c] <= 1), None)
    if bad is not None:
        return f"'thresholds.values' has no threshold in [0, 1] for class {bad[:40]!r}"
    return None


def pickle_kind(path_or_bytes: Path | bytes) -> str | None:
    """'a pickle' / 'a PyTorch (zip + pickle)' file by its first bytes, else None.
    Such files can run arbitrary code when loaded, so imgcls never opens them as models."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        head = bytes(path_or_bytes[:9])
    else:
        with open(path_or_bytes, "rb") as f:
            head = f.read(9)
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return None
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode + version
        return "a pickle"
    if head[:4] == b"PK\x03\x04":  # torch.save's zip archive holds a pickle
        return "a PyTorch zip/pickle"
    return None


def load_weights(folder: str | Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    folder = Path(folder) if Path(folder).is_dir() else Path(folder).parent
    name = card.get("weights_file", WEIGHTS)
    if not isinstance(name, str) or Path(name).name != name or not name:
        raise ImgclsError(f"{folder / CARD} names an invalid weights file {name!r}",
                          f"it must be a file name inside the run folder, e.g. {WEIGHTS}")
    wpath = folder / name
    if not wpath.is_file():
        raise ImgclsError(f"{folder} has no weights ({wpath.name} is missing)", "retrain, or restore the file")
    data = wpath.read_bytes()  # hashed and parsed from the same bytes: no swap in between
    kind = pickle_kind(data)
    if kind:
        raise ImgclsError(f"refused {wpath}: it is {kind} file, not safetensors; imgcls never unpickles model "
                          "files (loading a pickle can run arbitrary code)",
                          "save the weights as safetensors (Classifier.save / imgcls train) and load only files "
                          "from sources you trust")
    expected = card.get("weights_sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise ImgclsError(f"{folder / CARD} has no valid weights_sha256, so {wpath.name} cannot be verified",
                          "re-save the model with imgcls (Classifier.save) to record it")
    if hashlib.sha256(data).hexdigest() != expected:
        raise ImgclsError(f"{wpath} does not match the sha256 in {CARD}: it was altered or truncated",
                          "restore the original file or retrain")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ImgclsError(f"cannot read {wpath}: {exc}", "the weights file is damaged; retrain or restore it") from None


# ---------------------------------------------------------------------- export descriptions
def sidecar_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + SIDECAR_SUFFIX)


def write_sidecar(model_path: Path, meta: dict[str, Any]) -> Path:
    path = sidecar_path(model_path)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_sidecar(model_path: Path) -> dict[str, Any]:
    path = sidecar_path(Path(model_path))
    if not path.is_file():
        raise ImgclsError(f"{model_path} has no {path.name} beside it",
                          "re-export it with `imgcls export RUN`")
    meta = read_json(path, "re-export with `imgcls export RUN`")
    if not isinstance(meta, dict) or "classes" not in meta or "img_size" not in meta:
        raise ImgclsError(f"{path} is not an imgcls export description", "re-export with `imgcls export RUN`")
    return meta
