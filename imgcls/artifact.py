"""Saved models: ``model.safetensors`` (weights) + ``model.json`` (the model card).

Loading reads JSON and safetensors only: nothing is unpickled. The card records the
sha256 of the weights file and loading checks it, so a truncated or altered file is
refused instead of producing silent garbage.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from imgcls.data.download import sha256sum
from imgcls.errors import ImgclsError

WEIGHTS = "model.safetensors"
CARD = "model.json"
FORMAT = "imgcls-model"
FORMAT_VERSION = 1
REQUIRED = ("architecture", "num_classes", "classes", "preprocessing")


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder + fsync + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImgclsError(f"{path} is not valid JSON ({exc})", "the model card is damaged; retrain or restore it") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ImgclsError(f"{path} is not an imgcls model card", "give a run folder written by `imgcls train`")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ImgclsError(f"{path} lacks '{missing[0]}'", "the model card is incomplete; retrain or restore it")
    if int(card.get("format_version", 0)) > FORMAT_VERSION:
        raise ImgclsError(f"{path} was written by a newer imgcls (format {card['format_version']})",
                          "upgrade imgcls to load it")
    return card


def load_weights(folder: str | Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    folder = Path(folder) if Path(folder).is_dir() else Path(folder).parent
    wpath = folder / card.get("weights_file", WEIGHTS)
    if not wpath.is_file():
        raise ImgclsError(f"{folder} has no weights ({wpath.name} is missing)", "retrain, or restore the file")
    expected = card.get("weights_sha256")
    if expected and sha256sum(wpath) != expected:
        raise ImgclsError(f"{wpath} does not match the sha256 in {CARD}: it was altered or truncated",
                          "restore the original file or retrain")
    try:
        return load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ImgclsError(f"cannot read {wpath}: {exc}", "the weights file is damaged; retrain or restore it") from None
