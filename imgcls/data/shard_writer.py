"""``imgcls shard``: write a data set (any source imgcls reads) as a shard set: WebDataset
tar shards (the ``webdataset`` package's TarWriter) or Parquet files (pyarrow; one row per
image: key, image bytes, label, path), and ``index.json`` (data/shardset.py).

Every image is decoded once while sharding (in loader workers), so an unreadable file is
found and reported here, not mid-training. Image bytes are kept as they are, or re-encoded
with their shorter side at most ``resize`` pixels (``--resize``: smaller shards, faster
first epochs). In-memory data (``.npz``, arrays) is written as lossless PNG. Samples are
shuffled (seeded) before they are cut into shards, so a shuffle buffer mixes classes.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from imgcls.data.decode import load_image, load_image_bytes
from imgcls.data.loaders import default_workers
from imgcls.data.records import ImageData, Split
from imgcls.data.shardset import (ENCODINGS, FORMATS, IMAGE_KEYS, INDEX_NAME, RAW_COLUMN, RAW_KEY, SUFFIX,
                                  ShardIndexWriter)
from imgcls.errors import ImgclsError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 10**3, "m": 10**6, "g": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """``512MB``, ``1.5GB``, ``64MiB`` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in UNITS or value <= 0:
        raise ImgclsError(f"--shard-size {text} is not a size", "e.g. --shard-size 512MB, 1GB or 64MiB")
    return int(value * UNITS[unit])


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _shrink(img: Image.Image, side: int | None) -> Image.Image:
    """Shorter side at most ``side`` (aspect kept; never enlarged)."""
    if side is None or min(img.size) <= side:
        return img
    w, h = img.size
    s = side / min(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)


def _npy(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(row), allow_pickle=False)
    return buf.getvalue()


ROW_GROUP_BYTES = 4 << 20


class _EncodeFiles(Dataset):
    """One image file -> (bytes, extension, "") or (b"", "", reason): decoded once to check it
    (and to re-encode it with ``resize``). ``raw``: the decode cache's row instead (shorter
    side to ``resize``, centre square; (H, W, C) uint8 pixels, extension "npy")."""

    def __init__(self, paths: list[Path], channels: int, resize: int | None, jpeg: bool, raw: bool = False):
        self.paths, self.channels, self.resize, self.jpeg, self.raw = paths, channels, resize, jpeg, raw

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[bytes | np.ndarray, str, str]:
        from imgcls.data.cache import CacheSpec
        from imgcls.errors import ImgclsError as Err

        path = self.paths[i]
        ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        try:
            if self.raw:
                row = CacheSpec(side=self.resize, channels=self.channels).decode(path)
                return row.permute(1, 2, 0).contiguous().numpy(), RAW_KEY, ""
            if self.resize is None and ext in IMAGE_KEYS:
                data = path.read_bytes()
                load_image_bytes(data, str(path), self.channels)  # refuse what training could not decode
                return data, ext, ""
            img = load_image(path, self.channels, min_side=self.resize)
            fmt = "JPEG" if self.jpeg else "PNG"
            return _encode(_shrink(img, self.resize), fmt), "jpg" if self.jpeg else "png", ""
        except (Err, OSError) as exc:
            return b"", "", exc.oneline() if isinstance(exc, Err) else f"{path}: {exc}"


def _first(batch):
    return batch[0]


def _samples(split: Split, order: list[int], data: ImageData, resize: int | None,
             workers: int | None, raw: bool = False) -> Iterator[tuple[int, bytes | np.ndarray, str, str, str]]:
    """(index in the split, image bytes, extension, source, problem) in ``order``; ``raw``:
    (H, W, C) uint8 pixels instead of bytes."""
    if split.in_memory:
        for i in order:
            x = split.images[i]
            arr = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
            img = Image.fromarray(np.ascontiguousarray(arr))
            if resize is not None and img.size != (resize, resize):
                img = img.resize((resize, resize), Image.Resampling.BICUBIC)
            if raw:
                a = np.asarray(img)
                yield i, a[:, :, None] if a.ndim == 2 else a, RAW_KEY, f"{data.name}[{i}]", ""
            else:
                yield i, _encode(img, "PNG"), "png", f"{data.name}[{i}]", ""
        return
    paths = [split.paths[i] for i in order]
    ds = _EncodeFiles(paths, data.channels, resize, jpeg=data.channels == 3, raw=raw)
    n = default_workers() if workers is None else workers
    loader = DataLoader(ds, batch_size=1, num_workers=min(n, len(ds)), collate_fn=_first, prefetch_factor=8 if n else None)
    for i, p, (blob, ext, problem) in zip(order, paths, loader):
        yield i, blob, ext, str(p), problem


class _Shards:
    """Rolls over to a new shard file when the current one reaches ``size`` bytes."""

    def __init__(self, out: Path, split: str, fmt: str, size: int, index: ShardIndexWriter):
        self.out, self.split, self.fmt, self.size, self.index = out, split, fmt, size, index
        self.n, self.count, self.bytes, self.tar, self.rows = 0, 0, 0, None, []
        self.with_json = True
        self.raw_shape: tuple[int, ...] | None = None

    def path(self) -> Path:
        return self.out / f"{self.split}-{self.n:06d}{SUFFIX[self.fmt]}"

    def add(self, key: str, blob: bytes, ext: str, label: int, source: str, class_name: str) -> None:
        raw = isinstance(blob, np.ndarray)
        if raw:
            self.raw_shape = tuple(int(v) for v in blob.shape)
        if self.fmt == "parquet":
            self.rows.append((key, blob.tobytes() if raw else blob, label, source))
        else:
            blob = _npy(blob) if raw else blob
            if self.tar is None:
                from webdataset import TarWriter

                self.tar = TarWriter(str(self.path()))
            sample = {"__key__": key, ext: blob, "cls": label}
            if self.with_json:  # files: their path (arrays: the key is the row; one tar member less to parse)
                sample["json"] = {"path": source, "label": class_name, "index": int(key)}
            self.tar.write(sample)
        self.count += 1
        self.bytes += (len(blob) if isinstance(blob, bytes) else blob.nbytes) + 1536  # (tar headers)
        if self.bytes >= self.size:
            self.close()

    def close(self) -> None:
        if not self.count:
            return
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            k, b, y, s = zip(*self.rows)
            col = (RAW_COLUMN, pa.array(b, pa.binary(int(np.prod(self.raw_shape))))) if self.raw_shape \
                else ("image", pa.array(b, pa.binary()))
            table = pa.table({"key": list(k), col[0]: col[1], "label": pa.array(y, pa.int64()), "path": list(s)})
            # row groups of ~4 MB (64-1024 rows): a reader's first batch waits for one group and
            # holds one in memory; 1,024 rows of 256 px photos would be 200 MB
            row_bytes = max(1, sum(map(len, b)) // len(b))  # every row's image is bytes here
            pq.write_table(table, self.path(), row_group_size=max(64, min(1024, ROW_GROUP_BYTES // row_bytes)))
            self.rows = []
        else:
            self.tar.close()
            self.tar = None
        self.index.add_shard(self.split, self.path(), self.count)
        self.n, self.count, self.bytes = self.n + 1, 0, 0


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ImgclsError(f"--out {out} is not empty", "choose a new folder, or pass --overwrite")
        if not (out / INDEX_NAME).is_file():
            raise ImgclsError(f"--out {out} is not empty and holds no shard index: not overwriting it",
                              "choose a new folder")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImgclsError(f"cannot create --out {out}: {exc.strerror}", "choose another folder") from None


def _meta(data: ImageData, resize: int | None, source: str) -> dict:
    from imgcls.data.pipeline import data_stats

    meta = {"name": data.name, "source": source, "classes": data.classes, "kind": data.kind,
            "channels": data.channels, "native_size": resize if resize and data.native_size else data.native_size,
            "resize": resize, "shuffled": True}
    if data.train is not None and data.train.in_memory:  # normalisation statistics, as training computes them
        meta["stats"] = {str(c): dict(zip(("mean", "std"), data_stats(data.train.images, c))) for c in (1, 3)}
    return meta


def write_shards(data: ImageData, out: str | Path, *, fmt: str = "webdataset", shard_size: int = 512 * 10**6,
                 resize: int | None = None, workers: int | None = None, seed: int = 0, overwrite: bool = False,
                 source: str = "", encoding: str | None = None) -> dict:
    """Write every split of ``data`` to ``out`` as shards + ``index.json``; returns the index.
    ``encoding``: "encoded" (image bytes) or "raw" (decoded uint8 pixels, as the decode
    cache stores them: no decoding when training reads them); default raw with ``resize``."""
    if fmt not in FORMATS:
        raise ImgclsError(f"--format {fmt} is not a shard format", f"use one of {', '.join(FORMATS)}")
    if resize is not None and resize < 8:
        raise ImgclsError(f"--resize {resize} is too small", "give the shorter side in pixels, e.g. --resize 256")
    encoding = encoding or ("raw" if resize is not None else "encoded")
    if encoding not in ENCODINGS:
        raise ImgclsError(f"--encoding {encoding} is not a shard encoding", f"use one of {', '.join(ENCODINGS)}")
    raw = encoding == "raw"
    files = any(s is not None and not s.in_memory for s in (data.train, data.val, data.test))
    if raw and files and resize is None:
        raise ImgclsError("--encoding raw needs --resize for image files (raw rows are all one size)",
                          "add --resize S (the decode cache's side: img_size / 0.875, e.g. 256 for 224)")
    out = Path(out)
    _prepare_out(out, overwrite)
    index = ShardIndexWriter(fmt, _meta(data, resize, source))
    index.meta["encoding"] = encoding
    skipped = []
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if split is None or not len(split):
            continue
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
        shards = _Shards(out, name, fmt, shard_size, index)
        shards.with_json = not split.in_memory
        counts = [0] * data.num_classes
        for i, blob, ext, src, problem in _samples(split, order, data, resize, workers, raw):
            if problem:
                skipped.append({"split": name, "path": src, "reason": problem})
                continue
            label = int(split.labels[i])
            shards.add(f"{i:08d}", blob, ext, label, src, data.classes[label])
            counts[label] += 1
        shards.close()
        if shards.raw_shape is not None:
            index.meta["raw_shape"] = list(shards.raw_shape)
        if name in index.splits:
            index.splits[name]["class_counts"] = counts
    if skipped:
        index.meta["skipped"] = skipped
        print(f"imgcls: skipped {len(skipped)} unreadable file(s), listed in {out / INDEX_NAME}; first: "
              f"{skipped[0]['reason']}", file=sys.stderr)
    return index.write(out)
