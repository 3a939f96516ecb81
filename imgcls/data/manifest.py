"""CSV / TSV manifests: one image per row, ``path,label[,split]``.

* Paths are relative to the manifest's folder (absolute paths are kept as they are).
* A header row is recognised when its first two cells are ``path``/``file``/``filename``/
  ``image`` and ``label``/``class``; columns are then found by name (in any order,
  other columns kept in ``ImageData.columns`` for ``--group-by``). Without a header the columns are path, label[, split].
* ``.tsv`` files are tab-separated; ``.csv`` files comma-separated, or semicolon/tab when
  the first line says so (csv.Sniffer).
* split: ``train``, ``val``/``valid``/``validation``, ``test``; empty or missing means train.
* Class order: sorted label names, unless ``classes`` fixes it.

Rows whose file is missing are kept: they are reported and skipped (or refused with
``--strict``) with the other unreadable files when the images are decoded.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from imgcls.data.records import ImageData, Split, ordered_classes
from imgcls.errors import ImgclsError

MANIFEST_SUFFIXES = (".csv", ".tsv")
SPLIT_NAMES = {"train": "train", "": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PATH_COLS = ("path", "file", "filename", "image", "filepath", "image_path")
_LABEL_COLS = ("label", "class", "category", "target")


def _dialect(path: Path, text: str) -> type[csv.Dialect] | csv.Dialect:
    if path.suffix.lower() == ".tsv":
        return csv.excel_tab
    try:
        return csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        return csv.excel


def from_manifest(path: str | Path, classes: list[str] | None = None) -> ImageData:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImgclsError(f"cannot read manifest {path}: {exc}", "give a UTF-8 CSV/TSV file") from None
    rows = [r for r in csv.reader(text.splitlines(), _dialect(path, text)) if any(c.strip() for c in r)]
    if not rows:
        raise ImgclsError(f"manifest {path} is empty", "write one 'path,label[,split]' row per image")
    head = [c.strip().lower() for c in rows[0]]
    cols = (0, 1, 2)
    extra: dict[int, str] = {}  # extra header columns (for --group-by COLUMN)
    columns: dict[str, dict[str, str]] = {}
    if len(head) >= 2 and head[0] in _PATH_COLS + _LABEL_COLS and head[1] in _PATH_COLS + _LABEL_COLS + ("split",):
        try:
            p_col = next(i for i, h in enumerate(head) if h in _PATH_COLS)
            l_col = next(i for i, h in enumerate(head) if h in _LABEL_COLS)
        except StopIteration:
            raise ImgclsError(f"manifest {path} header {rows[0]} needs a 'path' and a 'label' column",
                              "name the columns path,label[,split]") from None
        cols = (p_col, l_col, head.index("split") if "split" in head else None)
        extra = {i: h for i, h in enumerate(head) if i not in cols and h}
        rows = rows[1:]
    base = path.parent
    entries: dict[str, tuple[list[Path], list[str]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for line, row in enumerate(rows, start=2 if cols != (0, 1, 2) else 1):
        cells = [c.strip() for c in row]
        if len(cells) <= max(cols[0], cols[1]) or not cells[cols[0]] or not cells[cols[1]]:
            raise ImgclsError(f"{path} line {line}: expected path,label[,split], got {row}",
                              "every row needs a file path and a label")
        split_cell = cells[cols[2]].lower() if cols[2] is not None and cols[2] < len(cells) else ""
        if split_cell not in SPLIT_NAMES:
            raise ImgclsError(f"{path} line {line}: unknown split '{cells[cols[2]]}'",
                              "use train, val (valid, validation) or test, or leave it empty")
        try:
            file = Path(cells[cols[0]]).expanduser()
        except RuntimeError:  # ~user whose home folder is unknown
            raise ImgclsError(f"{path} line {line}: cannot expand '{cells[cols[0]]}' (no such user's home folder)",
                              "write the path in full") from None
        paths, labels = entries[SPLIT_NAMES[split_cell]]
        paths.append(file if file.is_absolute() else base / file)
        labels.append(cells[cols[1]])
        for i, name in extra.items():
            columns.setdefault(name, {})[str(paths[-1])] = cells[i] if i < len(cells) else ""
    names = ordered_classes(sorted({lab for _, labs in entries.values() for lab in labs}), classes,
                            f"{path} has label(s)", "remove those rows")
    if not entries["train"][0]:
        raise ImgclsError(f"manifest {path} has no training rows", "mark some rows as train (or leave split empty)")
    if len(names) < 2:
        raise ImgclsError(f"manifest {path} has a single class ('{names[0]}')", "a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    splits = {k: Split(labels=torch.tensor([index[lab] for lab in labs], dtype=torch.long), paths=ps)
              for k, (ps, labs) in entries.items() if ps}
    from imgcls.data.sources import _guess_channels  # sources imports this module

    return ImageData(classes=names, train=splits["train"], val=splits.get("val"), test=splits.get("test"),
                     name=path.stem, channels=_guess_channels(splits["train"]), native_size=None, kind="photos",
                     columns=columns)
