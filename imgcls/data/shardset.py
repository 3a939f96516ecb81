"""Shard sets: a data set written by ``imgcls shard`` as WebDataset tar shards or Parquet
files, plus an ``index.json`` (class names, counts per split, a sha256 per shard).

A shard set is named by a local folder, a brace pattern (``train-{000000..000099}.tar``,
webdataset's notation, expanded with ``braceexpand``) or a URL that fsspec opens
(``http(s)://``, ``s3://``, ``gs://`` with their fsspec packages). Its ``index.json`` sits
beside the shards. Reading is streaming: one shard at a time, front to back, in chunks
(:func:`read_chunks`), never a full local copy.

Which process reads what is index arithmetic on the shards' counts (:func:`assign`): the
shards of an epoch are split over (rank, loader worker) *units* so that every sample is
read by exactly one of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    import numpy as np

INDEX_NAME = "index.json"
INDEX_VERSION = 1
FORMATS = ("webdataset", "parquet")
ENCODINGS = ("encoded", "raw")
RAW_KEY = "npy"  # raw pixels in a WebDataset shard: one .npy (H, W, C) uint8 array per sample
RAW_COLUMN = "pixels"  # ... in a Parquet shard: fixed-size binary rows of H*W*C bytes
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
    # "encoded": image bytes (PNG/JPEG...); "raw": decoded uint8 pixels, every sample
    # ``raw_shape`` (height, width, channels), as the decode cache stores its rows
    encoding: str = "encoded"
    raw_shape: tuple[int, int, int] | None = None

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def label_of(self, stored: int) -> int:
        return self.label_map[stored] if self.label_map is not None else stored

    @classmethod
    def joined(cls, parts: list[ShardSplit], split: str = "all") -> ShardSplit:
        """The shards of ``parts`` (splits of one shard set) as one split, in order: every other
        field (format, encoding, raw shape, label map...) is the first part's, so a split made
        for prediction reads its shards exactly as training reads them."""
        first = parts[0]
        return dataclasses.replace(first, shards=[s for p in parts for s in p.shards], split=split)


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
            raw = index.get("encoding", "encoded") == "raw"
            out[split] = ShardSplit(shards, index["format"], split, where, encoding="raw" if raw else "encoded",
                                    raw_shape=tuple(int(v) for v in index["raw_shape"]) if raw else None)
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


class _Exact:
    """Exact-size reads over a stream that may return short reads (HTTP), in 1 MB blocks."""

    def __init__(self, f):
        self.f, self.buf, self.pos = f, b"", 0

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end <= len(self.buf):
            out = self.buf[self.pos:end]
            self.pos = end
            return out
        parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
        while have < n:
            b = self.f.read(max(1 << 20, n - have))
            if not b:
                break
            parts.append(b)
            have += len(b)
        data = b"".join(parts)
        self.buf, self.pos = data, min(n, len(data))
        return data[:n]


_ZERO_BLOCK = bytes(512)
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key up to the first dot


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 (sizes over 8 GB)
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def tar_files(f) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream, front to back.

    Hand-written rather than ``tarfile``'s stream mode (which webdataset's
    ``tar_file_iterator`` uses): the ustar/pax/GNU headers ``TarWriter`` and GNU tar write
    are parsed in a few slices: 11 vs 94 us a sample (a 32x32 PNG and its .cls; 3,000 samples,
    this 2-core machine), most of what reading small images cost. Raises
    EOFError on a truncated stream and tarfile.ReadError on a damaged header."""
    r = _Exact(f)
    pax: dict[str, str] = {}
    long_name = None
    while True:
        hdr = r.read(512)
        if not hdr or hdr == _ZERO_BLOCK:
            return  # end of the archive (tarfile stops at an empty read, too)
        if len(hdr) < 512:
            raise EOFError("unexpected end of data")
        if hdr[257:262] != b"ustar":
            raise tarfile.ReadError("invalid header (not a ustar/pax/GNU tar)")
        try:
            size = int(pax["size"]) if "size" in pax else _octal(hdr[124:136])
        except ValueError:
            raise tarfile.ReadError("invalid header (size)") from None
        kind = hdr[156:157]
        data = r.read(size)
        if len(data) < size:
            raise EOFError("unexpected end of data")
        pad = -size % 512
        if pad and len(r.read(pad)) < pad:
            raise EOFError("unexpected end of data")
        if kind == b"x":
            pax = _pax(data)
            continue
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"g":
            continue
        name = pax.get("path") or long_name
        if name is None:
            base = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{base}" if prefix else base
        pax, long_name = {}, None
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def tar_samples(f, on_member=None) -> Iterator[dict]:
    """webdataset's grouping: consecutive members sharing a key (the name up to the first
    dot of its base name) are one sample ``{"__key__": key, ext: bytes, ...}``."""
    cur: dict | None = None
    for name, data in tar_files(f):
        if on_member is not None:
            on_member(name)
        m = _KEY_RE.match(name)
        if not m or posixpath.basename(name).startswith("__"):
            continue
        key, ext = m.group(1), m.group(2).lower()
        if cur is None or key != cur["__key__"]:
            if cur is not None and len(cur) > 1:
                yield cur
            cur = {"__key__": key}
        if ext in cur:
            raise ValueError(f"{name}: duplicate file name in tar file")
        cur[ext] = data
    if cur is not None and len(cur) > 1:
        yield cur


def _tar_members(f, shard: ShardInfo) -> Iterator[Member]:
    last = [""]

    def seen(name: str) -> None:
        last[0] = name

    try:
        for sample in tar_samples(f, seen):
            yield _member(sample, shard)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        after = f"after member {last[0]}" if last[0] else "at its start"
        raise ShardError(f"shard {shard.name}: truncated or corrupt tar {after} ({type(exc).__name__}: "
                         f"{str(exc).split(' @ ')[0]})") from None


def _member(sample: dict, shard: ShardInfo) -> Member:
    key = sample["__key__"]
    ext = next((k for k in IMAGE_KEYS + (RAW_KEY,) if k in sample), None)
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


@dataclass
class Chunk:
    """Consecutive samples of one shard, for bulk reading (data/streaming.py). ``ordinal``:
    each sample's place among the shard's samples (problems included), from 0."""

    ordinal: "np.ndarray"  # int64 (n,)
    x: "np.ndarray"  # raw: uint8 (n, H, W, C); encoded: object array of bytes
    y: "np.ndarray"  # stored labels, int64 (n,)
    sources: list[str]
    names: list[str]  # "shard.tar:member" for messages
    problems: list[tuple[int, str]] = field(default_factory=list)  # (ordinal, why it cannot be used)


def _raw_row(data: bytes | None, nbytes: int) -> "np.ndarray | None":
    """The pixels of a raw member: a .npy of (H, W, C) uint8 (its data is the last ``nbytes``
    bytes, after the header: read without np.load's header parsing, ~10x faster)."""
    import numpy as np

    if data is None or len(data) < nbytes + 10 or not data.startswith(b"\x93NUMPY"):
        return None
    return np.frombuffer(data, np.uint8, count=nbytes, offset=len(data) - nbytes)


def _chunk_of(members: list[tuple[int, Member]], raw_shape, shard: ShardInfo) -> Chunk:
    import numpy as np

    good, problems = [], []
    nbytes = int(np.prod(raw_shape)) if raw_shape else 0
    for i, m in members:
        if m.problem:
            problems.append((i, m.problem))
        elif raw_shape is not None:
            row = _raw_row(m.image, nbytes)
            if row is None:
                problems.append((i, f"{m.name}: not a raw {'x'.join(map(str, raw_shape))} uint8 .npy member"))
            else:
                good.append((i, m, row))
        else:
            good.append((i, m, m.image))
    n = len(good)
    if raw_shape is not None:
        x = np.empty((n, *raw_shape), np.uint8)
        for k, (_, _, row) in enumerate(good):
            x[k].reshape(-1)[:] = row
    else:
        x = np.empty(n, object)
        x[:] = [g[2] for g in good]
    return Chunk(np.array([g[0] for g in good], np.int64), x, np.array([g[1].label for g in good], np.int64),
                 [g[1].source for g in good], [g[1].name for g in good], problems)


def _valid(a) -> "np.ndarray":
    """A pyarrow array's validity as a bool array, from its bitmap. pyarrow's own ``is_valid``,
    ``fill_null`` and ``to_numpy`` import pandas (~300 modules, 0.4 s per loader worker on 2
    cores, for nothing this reader uses), so the few things it needs are read from the buffers."""
    import numpy as np

    n = len(a)
    bitmap = a.buffers()[0]
    if bitmap is None or not a.null_count:
        return np.ones(n, bool)
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return bits[a.offset:a.offset + n].astype(bool)


def _ints(a, shard: str) -> "np.ndarray":
    """An integer pyarrow array's values (nulls read as whatever their slot holds) without pandas."""
    import numpy as np
    import pyarrow as pa

    if not pa.types.is_integer(a.type):
        raise ShardError(f"shard {shard}: labels of type {a.type}, not integers (re-write it with `imgcls shard`)")
    dt = np.dtype(f"{'i' if pa.types.is_signed_integer(a.type) else 'u'}{a.type.bit_width // 8}")
    return np.frombuffer(a.buffers()[1], dt)[a.offset:a.offset + len(a)]


def _parquet_chunks(data: bytes, shard: ShardInfo, raw_shape, sources: bool = True) -> Iterator[Chunk]:
    """Parquet row groups as chunks: raw pixels as one array per row group (no per-sample work)."""
    import io

    import numpy as np
    import pyarrow.parquet as pq

    col = RAW_COLUMN if raw_shape is not None else "image"
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        groups = pf.num_row_groups
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise ShardError(f"shard {shard.name}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    start = 0
    for g in range(groups):
        try:
            t = pf.read_row_group(g, columns=["key", col, "label"] + (["path"] if sources else []))
        except Exception as exc:
            raise ShardError(f"shard {shard.name}: row group {g} unreadable ({type(exc).__name__}: {exc})") from None
        n = t.num_rows
        keys = [str(k) for k in t.column("key").to_pylist()]
        img = t.column(col).combine_chunks()
        label = t.column("label").combine_chunks()
        bad = ~_valid(img) | ~_valid(label)
        y = np.where(bad, 0, _ints(label, shard.name)).astype(np.int64)
        if raw_shape is not None:
            nbytes = int(np.prod(raw_shape))
            if img.type.byte_width != nbytes:
                raise ShardError(f"shard {shard.name}: raw rows of {img.type.byte_width} bytes, index says "
                                 f"{'x'.join(map(str, raw_shape))}")
            x = np.frombuffer(img.buffers()[1], np.uint8)[img.offset * nbytes:(img.offset + n) * nbytes]
            x = x.reshape(n, *raw_shape)
        else:
            x = np.empty(n, object)
            x[:] = img.to_pylist()
        paths = t.column("path").to_pylist() if sources else keys
        ordinal = np.arange(start, start + n, dtype=np.int64)
        problems = [(start + int(i), f"{shard.name}:{keys[i]}: no image or label") for i in np.flatnonzero(bad)]
        ok = ~bad
        sel = np.flatnonzero(ok)
        yield Chunk(ordinal[ok], x[ok] if bad.any() else x, y[ok],
                    [str(paths[i] or keys[i]) for i in sel] if sources else [],
                    [f"{shard.name}:{keys[i]}" for i in sel] if raw_shape is None else [], problems)
        start += n


def read_chunks(shard: ShardInfo, split: "ShardSplit", verify: bool = True, size: int = 256,
                sources: bool = True) -> Iterator[Chunk]:
    """The samples of one shard, streamed front to back in chunks of about ``size`` samples
    (Parquet: one per row group; raw shards' pixels as one uint8 array per chunk). A shard
    that is missing, truncated or (``verify``, when the index has its sha256) not the one
    indexed raises ShardError naming it, after the chunks read before the damage."""
    raw_shape = split.raw_shape if split.encoding == "raw" else None
    try:
        f0 = open_url(shard.url)
    except FileNotFoundError:
        raise ShardError(f"shard {shard.name}: missing ({shard.url} not found)") from None
    except OSError as exc:
        raise ShardError(f"shard {shard.name}: cannot be opened ({type(exc).__name__}: {exc})") from None
    with f0:
        f = _Hashing(f0)
        try:
            if split.format == "parquet":
                yield from _parquet_chunks(f.read(), shard, raw_shape, sources)
            else:
                pending: list[tuple[int, Member]] = []
                try:
                    for i, m in enumerate(_tar_members(f, shard)):
                        pending.append((i, m))
                        if len(pending) == size:
                            yield _chunk_of(pending, raw_shape, shard)
                            pending = []
                except ShardError:  # the samples read before the damage, too
                    if pending:
                        yield _chunk_of(pending, raw_shape, shard)
                    raise
                if pending:
                    yield _chunk_of(pending, raw_shape, shard)
                f.drain()
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
