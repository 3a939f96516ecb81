"""Sources -> records: class folders, Keras-style ``.npz``, in-memory arrays, named data
sets. Each returns an :class:`ImageData`; :func:`load_data` picks the source from what
the user gave and adds a held-out validation split when the data has none."""

from __future__ import annotations

import dataclasses
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.data.decode import is_image_file, scan_folder
from imgcls.data.labelstudio import from_labelstudio, is_labelstudio
from imgcls.data.manifest import MANIFEST_SUFFIXES, from_manifest
from imgcls.data.records import ImageData, Split, ordered_classes
from imgcls.data.split import stratified_split
from imgcls.errors import ImgclsError, did_you_mean

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


# A model's class list while data to use it on is read (:func:`model_classes`): then data of
# one class is fine - the model brings the others (evaluating, calibrating on images of one
# class); training has no such list and still needs two.
_MODEL_CLASSES: ContextVar[tuple[str, ...] | None] = ContextVar("imgcls_model_classes", default=None)


@contextmanager
def model_classes(classes: list[str] | None) -> Iterator[None]:
    """Read data inside this for a model with ``classes``: one class of data is accepted."""
    token = _MODEL_CLASSES.set(tuple(classes) if classes is not None else _MODEL_CLASSES.get())
    try:
        yield
    finally:
        _MODEL_CLASSES.reset(token)


def _for_a_model() -> bool:
    return _MODEL_CLASSES.get() is not None


# ----------------------------------------------------------------------------- folders
# a folder beside train/ (val/, test/) that is no split: reported (audit, training), not read
UNUSED_FOLDER = "folder beside the split folders, not read (name it val/ or test/ to use it)"

def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(root: Path, subdirs: list[Path]) -> dict[str, Path]:
    """The split folders among ``subdirs``: a split-named folder (train/, Testing/, ...) is a
    split only when it holds class folders; one of images (``veh/train/*.png``) is a class."""
    return {SPLIT_NAMES[d.name.lower()]: d for d in subdirs if d.name.lower() in SPLIT_NAMES and _class_dirs(d)}


# a word of a split's name inside a folder name: Train_set, seg_test, Validation2, holdout,
# cross-validation folds (fold1, fold_2) and numbered splits (split0)
SPLIT_WORD = re.compile(r"train|test|val|eval|holdout|fold|split", re.IGNORECASE)


def _refuse_unnamed_splits(root: Path, dirs: list[Path]) -> None:
    """Top-level folders that hold no files but the same set of subfolders, one of them named
    like a split (``Train_set/{cat,dog}``, ``Test_set/{cat,dog}``), are split folders under names
    imgcls does not know: refused, rather than made classes "Train_set" and "Test_set". Class
    folders organised the same way under other names (``cat/{2019,2020}``, ``dog/{2019,2020}``:
    years, sites, cameras) are classes."""
    if len(dirs) < 2 or not any(SPLIT_WORD.search(d.name) for d in dirs):
        return
    names = None
    for d in dirs:
        if any(is_image_file(p) and not p.is_dir() for p in d.iterdir()):
            return
        sub = {c.name for c in _class_dirs(d)}
        if len(sub) < 2 or (names is not None and sub != names):
            return
        names = sub
    raise ImgclsError(f"{root}: {', '.join(d.name + '/' for d in dirs)} hold the same class folders "
                      f"({', '.join(sorted(names))}) and look like split folders: name them train/, val/, test/",
                      "or pass --classes to use them as classes")


def _scan_classes(root: Path, classes: list[str]) -> tuple[list[Path], list[int], list[tuple[Path, str]]]:
    """Every file of every class folder (see decode.scan_folder): paths, labels, passed over."""
    paths, labels, over = [], [], []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        scan = scan_folder(d)
        paths += scan.files
        labels += [label] * len(scan.files)
        over += scan.passed_over
    return paths, labels, over


def from_folder(root: str | Path, classes: list[str] | None = None) -> ImageData:
    """One subfolder per class, optionally inside ``train/`` (or ``training``) + ``val/`` (or
    ``valid``, ``validation``) and/or ``test/`` (or ``testing``) split folders, in any case; a
    split-named folder of images is a class. ``classes`` fixes the class list
    and order (default: the folder names, sorted). A folder with only ``val/`` or ``test/``
    has no training split: it can be evaluated on, and training refuses it."""
    root = Path(root)
    subdirs = _class_dirs(root)
    split_dirs = _split_dirs(root, subdirs)
    if not split_dirs and classes is None:
        _refuse_unnamed_splits(root, subdirs)
    # the split whose class folders name the classes: train/, else (a folder to evaluate on) val/ or test/
    main = next((s for s in ("train", "val", "test") if s in split_dirs), "train")
    class_root = split_dirs.get(main, root)
    found = [d.name for d in _class_dirs(class_root)]
    classes = ordered_classes(found, classes, f"{class_root} has class folder(s)", f"move them out of {class_root}")
    if not classes:
        raise ImgclsError(f"no class folders in {class_root}",
                          "put the images in one subfolder per class, e.g. data/cats/1.jpg")
    if len(classes) < 2 and not _for_a_model():
        raise ImgclsError(f"only one class ('{classes[0]}') in {class_root}",
                          "a classifier needs at least two class folders")
    splits: dict[str, Split] = {}
    passed: list[tuple[str, Path, str]] = [("-", d, UNUSED_FOLDER) for d in subdirs
                                           if split_dirs and d not in split_dirs.values()]
    for split, base in ({main: class_root} | {k: v for k, v in split_dirs.items() if k != main}).items():
        extra = sorted(d.name for d in _class_dirs(base) if d.name not in classes)
        if extra:
            raise ImgclsError(f"{base} has class folder(s) {extra} that {class_root} lacks",
                              "use the same class folders in every split" if len(classes) == len(found)
                              else "add them to --classes or remove them")
        paths, labels, over = _scan_classes(base, classes)
        splits[split] = Split(labels=torch.tensor(labels, dtype=torch.long), paths=paths)
        passed += [(split, p, why) for p, why in over]
    counts = splits[main].class_counts(len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise ImgclsError(f"class folder '{class_root / empty[0]}' has no images",
                          "add images (jpg, png, ...) to it or remove the folder")
    return ImageData(classes=classes, train=splits.get("train"), val=splits.get("val"),
                     test=splits.get("test"), name=root.name, channels=_guess_channels(splits[main]),
                     native_size=None, kind="photos", passed_over=passed)


def _guess_channels(split: Split, sample: int = 32) -> int:
    """1 when every sampled image is grayscale, else 3 (reads headers only)."""
    from imgcls.data.decode import header_mode

    step = max(1, len(split.paths) // sample)
    for p in split.paths[::step][:sample]:
        mode = header_mode(p)  # None: unreadable, reported when it is decoded
        if mode is not None and mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            return 3
    return 1


# ----------------------------------------------------------------------------- arrays
def _to_nchw_uint8(x: np.ndarray, what: str) -> torch.Tensor:
    """Accept (N,H,W), (N,H,W,C) or (N,C,H,W) pixels (see :func:`_pixels_uint8`)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        # Keras' NHWC unless the layout is unmistakably NCHW (few channels first, many last)
        if not (x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4)):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise ImgclsError(f"{what} has shape {x.shape}",
                          "expected (N, H, W), (N, H, W, C) or (N, C, H, W) images")
    if x.shape[1] == 4:  # RGBA: drop alpha (arrays carry no background to composite on)
        x = x[:, :3]
    if x.shape[1] not in (1, 3):
        raise ImgclsError(f"{what} has {x.shape[1]} channels", "expected 1 (grayscale) or 3 (RGB)")
    return torch.from_numpy(np.ascontiguousarray(_pixels_uint8(x, what)))


RAW_PIXELS = "store raw pixels: uint8, uint16, or floats in 0-1 / 0-255; imgcls normalises itself"


def _pixels_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 pixels as they are; other unsigned integers over their type's range (uint16
    v -> round(v / 257), as a 16-bit PNG maps at ``--intensity full-range``); floats in 0..1
    (x 255) or 0..255, and signed integers in 0..255, as they are. Anything else - negative
    or standardised values, floats above 255, signed integers above 255 - has no known range:
    refused, rather than clipped to a few grey levels."""
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ImgclsError(f"{what} has dtype {x.dtype}", RAW_PIXELS)
    if np.issubdtype(x.dtype, np.unsignedinteger):
        work = np.float32 if x.dtype.itemsize <= 2 else np.float64  # float32 is exact enough for 16 bits
        return np.round(x.astype(work) * work(255.0 / np.iinfo(x.dtype).max)).astype(np.uint8)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    scale = 255.0 if hi <= 1.0 + 0.5 / 255 else 1.0
    # within half a grey level of the range (float rounding noise) is still in it
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo * scale < -0.5 or hi * scale > 255.5:
        raise ImgclsError(f"{what} has {x.dtype} values in {lo:g}..{hi:g}, not pixels in 0-1 or 0-255", RAW_PIXELS)
    return np.clip(np.round(x.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def _multi_hot(y: np.ndarray, n: int, what: str, num_classes: int | None) -> torch.Tensor:
    """A 2-D 0/1 label matrix (multi-label data) as float32 multi-hot rows."""
    if len(y) != n:
        raise ImgclsError(f"{what}: {n} images but {len(y)} label rows", "each image needs one row of 0/1 labels")
    bad = np.argwhere((y != 0) & (y != 1))
    if len(bad):
        r, c = bad[0]
        raise ImgclsError(f"{what} row {r} column {c} holds {y[r, c]!r}",
                          "a 2-D label matrix holds 0/1 per class (multi-label) or one-hot rows")
    if num_classes is not None and y.shape[1] != num_classes:
        raise ImgclsError(f"{what} has {y.shape[1]} label columns but {num_classes} class names",
                          "give one class name per column")
    return torch.from_numpy(y.astype(np.float32))


def _labels(y: np.ndarray, n: int, what: str, num_classes: int | None) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot (Keras to_categorical), or 0/1 multi-label rows
        if np.issubdtype(y.dtype, np.number) and len(y) and not np.all(y.sum(1) == 1) \
                and np.all((y == 0) | (y == 1)):
            return _multi_hot(y, n, what, num_classes)
        y = y.argmax(1)
    y = y.reshape(-1)
    if len(y) != n:
        raise ImgclsError(f"{what}: {n} images but {len(y)} labels", "each image needs exactly one label")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise ImgclsError(f"{what} labels have dtype {y.dtype}", "labels must be integer class indices 0..K-1")
    if len(y) and y.min() < 0:
        raise ImgclsError(f"{what} has negative label {int(y.min())}", "labels must be class indices 0..K-1")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise ImgclsError(f"{what} has label {int(y.max())} but only {num_classes} class names",
                          f"labels must be in 0..{num_classes - 1}; fix the labels or class_names")
    return torch.from_numpy(y.astype(np.int64))


def from_arrays(x_train, y_train, x_test=None, y_test=None, class_names=None, name: str = "arrays",
                source: str | None = None) -> ImageData:
    """In-memory arrays as ImageData; ``source`` (the file they came from) prefixes the errors."""
    names = [str(c) for c in class_names] if class_names is not None else None
    at = f"{source} " if source else ""
    xtr = _to_nchw_uint8(np.asarray(x_train), f"{at}x_train")
    ytr = _labels(y_train, len(xtr), f"{at}y_train", len(names) if names else None)
    test = None
    if x_test is not None:
        xte = _to_nchw_uint8(np.asarray(x_test), f"{at}x_test")
        yte = _labels(y_test, len(xte), f"{at}y_test", len(names) if names else None)
        if yte.ndim != ytr.ndim:  # one split multi-hot, the other one-hot rows: both multi-label
            from imgcls.data.multilabel import to_multi

            k0 = ytr.shape[1] if ytr.ndim == 2 else yte.shape[1]
            ytr, yte = to_multi(ytr, k0), to_multi(yte, k0)
        test = Split(labels=yte, images=xte)
    if ytr.ndim == 2:
        k = ytr.shape[1]
    else:
        k = len(names) if names else int(max(ytr.max().item(), test.labels.max().item() if test else 0)) + 1
    if k < 2 and not _for_a_model():
        raise ImgclsError(f"{name} has a single class", "a classifier needs at least two classes")
    channels, size = xtr.shape[1], xtr.shape[2]
    kind = "digits" if channels == 1 and size <= 64 else ("small-colour" if size <= 64 else "photos")
    return ImageData(classes=names or [str(i) for i in range(k)], train=Split(labels=ytr, images=xtr),
                     test=test, name=name, channels=channels,
                     native_size=size if xtr.shape[2] == xtr.shape[3] else None, kind=kind)


def from_npz(path: str | Path, class_names: list[str] | None = None) -> ImageData:
    """A Keras-style ``.npz``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` and an
    optional ``class_names``. Loaded with ``allow_pickle=False``: nothing is unpickled."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = [k for k in ("x_train", "y_train") if k not in keys]
            if missing:
                raise ImgclsError(f"{path} has no '{missing[0]}' array (it has: {', '.join(sorted(keys)) or 'nothing'})",
                                  "use the Keras layout: x_train, y_train, x_test, y_test[, class_names]")
            if ("x_test" in keys) != ("y_test" in keys):
                raise ImgclsError(f"{path} has only one of x_test / y_test", "give both or neither")
            arrays: dict[str, Any] = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in keys}
            if "class_names" in keys and class_names is None:
                class_names = [str(c) for c in f["class_names"].tolist()]
    except ImgclsError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ImgclsError(f"{path} holds Python objects (pickles), which imgcls never loads",
                              "save plain arrays with numpy.savez") from None
        raise ImgclsError(f"cannot read {path}: {exc}", "is it a numpy .npz file?") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ImgclsError(f"cannot read {path}: {exc}", "is it a complete numpy .npz file?") from None
    data = from_arrays(arrays["x_train"], arrays["y_train"], arrays.get("x_test"), arrays.get("y_test"),
                       class_names=class_names, name=path.stem, source=str(path))
    return data


# ----------------------------------------------------------------------------- dispatch
def with_classes(data: ImageData, classes: list[str] | None) -> ImageData:
    """Relabel ``data`` to the class list ``classes`` (same names, new order; or names
    for data that only has numbers). Refuses data with classes the list lacks."""
    if classes is None or list(classes) == data.classes:
        return data
    classes = [str(c) for c in classes]
    unnamed = data.classes == [str(i) for i in range(len(data.classes))]
    shared = set(data.classes) & set(classes)
    if unnamed and shared and not set(data.classes) <= shared:  # 0..K-1 labels, some of them class names
        raise ImgclsError(f"the data's numbered labels 0..{len(data.classes) - 1} are partly among the class names "
                          f"{classes[:8]}: by number or by name is ambiguous",
                          "give the data its class names (class_names in the .npz), or relabel it 0..K-1 in list order")
    if unnamed and not shared and len(classes) >= len(data.classes):
        mapping = None  # numbered classes: the list names them, in label order
    else:  # by name (numbered labels too, when every number is a class name: folders 0..11 sort as 0, 1, 10, ...)
        extra = [c for c in data.classes if c not in classes]
        if extra:
            raise ImgclsError(f"the data has class(es) {extra[:5]} that the class list {classes[:8]} lacks",
                              "list every class of the data (--classes), in the order you want")
        mapping = torch.tensor([classes.index(c) for c in data.classes], dtype=torch.long)

    def relabel(split: Split | None) -> Split | None:
        if split is None or mapping is None:
            return split
        if split.multi_label:
            from imgcls.data.multilabel import relabel_multi

            return Split(labels=relabel_multi(split.labels, mapping, len(classes)), images=split.images,
                         paths=split.paths, sources=split.sources)
        new = mapping[split.labels] if len(split.labels) else split.labels
        if split.shards is not None:  # a stream maps each label as it is read
            old = split.shards.label_map
            table = [int(mapping[i if old is None else old[i]]) for i in range(len(old or data.classes))]
            return Split(labels=new, shards=dataclasses.replace(split.shards, label_map=table))
        return Split(labels=new, images=split.images, paths=split.paths, sources=split.sources)

    return dataclasses.replace(data, classes=classes, train=relabel(data.train), val=relabel(data.val),
                               test=relabel(data.test), notes=list(data.notes))


def resolve(spec: Any, classes: list[str] | None = None, task: str = "auto") -> ImageData:
    """Turn what the user gave (path, name, arrays, ImageData) into ImageData;
    ``classes`` fixes the class list and order; ``task`` (auto, single, multi) whether the
    labels are one class or a set of labels per image (data/multilabel.py)."""
    from imgcls.data.multilabel import as_task
    from imgcls.data.shardset import from_shards, is_shard_spec

    if is_shard_spec(spec):  # a folder / pattern / URL of shards written by `imgcls shard`
        return from_shards(str(spec), classes)
    if isinstance(spec, (str, Path)) and Path(str(spec)).expanduser().is_dir():
        return as_task(from_folder(Path(str(spec)).expanduser(), classes), task)
    if isinstance(spec, (str, Path)) and Path(str(spec)).suffix.lower() in MANIFEST_SUFFIXES \
            and Path(str(spec)).expanduser().is_file():
        return as_task(_manifest(Path(str(spec)).expanduser(), classes, task), task)
    if isinstance(spec, (str, Path)) and is_labelstudio(Path(str(spec))) and Path(str(spec)).expanduser().is_file():
        data = from_labelstudio(Path(str(spec)).expanduser(), classes)  # a Label Studio JSON export
        data.channels = _guess_channels(data.train)
        return as_task(data, task)
    return as_task(with_classes(_resolve(spec), classes), task)


def _manifest(path: Path, classes: list[str] | None, task: str) -> ImageData:
    try:
        return from_manifest(path, classes, task)
    except ImgclsError as exc:
        model = _MODEL_CLASSES.get()
        if classes is not None or model is None:
            raise
        first = exc
    # read for a model: with its class list, a manifest of one of its classes is accepted
    # (manifest.py refuses a single class otherwise); any other problem is the first error
    try:
        return from_manifest(path, list(model), task)
    except ImgclsError:
        raise first from None


def _resolve(spec: Any) -> ImageData:
    from imgcls.data.datasets import DATASETS

    if isinstance(spec, ImageData):
        return spec
    if isinstance(spec, tuple) and len(spec) in (2, 4):
        return from_arrays(*spec)
    if isinstance(spec, dict):
        return from_arrays(spec["x_train"], spec["y_train"], spec.get("x_test"), spec.get("y_test"),
                           spec.get("class_names"))
    if not isinstance(spec, (str, Path)):
        raise ImgclsError(f"cannot use {type(spec).__name__} as data",
                          "give a folder, a .npz file, a dataset name or (x, y) arrays")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return from_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return from_npz(path)
        raise ImgclsError(f"don't know how to read {path}",
                          "give a folder of class folders, a CSV/TSV manifest, a Keras-style .npz, or a dataset name")
    if text.lower() in DATASETS:
        return DATASETS.get(text.lower())()
    looks_like_path = any(ch in text for ch in "/\\") or Path(text).suffix != ""
    if looks_like_path:
        raise ImgclsError(f"data path not found: {text}", "check the path, or give a dataset name: "
                          + ", ".join(DATASETS.names()))
    hint = did_you_mean(text, DATASETS.names())
    raise ImgclsError(f"unknown dataset '{text}' (and no such file or folder)",
                      f"{hint} known datasets: {', '.join(DATASETS.names())}".strip())


def load_data(spec: Any, val_split: float = 0.1, seed: int = 0, classes: list[str] | None = None,
              group_by: str | None = None, task: str = "auto", like: list[str] | None = None) -> ImageData:
    """Resolve ``spec`` and make sure there is a validation split (stratified hold-out
    of ``val_split`` of train when the data brings none; with ``group_by``, whole groups
    only: see data/groups.py). ``classes`` fixes the class list and order; ``task`` forces
    single- or multi-label labels. ``like`` (a model's class list) relabels data with the
    same class names to that order before holding out, so the held-out split is the one a
    run trained with ``--classes`` in that order drew (see :func:`stratified_split`)."""
    with model_classes(like):  # data for a model (``like``): one class of it is enough
        data = resolve(spec, classes, task)
    if like is not None and classes is None and data.classes != list(like) and sorted(data.classes) == sorted(like):
        data = with_classes(data, list(like))
    if data.val is None and data.train is not None and data.train.streamed:
        note = "the shard set has no validation split (`imgcls shard` writes one)"
        if note not in data.notes:  # an ImageData given back to load_data keeps one copy
            data.notes.append(note)
    elif data.val is None and data.train is not None and val_split > 0:
        if group_by:
            from imgcls.data.groups import group_of, grouped_split

            keep, hold = grouped_split(data.train.labels, group_of(data, data.train, group_by), val_split, seed)
            how = f"grouped by '{group_by}'"
        else:
            keep, hold = stratified_split(data.train.labels, val_split, seed)
            how = "stratified"
        data.val, data.train = data.train.subset(hold), data.train.subset(keep)
        data.notes.append(f"held out a {how} {val_split:.0%} of train for validation ({len(hold)} images)")
    elif group_by and data.train is not None:
        from imgcls.data.groups import group_of

        group_of(data, data.train, group_by)  # a column or regex that names no group fails here too
    return data
