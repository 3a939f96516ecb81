"""``imgcls audit DATA``: a health check of an image data set before training.

Image files (class folders, manifests) and arrays (``.npz``, named data sets; see
:func:`audit_arrays`). One pass over the files, in parallel processes, each file read once:
* its bytes -> sha256 (exact duplicates);
* its header -> format, mode, size (Pillow reads no pixels for that);
* unless ``pixels=False``: a reduced decode (JPEG DCT scaling to ~1/8) that still runs
  through the whole compressed stream, so truncated and corrupt files are caught, and
  gives a 64 px grayscale thumbnail for the perceptual hash (imagehash's dHash) and the
  "nearly constant" check.

Findings (each names its files) and their severity:
* error: unreadable files (and why), identical or near-identical images with different
  labels (conflicting labels), the same image in two splits (train/val/test leakage);
* warning: duplicates within a class, tiny images, extreme aspect ratios, nearly
  constant images, format or mode outliers (the only GIF among hundreds of JPEGs).
Any finding makes the audit "not clean" (exit code 1).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.data.balance import imbalance_ratio
from imgcls.data import formats
from imgcls.data.decode import (DECODE_ERRORS, UnreadableImage, as_unreadable, check_pixels, decode_file,
                                header_mode, largest_icon, path_problem)
from imgcls.data.intensity import map_8bit, parse_intensity
from imgcls.data.records import ImageData
from imgcls.errors import ImgclsError

TINY_SIDE = 32  # shorter side below this: too small to learn much from
EXTREME_ASPECT = 4.0  # longer / shorter side
CONSTANT_STD = 3.0  # grayscale standard deviation (0-255) below this: nearly one colour
NEAR_DUP_BITS = 3  # dHash Hamming distance counted as near-identical (see _near_pairs)
OUTLIER_SHARE = 0.02  # a format/mode held by at most this share of files ...
DOMINANT_SHARE = 0.9  # ... while one value covers at least this share is an outlier


@dataclass
class FileInfo:
    path: str
    split: str
    label: str
    bytes: int = 0
    sha256: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    error: str = ""
    dhash: int | None = None
    std: float | None = None


def inspect_file(path: str, pixels: bool = True) -> dict[str, Any]:
    """Everything the audit needs from one file (runs in a worker process)."""
    problem = path_problem(Path(path))  # missing, broken link, symlink loop, FIFO, ...
    if problem is not None:
        return {"error": problem.reason}
    out: dict[str, Any] = {}
    try:
        raw = Path(path).read_bytes()
    except PermissionError:
        return {"error": "permission denied"}
    except OSError as exc:
        return {"error": f"cannot read ({exc.strerror or exc})"}
    out["bytes"] = len(raw)
    out["sha256"] = hashlib.sha256(raw).hexdigest()
    if not raw:
        return out | {"error": "empty file"}
    fmt = formats.sniff(raw[:256], Path(path).name)
    if fmt is not None and not formats.plugin_available(fmt):
        return out | {"error": f"unsupported format — {formats.missing_plugin(fmt)[1]}"}
    try:
        if fmt == "DICOM":
            return out | _inspect_decoded(Path(path), pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
        with im:
            largest_icon(im)
            out.update(format=im.format or "", mode=im.mode, width=im.size[0], height=im.size[1])
            check_pixels(im, Path(path))
            if not pixels:
                return out
            if formats.deep_colour(im):  # 16-bit colour: Pillow's own decode keeps only the high byte
                img = decode_file(Path(path))
                out.update(_thumb_stats(img, out["width"], out["height"]))
                return out
            im.draft("L", (64, 64))  # JPEG only: decode at reduced scale, still reading every byte
            im.load()
            out.update(_thumb_stats(ImageOps.exif_transpose(im) or im, out["width"], out["height"]))
    except UnreadableImage as exc:  # check_pixels, and the DICOM decoder
        out["error"] = exc.reason
    except (Image.DecompressionBombError, UnidentifiedImageError, RuntimeError, *DECODE_ERRORS) as exc:
        out["error"] = as_unreadable(exc, Path(path), fmt).reason
    return out


def _inspect_decoded(path: Path, pixels: bool) -> dict[str, Any]:
    """Formats decoded outside Pillow's open (DICOM): the decoder's image (and, with ``pixels``, its stats)."""
    if not pixels:
        mode = header_mode(path)
        if mode is None:
            raise UnreadableImage(f"cannot read {path}", "", "truncated or corrupt (unreadable header)")
        return {"format": "DICOM", "mode": mode}
    img = decode_file(path)
    return {"format": "DICOM", "mode": img.mode, "width": img.size[0], "height": img.size[1]} | \
        _thumb_stats(img, *img.size)


def _thumb_stats(img: Image.Image, width: int, height: int) -> dict[str, Any]:
    """Grayscale std and dHash of a 64 px thumbnail (high bit depth mapped as ``--intensity auto``)."""
    gray = map_8bit(img, parse_intensity("auto"), 1)
    gray.thumbnail((64, 64))
    out: dict[str, Any] = {"std": float(np.asarray(gray, dtype=np.float32).std()), "dhash": _dhash(gray)}
    if (img.size[0] > img.size[1]) != (width > height) and img.size[0] != img.size[1]:
        out["width"], out["height"] = height, width  # EXIF-rotated: report as seen
    return out


def _dhash(gray: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.dhash(gray, hash_size=8)), 16)


def _inspect_chunk(args: tuple[list[str], bool]) -> list[dict[str, Any]]:
    paths, pixels = args
    return [inspect_file(p, pixels) for p in paths]


def _inspect_all(paths: list[str], pixels: bool, workers: int | None) -> list[dict[str, Any]]:
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers <= 1 or len(paths) < 64:
        return [inspect_file(p, pixels) for p in paths]
    size = max(16, min(256, len(paths) // (workers * 8)))
    chunks = [(paths[i:i + size], pixels) for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [r for chunk in pool.map(_inspect_chunk, chunks) for r in chunk]


# ----------------------------------------------------------------------------- findings
@dataclass
class Finding:
    kind: str
    severity: str  # error | warning
    message: str
    files: list[str] = field(default_factory=list)


def _near_pairs(hashes: list[tuple[int, int]], max_bits: int = NEAR_DUP_BITS) -> list[tuple[int, int]]:
    """Pairs of items whose 64-bit hashes differ in at most ``max_bits`` bits.

    Pigeonhole over ``max_bits + 1`` bands: two hashes that close agree exactly on at
    least one band, so only items sharing a band value are compared - near-linear in the
    number of images instead of all pairs."""
    bands = max_bits + 1
    width = 64 // bands
    buckets: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for item, h in hashes:
        for b in range(bands):
            buckets[(b, (h >> (b * width)) & ((1 << width) - 1))].append((item, h))
    pairs = set()
    for members in buckets.values():
        if len(members) < 2:
            continue
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                (a, ha), (b, hb) = members[i], members[j]
                if a != b and bin(ha ^ hb).count("1") <= max_bits:
                    pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def _groups(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in {x for p in pairs for x in p}:
        groups[find(i)].append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _duplicate_findings(files: list[FileInfo], groups: list[list[int]], what: str) -> list[Finding]:
    out = []
    for g in groups:
        members = [files[i] for i in g]
        names = [f.path for f in members]
        labels = sorted({f.label for f in members})
        splits = sorted({f.split for f in members})
        if len(labels) > 1:
            out.append(Finding(f"{what}_conflicting_labels", "error",
                               f"{len(g)} {what.replace('_', ' ')} images with different labels ({', '.join(labels)})",
                               names))
        if len(splits) > 1:
            out.append(Finding(f"{what}_across_splits", "error",
                               f"{len(g)} {what.replace('_', ' ')} images in {' and '.join(splits)} (leakage)", names))
        if len(labels) == 1 and len(splits) == 1:
            out.append(Finding(f"{what}_within_class", "warning",
                               f"{len(g)} {what.replace('_', ' ')} images in class '{labels[0]}' ({splits[0]})", names))
    return out


def _outliers(files: list[FileInfo], attr: str, what: str) -> list[Finding]:
    values = Counter(getattr(f, attr) for f in files if getattr(f, attr))
    n = sum(values.values())
    if n < 10 or not values:
        return []
    common, top = values.most_common(1)[0]
    if top < DOMINANT_SHARE * n:
        return []
    out = []
    for value, count in values.items():
        if value != common and count <= max(1, OUTLIER_SHARE * n):
            names = [f.path for f in files if getattr(f, attr) == value]
            out.append(Finding(f"{what}_outlier", "warning",
                               f"{count} of {n} files {'are' if count > 1 else 'is'} {value} ({what}); "
                               f"{top} are {common}", names))
    return out


def _size_bucket(side: int) -> str:
    edges = [32, 64, 128, 256, 512, 1024, 2048]
    for lo, hi in zip([0] + edges, edges):
        if side < hi:
            return f"{lo}-{hi - 1}"
    return f">={edges[-1]}"


def _need_imagehash() -> None:
    try:
        import imagehash  # noqa: F401
    except ImportError:
        raise ImgclsError("the near-duplicate check needs the imagehash package",
                          "pip install 'imgcls[data]', or audit with --no-pixels") from None


def audit(data: ImageData, pixels: bool = True, workers: int | None = None,
          group_by: str | None = None) -> dict[str, Any]:
    """Audit ``data``: image files (folder / manifest splits) or arrays (.npz, named data sets).
    With ``group_by`` (a manifest column or path regex, data/groups.py) groups whose images
    sit in more than one split are findings too (leakage)."""
    if data.multi_label:  # its findings (conflicting labels, per-class outliers) assume one class per image
        raise ImgclsError(f"imgcls audit checks single-label data; {data.name} is multi-label (label sets)",
                          "audit a single-label copy (--task single where every image has one label), or skip it")
    parts = [getattr(data, s) for s in ("train", "val", "test") if getattr(data, s) is not None]
    if parts and all(p.in_memory for p in parts):
        report = audit_arrays(data, pixels)
    else:
        report = audit_files(data, pixels, workers)
    if group_by:
        add_group_findings(report, data, group_by)
    return report


def add_group_findings(report: dict[str, Any], data: ImageData, group_by: str) -> None:
    """Groups (``--group-by``) with images in two or more splits, as one error finding each."""
    from imgcls.data.groups import group_of, groups_across_splits

    spans = groups_across_splits(data, group_by)
    report["groups_across_splits"] = len(spans)
    named = {s: list(zip(getattr(data, s).paths, group_of(data, getattr(data, s), group_by)))
             for s in {s for _, ss in spans for s in ss}}
    for g, splits in spans:
        files = [str(p) for s in splits for p, gg in named[s] if gg == g]
        report["findings"].append(asdict(Finding("group_across_splits", "error",
                                                 f"group '{g}' ({group_by}) has images in {' and '.join(splits)} "
                                                 "(leakage)", files)))
    if spans:
        report["summary"]["group_across_splits"] = len(spans)
        report["clean"] = False


def audit_arrays(data: ImageData, pixels: bool = True) -> dict[str, Any]:
    """Audit in-memory images (``.npz``, named data sets): each image is named
    ``split[index]``; its bytes give the exact-duplicate hash, and (``pixels``) its
    grayscale standard deviation and, for images of at least 32 px, a dHash. Smaller
    images (28 px digits) get no near-duplicate check: at that size dHash's 8x8 gradient
    signs match across many different images of one digit (distinct 1s are "near
    identical"). All images of an array share one shape, so there are no per-image size,
    format or mode findings; the shape is in the report."""
    if pixels:
        _need_imagehash()
    files: list[FileInfo] = []
    side = 0
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        if part is None:
            continue
        x = part.images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8
        _, h, w, c = x.shape
        side = min(h, w)
        mode = "L" if c == 1 else "RGB"
        for i, (img, y) in enumerate(zip(x, part.labels.tolist())):
            f = FileInfo(path=f"{split}[{i}]", split=split, label=data.classes[y], bytes=img.nbytes,
                         sha256=hashlib.sha256(img.tobytes()).hexdigest(), format="array", mode=mode,
                         width=w, height=h)
            if pixels:
                gray = Image.fromarray(img[..., 0] if c == 1 else img).convert("L")
                f.std = float(np.asarray(gray, dtype=np.float32).std())
                f.dhash = _dhash(gray) if side >= TINY_SIDE else None
            files.append(f)
    return _report(data, files, pixels, sizes=False) | {"root": "", "shape": list(data.train.images.shape[1:])}


def audit_files(data: ImageData, pixels: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Audit the image files of ``data`` (folder or manifest splits); returns the report."""
    if pixels:
        _need_imagehash()
    files: list[FileInfo] = []
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        if part is None:
            continue
        if part.in_memory:
            raise ImgclsError(f"{data.name} mixes arrays and image files", "audit them separately")
        for p, y in zip(part.paths, part.labels.tolist()):
            files.append(FileInfo(path=str(p), split=split, label=data.classes[y]))
    infos = _inspect_all([f.path for f in files], pixels, workers)
    for f, info in zip(files, infos):
        for k, v in info.items():
            setattr(f, k, v)
    report = _report(data, files, pixels)
    report["passed_over"] = dict(Counter(why for _, _, why in data.passed_over))
    report["passed_over_files"] = [{"split": s, "path": str(p), "why": why} for s, p, why in data.passed_over]
    try:
        report["root"] = os.path.commonpath([os.path.dirname(f.path) for f in files]) if files else ""
    except ValueError:  # relative and absolute paths mixed
        report["root"] = ""
    return report


def _report(data: ImageData, files: list[FileInfo], pixels: bool, sizes: bool = True) -> dict[str, Any]:
    """Findings and statistics over inspected files (or array images)."""
    findings: list[Finding] = []
    for f in files:
        if f.error:
            findings.append(Finding("unreadable", "error", f"{f.error}", [f.path]))
    good = [f for f in files if not f.error]
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(files):
        if f.sha256 and f.bytes:
            by_sha[f.sha256].append(i)
    exact = [g for g in by_sha.values() if len(g) > 1]
    findings += _duplicate_findings(files, exact, "identical")
    if pixels:
        same = {i: g[0] for g in exact for i in g}  # collapse exact copies before near matching
        hashable = [(i, f.dhash) for i, f in enumerate(files)
                    if f.dhash is not None and not f.error and (f.std or 0) >= CONSTANT_STD and same.get(i, i) == i]
        near = [g for g in _groups(len(files), _near_pairs(hashable))]
        findings += _duplicate_findings(files, near, "near_identical")
    for f in good if sizes else []:
        short, long_ = min(f.width, f.height), max(f.width, f.height)
        if short < TINY_SIDE:
            findings.append(Finding("tiny", "warning", f"tiny image {f.width}x{f.height}", [f.path]))
        if short and long_ / short >= EXTREME_ASPECT:
            findings.append(Finding("extreme_aspect", "warning",
                                    f"extreme aspect ratio {f.width}x{f.height} ({long_ / short:.1f}:1)", [f.path]))
    for f in good:
        if f.std is not None and f.std < CONSTANT_STD:
            findings.append(Finding("nearly_constant", "warning",
                                    f"nearly constant image (gray std {f.std:.1f})", [f.path]))
    if sizes:
        findings += _outliers(good, "format", "format") + _outliers(good, "mode", "mode")

    counts: dict[str, dict[str, int]] = {}
    for f in files:
        counts.setdefault(f.split, {c: 0 for c in data.classes})[f.label] += 1
    train_counts = list(counts.get("train", {}).values())
    return {
        "data": data.name, "classes": data.classes, "files": len(files), "readable": len(good),
        "pixels_checked": pixels, "counts": counts, "imbalance_ratio": round(imbalance_ratio(train_counts), 3),
        "formats": dict(Counter(f.format for f in good).most_common()),
        "modes": dict(Counter(f.mode for f in good).most_common()),
        "shorter_side": dict(sorted(Counter(_size_bucket(min(f.width, f.height)) for f in good).items(),
                                    key=lambda kv: int(kv[0].split("-")[0].lstrip(">=")))),
        "findings": [asdict(x) for x in findings],
        "summary": dict(Counter(x.kind for x in findings)),
        "clean": not findings,
    }
