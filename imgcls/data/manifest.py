"""CSV / TSV manifests: one image per row, ``path,label[,split]``.

* Paths are relative to the manifest's folder (absolute paths are kept as they are).
* Paths written on Windows (``..\\ds1\\cat\\1.png``) are read with forward slashes when the
  path as written does not exist; a drive path (``C:\\...``) that does not exist is refused.
* A header row is recognised when its first two cells are ``path``/``file``/``filename``/
  ``image`` and ``label``/``class``, or when its label cell is a label column's name and its
  path cell is no file (``file_name,label``, ``image_id,label``: the first column is the
  path); columns are then found by name (in any order, extra columns ignored). Without a
  header the columns are path, label[, split].
* ``.tsv`` files are tab-separated; ``.csv`` files comma-separated, or semicolon/tab when
  the first line says so (csv.Sniffer).
* split: ``train``, ``val``/``valid``/``validation``, ``test``; empty or missing means train.
* Class order: sorted label names, unless ``classes`` fixes it.
* Multi-label (imgcls/data/multilabel.py): a ``labels`` (or ``tags``) column whose cells hold
  ``cat;dog``, or ``path,<class1>,<class2>,...[,split]`` with a 0/1 cell per class. A
  ``label`` column whose rows all hold several labels is multi-label too; one that mixes
  rows of one and of several labels is refused, naming the row.

Rows whose file is missing are kept: they are reported and skipped (or refused with
``--strict``) with the other unreadable files when the images are decoded.
"""

from __future__ import annotations

import csv
from pathlib import Path, PureWindowsPath

import torch

from imgcls.data.multilabel import SEPARATOR, multi_hot, split_cell
from imgcls.data.records import ImageData, Split, ordered_classes
from imgcls.errors import ImgclsError

MANIFEST_SUFFIXES = (".csv", ".tsv")
SPLIT_NAMES = {"train": "train", "": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PATH_COLS = ("path", "file", "filename", "image", "filepath", "image_path")
_LABEL_COLS = ("label", "class", "category", "target")
_MULTI_COLS = ("labels", "tags", "classes")  # several labels per image: cat;dog


def _dialect(path: Path, text: str) -> type[csv.Dialect] | csv.Dialect:
    if path.suffix.lower() == ".tsv":
        return csv.excel_tab
    try:
        return csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        return csv.excel


def _is_header(path: Path, head: list[str], first: list[str]) -> bool:
    """Row 1 is a header when it names known columns, or when its label cell is a label
    column's name and its path cell is no file (``file_name,label``, ``image_id,label``)."""
    known = _PATH_COLS + _LABEL_COLS + _MULTI_COLS + ("split",)
    if len(head) < 2:
        return False
    if head[0] in known and (head[1] in known or head[0] in _PATH_COLS):
        return True
    return head[1] in _LABEL_COLS + _MULTI_COLS and not (path.parent / first[0].strip()).exists()


def _columns(path: Path, rows: list[list[str]]) -> tuple[tuple, list[list[str]], list[str] | None, int]:
    """(path, label, split) column indices, the data rows, the class columns of a one-0/1-
    column-per-class manifest (else None) and the line number of the first data row."""
    head = [c.strip().lower() for c in rows[0]]
    if _is_header(path, head, rows[0]):
        p_col = next((i for i, h in enumerate(head) if h in _PATH_COLS), None)
        l_col = next((i for i, h in enumerate(head) if h in _LABEL_COLS + _MULTI_COLS), None)
        if p_col is None and l_col not in (None, 0) and head[0] != "split":
            p_col = 0  # a path column under another name (file_name, image_id, ...): the first one
        s_col = head.index("split") if "split" in head else None
        if p_col is not None and l_col is None:  # path,cat,dog,bird: one 0/1 column per class
            class_cols = [i for i in range(len(head)) if i not in (p_col, s_col)]
            if len(class_cols) >= 2:
                return (p_col, class_cols, s_col), rows[1:], [rows[0][i].strip() for i in class_cols], 2
        if p_col is None or l_col is None:
            raise ImgclsError(f"manifest {path} header {rows[0]} needs a 'path' and a 'label' column",
                              "name the columns path,label[,split] (path,labels for several labels per image, "
                              "or path,<class1>,<class2>,... with 0/1 cells)")
        return (p_col, l_col, s_col), rows[1:], None, 2
    return (0, 1, 2), rows, None, 1


def _row_labels(path: Path, line: int, cells: list[str], cols: tuple, class_names: list[str] | None) -> list[str]:
    """The label(s) of one row: a cell (``cat`` or ``cat;dog``) or the classes whose 0/1 cell is 1."""
    if class_names is None:
        cell = cells[cols[1]] if cols[1] < len(cells) else ""
        labels = split_cell(cell)
        if not labels:
            raise ImgclsError(f"{path} line {line}: empty label cell", "every row needs a label (cat, or cat;dog)")
        return labels
    out = []
    for name, i in zip(class_names, cols[1]):
        v = cells[i] if i < len(cells) else ""
        if v not in ("0", "1"):
            raise ImgclsError(f"{path} line {line}: column '{name}' holds '{v}'",
                              "a per-class column holds 0 or 1 in every row")
        if v == "1":
            out.append(name)
    return out


def _cell_path(path: Path, line: int, cell: str) -> Path:
    """The file a path cell names: relative to the manifest's folder (absolute paths as they
    are). A path written on Windows (``..\\ds1\\cat\\1.png``) that does not exist as it is
    is read with forward slashes; a drive path (``C:\\...``) that does not exist is refused."""
    try:
        file = Path(cell).expanduser()
    except RuntimeError:  # ~user whose home folder is unknown
        raise ImgclsError(f"{path} line {line}: cannot expand '{cell}' (no such user's home folder)",
                          "write the path in full") from None
    file = file if file.is_absolute() else path.parent / file
    if "\\" not in cell or file.exists():
        return file
    win = PureWindowsPath(cell)
    if win.drive:
        raise ImgclsError(f"{path} line {line}: '{cell}' is a Windows drive path, not a file on this machine",
                          "write the paths relative to the manifest's folder (e.g. cat\\1.png or cat/1.png)")
    posix = Path(win.as_posix())
    return posix if posix.is_absolute() else path.parent / posix


def _read_rows(path: Path, rows: list[list[str]], cols: tuple, first: int, class_names: list[str] | None):
    entries: dict[str, tuple[list[Path], list[list[str]], list[int]]] = \
        {"train": ([], [], []), "val": ([], [], []), "test": ([], [], [])}
    for line, row in enumerate(rows, start=first):
        cells = [c.strip() for c in row]
        if len(cells) <= cols[0] or not cells[cols[0]]:
            raise ImgclsError(f"{path} line {line}: expected path,label[,split], got {row}",
                              "every row needs a file path and a label")
        labels = _row_labels(path, line, cells, cols, class_names)
        split_cell = cells[cols[2]].lower() if cols[2] is not None and cols[2] < len(cells) else ""
        if split_cell not in SPLIT_NAMES:
            raise ImgclsError(f"{path} line {line}: unknown split '{cells[cols[2]]}'",
                              "use train, val (valid, validation) or test, or leave it empty")
        paths, labs, lines = entries[SPLIT_NAMES[split_cell]]
        paths.append(_cell_path(path, line, cells[cols[0]]))
        labs.append(labels)
        lines.append(line)
    return entries


def _extra_columns(path: Path, header: list[str], body: list[list[str]], cols: tuple) -> dict[str, dict[str, str]]:
    """The header's other columns (``run``, ``patient``, ...): column -> {str(image path): value},
    what ``--group-by COLUMN`` groups by (data/groups.py)."""
    extra = {i: h.strip().lower() for i, h in enumerate(header) if i not in cols and h.strip()}
    columns: dict[str, dict[str, str]] = {}
    for line, row in enumerate(body, start=2):
        cells = [c.strip() for c in row]
        key = str(_cell_path(path, line, cells[cols[0]]))  # _read_rows has checked every row
        for i, name in extra.items():
            columns.setdefault(name, {})[key] = cells[i] if i < len(cells) else ""
    return columns


def _is_multi(path: Path, head: list[str] | None, entries, class_names, task: str) -> bool:
    """Multi-label when the manifest says so (a ``labels``/``tags`` column, 0/1 class columns,
    ``--task multi``) or every row holds several labels; a ``label`` column where some rows
    hold one label and others several is refused, naming the first row that holds several."""
    rows = [(ln, labs) for _, all_labs, lines in entries.values() for ln, labs in zip(lines, all_labs)]
    several = [(ln, labs) for ln, labs in rows if len(labs) != 1]
    if task == "single" and several:
        ln, labs = several[0]
        raise ImgclsError(f"{path} line {ln}: '{SEPARATOR.join(labs)}' holds {len(labs)} labels but --task single "
                          "needs one per row", "drop --task single, or give the row one label")
    if task == "single":
        return False
    if class_names is not None or task == "multi" or (head and head[0] in _MULTI_COLS):
        return True
    if not several:
        return False
    if len(several) == len(rows):
        return True
    ln, labs = several[0]
    raise ImgclsError(f"{path} line {ln}: '{SEPARATOR.join(labs)}' holds {len(labs)} labels in a label column whose "
                      "other rows hold one", "name the column 'labels' (or pass --task multi) for multi-label data, "
                      "or give every row one label")


def from_manifest(path: str | Path, classes: list[str] | None = None, task: str = "auto") -> ImageData:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImgclsError(f"cannot read manifest {path}: {exc}", "give a UTF-8 CSV/TSV file") from None
    rows = [r for r in csv.reader(text.splitlines(), _dialect(path, text)) if any(c.strip() for c in r)]
    if not rows:
        raise ImgclsError(f"manifest {path} is empty", "write one 'path,label[,split]' row per image")
    cols, body, class_names, first = _columns(path, rows)
    head = [rows[0][cols[1]].strip().lower()] if first == 2 and class_names is None else None
    entries = _read_rows(path, body, cols, first, class_names)
    columns = _extra_columns(path, rows[0], body, cols) if first == 2 and class_names is None else {}
    multi = _is_multi(path, head, entries, class_names, task)
    found = class_names or sorted({lab for _, labs, _ in entries.values() for ls in labs for lab in ls})
    if classes is not None:
        for _, labs, lines in entries.values():
            for ln, ls in zip(lines, labs):
                unknown = [lab for lab in ls if lab not in classes]
                if unknown:
                    raise ImgclsError(f"{path} line {ln}: unknown label '{unknown[0]}' (not in --classes)",
                                      f"add it to --classes ({','.join(classes)}) or fix the row")
    names = ordered_classes(found, classes, f"{path} has label(s)", "remove those rows")
    if not entries["train"][0]:
        raise ImgclsError(f"manifest {path} has no training rows", "mark some rows as train (or leave split empty)")
    if len(names) < 2:
        raise ImgclsError(f"manifest {path} has a single class ('{names[0]}')", "a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}

    def targets(labs: list[list[str]]) -> torch.Tensor:
        if multi:
            return multi_hot([[index[lab] for lab in ls] for ls in labs], len(names))
        return torch.tensor([index[ls[0]] for ls in labs], dtype=torch.long)

    splits = {k: Split(labels=targets(labs), paths=ps) for k, (ps, labs, _) in entries.items() if ps}
    from imgcls.data.sources import _guess_channels  # sources imports this module

    return ImageData(classes=names, train=splits["train"], val=splits.get("val"), test=splits.get("test"),
                     name=path.stem, channels=_guess_channels(splits["train"]), native_size=None, kind="photos",
                     columns=columns)
