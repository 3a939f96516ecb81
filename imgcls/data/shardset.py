"""Shard sets: a data set written by ``imgcls shard`` as WebDataset tar shards or Parquet
files, plus an ``index.json`` (class names, counts per split, a sha256 per shard).

A shard set is named by a local folder, a brace pattern (``train-{000000..000099}.tar``,
webdataset's notation, expanded with ``braceexpand``) or a URL that fsspec opens
(``http(s)://``, ``s3://``, ``gs://`` with their fsspec packages). Its ``index.json`` sits
beside the shards. Reading is streaming: one shard at a time, front to back
(:func:`read_shard`), never a full local copy.

Which process reads what is index arithmetic on the shards' counts (:func:`assign`): the
shards of an epoch are split over (rank, loader worker) *units* so that every sample is
read by exactly one of them.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls.errors import ImgclsError

INDEX_NAME = "index.json"
INDEX_VERSION = 1
FORMATS = ("webdataset", "parquet")
SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pbm", "avif", "heic",
              "heif", "jxl", "ico")


@dataclass(frozen=True)
class ShardInfo:
    url: str  # where the shard is read from (path or URL)
    name: str  # its file name, as the index lists it
    count: int  # samples in it
    sha256: str | None = None
    bytes: int | None = None


@dataclass
class ShardSplit:
    """One split of a shard set: what ``Split.shards`` holds for streamed data."""

    shards: list[ShardInfo]
    format: str = "webdataset"
    split: str = "train"
    where: str = ""  # the shard set as the user named it (for messages)
    label_map: list[int] | None = None  # stored label -> class index (a relabelled class list)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def label_of(self, stored: int) -> int:
        return self.label_map[stored] if self.label_map is not None else stored


# ---------------------------------------------------------------------- naming a shard set
def _is_url(text: str) -> bool:
    return "://" in text


def is_shard_spec(spec: Any) -> bool:
    """Whether ``spec`` names a shard set: a folder with an ``index.json``, that file, a
    brace pattern, a ``.tar`` / ``.parquet`` shard or a URL."""
    if not isinstance(spec, (str, Path)):
        return False
    text = str(spec)
    if _is_url(text) and not text.startswith("file://"):
        return True
    text = text.removeprefix("file://")
    p = Path(text).expanduser()
    if p.is_dir():
        return (p / INDEX_NAME).is_file()
    if p.name == INDEX_NAME:
        return True
    return ("{" in text and ".." in text) or p.suffix.lower() in (".tar", ".parquet")


def _join(base: str, name: str) -> str:
    return posixpath.join(base, name) if _is_url(base) else str(Path(base) / name)


def _dirname(text: str) -> str:
    return posixpath.dirname(text) if _is_url(text) else str(Path(text).parent)


def _locate(spec: str) -> tuple[str, list[str] | None]:
    """(the shard set's folder or URL prefix, the shard names a pattern selects or None: all)."""
    text = str(spec).removeprefix("file://")
    if not _is_url(text):
        text = str(Path(text).expanduser())
    if text.rstrip("/").endswith(INDEX_NAME):
        return _dirname(text.rstrip("/")), None
    if ("{" in text and ".." in text) or text.lower().endswith((".tar", ".parquet")):
        from braceexpand import braceexpand

        names = [posixpath.basename(u) if _is_url(u) else Path(u).name for u in braceexpand(text)]
        return _dirname(text), names
    return text.rstrip("/") if _is_url(text) else text, None


def storage_options(url: str) -> dict:
    """fsspec options: HTTP is read as one stream (``block_size=0``: no range requests, which
    plain servers such as ``python -m http.server`` do not answer; a shard is read front to
    back anyway), and reads time out (a dead server is an error, never a hang)."""
    if url.startswith(("http://", "https://")):
        import aiohttp

        return {"block_size": 0,
                "client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)}}
    return {}


def open_url(url: str):
    """An fsspec file object (a context manager) for ``url``: a local path or any URL fsspec knows."""
    import fsspec

    try:
        return fsspec.open(url, "rb", **storage_options(url)).open()
    except ImportError as exc:  # e.g. s3:// without s3fs
        raise ImgclsError(f"cannot open {url}: {exc}".splitlines()[0], "pip install the fsspec package for it "
                          "(s3fs, gcsfs, aiohttp)") from None


def load_index(spec: str | Path) -> tuple[dict, str, list[str] | None]:
    """The shard set's index, its folder / URL prefix and the shard names a pattern selects."""
    base, names = _locate(str(spec))
    url = _join(base, INDEX_NAME)
    try:
        with open_url(url) as f:
            index = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError) as exc:
        raise ImgclsError(f"no shard index at {url} ({type(exc).__name__}: {exc})".splitlines()[0],
                          "give a folder or URL written by `imgcls shard` (it holds index.json beside the shards)"
                          ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImgclsError(f"{url} is not a shard index: {exc}", "re-write the shards with `imgcls shard`") from None
    if not isinstance(index, dict) or index.get("format") not in FORMATS or "splits" not in index:
        raise ImgclsError(f"{url} is not an imgcls shard index", "re-write the shards with `imgcls shard`")
    return index, base, names


def shard_splits(index: dict, base: str, names: list[str] | None, where: str) -> dict[str, ShardSplit]:
    """Each split of the index as a :class:`ShardSplit` (only the shards ``names`` lists, when given)."""
    known = {s["name"] for part in index["splits"].values() for s in part["shards"]}
    missing = [n for n in (names or []) if n not in known]
    if missing:
        raise ImgclsError(f"shard {missing[0]} is not in {_join(base, INDEX_NAME)}",
                          "check the pattern against the shard names in index.json")
    out = {}
    for split, part in index["splits"].items():
        shards = [ShardInfo(_join(base, s["name"]), s["name"], int(s["count"]), s.get("sha256"), s.get("bytes"))
                  for s in part["shards"] if names is None or s["name"] in names]
        if shards:
            out[split] = ShardSplit(shards, index["format"], split, where)
    return out


def from_shards(spec: str | Path, classes: list[str] | None = None):
    """A shard set as :class:`~imgcls.data.records.ImageData`: streamed splits (``Split.shards``)
    whose ``labels`` are the class counts of the index laid out in class order (a stream's
    own order is its shards'). ``classes`` fixes the class list and order."""
    import torch

    from imgcls.data.records import ImageData, Split, ordered_classes

    index, base, names = load_index(spec)
    splits = shard_splits(index, base, names, str(spec))
    found = [str(c) for c in index["classes"]]
    want = ordered_classes(found, classes, f"{spec} has class(es)", "re-write the shards without them")
    mapping = None if want == found else [want.index(c) for c in found]
    parts = {}
    for name, part in splits.items():
        counts = index["splits"][name].get("class_counts")
        if names is not None or counts is None:  # a pattern's subset: counts of the classes are unknown
            counts = [part.count] + [0] * (len(found) - 1)
        stored = torch.repeat_interleave(torch.arange(len(found)), torch.tensor(counts, dtype=torch.long))
        part.label_map = mapping
        labels = torch.tensor(mapping, dtype=torch.long)[stored] if mapping else stored
        parts[name] = Split(labels=labels, shards=part)
    notes = [f"streamed from {len(s.shards)} {index['format']} shard(s) of {name}" for name, s in splits.items()]
    data = ImageData(classes=want, train=parts.get("train"), val=parts.get("val"), test=parts.get("test"),
                     name=str(index.get("name", "shards")), channels=int(index.get("channels", 3)),
                     native_size=index.get("native_size"), kind=index.get("kind", "photos"), notes=notes,
                     stats=index.get("stats"))
    return data


# ---------------------------------------------------------------------- who reads what
@dataclass(frozen=True)
class Unit:
    """Samples ``part``, ``part + parts``, ... of one shard (``parts`` 1: all of it). A shard
    is cut into parts only when there are fewer shards than readers."""

    shard: int
    part: int = 0
    parts: int = 1

    def count(self, shards: list[ShardInfo]) -> int:
        n = shards[self.shard].count
        return max(0, -(-(n - self.part) // self.parts))


def _balanced(units: list[Unit], shards: list[ShardInfo], bins: int) -> list[list[Unit]]:
    """Greedy longest-first packing of ``units`` into ``bins`` of near-equal sample counts
    (ties keep the given, shuffled order)."""
    out: list[list[Unit]] = [[] for _ in range(bins)]
    load = [0] * bins
    for u in sorted(units, key=lambda u: -u.count(shards)):
        b = min(range(bins), key=lambda i: (load[i], i))
        out[b].append(u)
        load[b] += u.count(shards)
    return out


def assign(shards: list[ShardInfo], world: int, workers: int, seed: int = 0, epoch: int = 0,
           shuffle: bool = False) -> list[list[list[Unit]]]:
    """``[rank][worker] -> units``: every sample of ``shards`` in exactly one unit of one
    (rank, worker). The same on every process (a function of the arguments only); shuffled
    per (seed, epoch) when ``shuffle``."""
    readers = world * max(1, workers)
    parts = max(1, -(-readers // max(1, len(shards))))
    units = [Unit(i, p, parts) for i in range(len(shards)) for p in range(parts)]
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(units)
    per_rank = _balanced(units, shards, world)
    return [_balanced(mine, shards, max(1, workers)) for mine in per_rank]


def batches_of(units: list[Unit], shards: list[ShardInfo], batch_size: int) -> int:
    n = sum(u.count(shards) for u in units)
    return -(-n // batch_size)


# ---------------------------------------------------------------------- reading one shard
class ShardError(Exception):
    """A shard that cannot be read (missing, truncated, checksum); its message names it."""


class _Hashing:
    """A file object that hashes what is read through it (the sha256 check while streaming)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.h.update(b)
        self.n += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class Member:
    key: str  # the sample's key in the shard
    name: str  # "shard.tar:member" for messages
    image: bytes | None
    label: int | None
    source: str = ""  # the original file / array row it came from
    problem: str | None = None  # why the sample cannot be used (no image, no label)


def _tar_members(f, shard: ShardInfo) -> Iterator[Member]:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    last = [""]

    def files():
        for item in tar_file_iterator(f):
            last[0] = item["fname"]
            item["__url__"] = shard.url
            yield item

    try:
        for sample in group_by_keys(files()):
            yield _member(sample, shard)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        after = f"after member {last[0]}" if last[0] else "at its start"
        raise ShardError(f"shard {shard.name}: truncated or corrupt tar {after} ({type(exc).__name__}: "
                         f"{str(exc).split(' @ ')[0]})") from None


def _member(sample: dict, shard: ShardInfo) -> Member:
    key = sample["__key__"]
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    name = f"{shard.name}:{key}.{ext or '?'}"
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"])
        except ValueError:
            label = None
    problem = None if ext is not None else f"{shard.name}:{key}: no image member (.jpg, .png, ...)"
    if problem is None and label is None:
        problem = f"{name}: no integer .cls label"
    source = str(meta["path"]) if "path" in meta else f"{shard.name}:{key}"
    return Member(key, name, sample.get(ext) if ext else None, label, source, problem)


def _parquet_members(data: bytes, shard: ShardInfo) -> Iterator[Member]:
    import io

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data), columns=["key", "image", "label", "path"])
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise ShardError(f"shard {shard.name}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    for key, image, label, path in zip(*(table.column(c).to_pylist() for c in ("key", "image", "label", "path"))):
        yield Member(str(key), f"{shard.name}:{key}", image, label, str(path or key),
                     None if image is not None and label is not None else f"{shard.name}:{key}: no image or label")


def read_shard(shard: ShardInfo, fmt: str, verify: bool = True) -> Iterator[Member]:
    """The samples of one shard, streamed front to back. A shard that is missing, truncated
    or (``verify``, when the index has its sha256) not the one indexed raises ShardError
    naming it (after the samples read before the damage)."""
    try:
        raw = open_url(shard.url)
    except FileNotFoundError:
        raise ShardError(f"shard {shard.name}: missing ({shard.url} not found)") from None
    except OSError as exc:
        raise ShardError(f"shard {shard.name}: cannot be opened ({type(exc).__name__}: {exc})") from None
    with raw:
        f = _Hashing(raw)
        try:
            if fmt == "parquet":  # Parquet's footer is at its end: a Parquet shard is read whole
                yield from _parquet_members(f.read(), shard)
            else:
                yield from _tar_members(f, shard)
                f.drain()  # the tar's end blocks count towards its checksum
        except FileNotFoundError:
            raise ShardError(f"shard {shard.name}: missing ({shard.url} not found)") from None
        except OSError as exc:
            raise ShardError(f"shard {shard.name}: read failed ({type(exc).__name__}: {exc})") from None
        digest = f.h.hexdigest()
    if verify and shard.sha256 and digest != shard.sha256:
        raise ShardError(f"shard {shard.name}: sha256 mismatch (index {shard.sha256[:12]}..., read {digest[:12]}... "
                         f"in {f.n} bytes): changed or damaged since `imgcls shard` wrote it")


@dataclass
class ShardIndexWriter:
    """Builds ``index.json`` while shards are written (see data/shard_writer.py)."""

    fmt: str
    meta: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, dict] = field(default_factory=dict)

    def add_shard(self, split: str, path: Path, count: int) -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        part = self.splits.setdefault(split, {"count": 0, "shards": []})
        part["shards"].append({"name": path.name, "count": count, "bytes": path.stat().st_size,
                               "sha256": h.hexdigest()})
        part["count"] += count

    def write(self, out: Path) -> dict:
        index = {"format": self.fmt, "version": INDEX_VERSION, **self.meta, "splits": self.splits}
        tmp = out / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(out / INDEX_NAME)
        return index
