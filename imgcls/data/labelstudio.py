"""Label Studio JSON, both ways, for image-classification projects (``<Choices>`` over an
``<Image>``), in the formats Label Studio documents:

* import (what ``imgcls rank`` writes): a JSON list of tasks
  ``{"data": {"image": URL, ...}, "predictions": [{"model_version", "score", "result": [
  {"id", "type": "choices", "from_name": "choice", "to_name": "image", "value": {"choices": [LABEL]}}]}]}``
  (guide/predictions.md, "Import pre-annotated data");
* export (what ``--data labelled.json`` reads): the "JSON" export, a list of tasks each with
  ``data`` and ``annotations[].result[]`` of ``type: "choices"`` (guide/task_format.md).

Image references in ``data.image``: ``/data/local-files/?d=PATH`` (local-files storage;
PATH relative to ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``, else ``/``, percent-encoded;
a file outside the document root is refused), ``file://`` URLs and plain paths (relative to
the JSON file). ``imgcls rank`` also stores ``data.path`` (the file itself; a relative one is
relative to the JSON file), which is preferred when present. Uploaded files (``/data/upload/...``) and web URLs
are not on this machine: refused with the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import quoteattr

import torch

from imgcls.data.records import ImageData, Split, ordered_classes
from imgcls.errors import ImgclsError

FROM_NAME, TO_NAME = "choice", "image"  # names of the <Choices> and <Image> tags in LABEL_CONFIG
LOCAL_FILES = "/data/local-files/?d="
DOCUMENT_ROOT = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"


def label_config(classes: list[str]) -> str:
    """The labelling interface (XML) the import file is written for."""
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)  # R&D, say "hi": escaped
    return (f'<View><Image name="{TO_NAME}" value="$image"/><Choices name="{FROM_NAME}" toName="{TO_NAME}" '
            f'choice="single" showInLine="true">{choices}</Choices></View>')


def image_url(path: Path) -> str:
    """``path`` as Label Studio's local-files URL (relative to its document root),
    percent-encoded as Label Studio's own local storage writes it (``?d={quote(path)}``)."""
    root = Path(os.environ.get(DOCUMENT_ROOT, "/")).resolve()
    p = Path(path).resolve()
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise ImgclsError(f"{p} is outside {DOCUMENT_ROOT} ({root}): Label Studio cannot serve it",
                          f"move the images under the document root or set {DOCUMENT_ROOT} to a folder above them"
                          ) from None
    return LOCAL_FILES + quote(rel.as_posix(), safe="/")


def task(path: Path, classes: list[str], probs: list[float], model_version: str, extra: dict[str, Any]) -> dict:
    """One import task with the model's prediction pre-filled."""
    best = max(range(len(probs)), key=probs.__getitem__)
    result = {"id": f"imgcls-{extra.get('rank', 0)}", "type": "choices", "from_name": FROM_NAME, "to_name": TO_NAME,
              "value": {"choices": [classes[best]]}}
    return {"data": {"image": image_url(path), "path": str(Path(path).resolve()), **extra},
            "predictions": [{"model_version": model_version, "score": round(float(probs[best]), 4),
                             "result": [result]}]}


def is_labelstudio(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def _file_of(t: dict[str, Any], base: Path) -> Path:
    data = t.get("data") or {}
    if data.get("path"):
        p = Path(data["path"]).expanduser()
        return p if p.is_absolute() else base / p  # relative to the JSON's folder, as plain image paths are
    ref = data.get("image") or next((v for v in data.values() if isinstance(v, str)), "")
    if ref.startswith(LOCAL_FILES):
        d = parse_qs(urlparse(ref).query).get("d", [""])[0]  # parse_qs decodes it once, as Django's GET does
        return Path(os.environ.get(DOCUMENT_ROOT, "/")) / d
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    if ref.startswith(("/data/upload/", "http://", "https://", "s3://", "gs://")):
        raise ImgclsError(f"task {t.get('id', '?')} image '{ref}' is not a file on this machine",
                          "serve the images from local files storage (/data/local-files/?d=...) or "
                          "give the tasks a data.path")
    p = Path(unquote(ref))
    return p if p.is_absolute() else base / p


def _choice(t: dict[str, Any], where: str) -> str | None:
    """The chosen class of a task's latest non-cancelled annotation (None: not labelled)."""
    for ann in reversed(t.get("annotations") or []):
        if ann.get("was_cancelled"):
            continue
        for r in ann.get("result") or []:
            kind = r.get("type")
            if kind != "choices":
                raise ImgclsError(f"{where}: task {t.get('id', '?')} has a '{kind}' annotation, not 'choices'",
                                  "export an image-classification project (a <Choices> tag over an <Image>)")
            choices = (r.get("value") or {}).get("choices") or []
            if len(choices) != 1:
                raise ImgclsError(f"{where}: task {t.get('id', '?')} has {len(choices)} choices",
                                  "use single-choice labelling (choice=\"single\")")
            return str(choices[0])
    return None


def from_labelstudio(path: str | Path, classes: list[str] | None = None) -> ImageData:
    """A Label Studio JSON export of an image-classification project as training data
    (tasks without a non-cancelled annotation are left out, and counted in the notes)."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImgclsError(f"cannot read Label Studio export {path}: {exc}", "export the project as JSON") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise ImgclsError(f"{path} is not a Label Studio JSON export (a list of tasks with 'data')",
                          "export the project with Export -> JSON")
    paths, labels, unlabelled = [], [], 0
    for t in tasks:
        label = _choice(t, str(path))
        if label is None:
            unlabelled += 1
            continue
        paths.append(_file_of(t, path.parent))
        labels.append(label)
    if not paths:
        raise ImgclsError(f"{path} has no labelled tasks ({unlabelled} without an annotation)",
                          "label some tasks in Label Studio, then export again")
    names = ordered_classes(sorted(set(labels)), classes, f"{path} has label(s)", "relabel those tasks")
    if len(names) < 2:
        raise ImgclsError(f"{path} has a single class ('{names[0]}')", "a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    train = Split(labels=torch.tensor([index[lab] for lab in labels], dtype=torch.long), paths=paths)
    notes = [f"{unlabelled} task(s) without an annotation left out"] if unlabelled else []
    return ImageData(classes=names, train=train, name=path.stem, channels=3, kind="photos", notes=notes)
