"""Decode once: a disk cache of decoded, resized uint8 images.

Decoding a JPEG costs far more than everything else a data pipeline does to it, yet a
classic ``ImageFolder`` + ``DataLoader`` pays it on every epoch. Here each image file is
decoded once (in parallel workers), resized to a square a little larger than the model's
input (``CacheSpec``: shorter side -> ``img_size / crop_pct``, centre square) and stored
as raw uint8 rows in a memory-mapped file. Later epochs (and later runs, evaluation, the
transfer helper's feature extraction) read tensors straight from it; random-resized-crop
augmentation then runs on whole batches of those tensors (``BatchResizedCrop``).

Layout: ``<root>/<spec key>/``, root = ``IMGCLS_DECODE_CACHE_DIR``, else
``<IMGCLS_CACHE_DIR or ~/.cache/imgcls>/decoded``:
  ``images.u8``  rows of S*S*C bytes (height, width, channel: the channels_last layout the
                model and the uint8 resize kernels run in), append-only (old rows stay valid
                while others read)
  ``index.json`` ``{"<real path>\\t<size>\\t<mtime_ns>": row}``
A file is found again by its path, byte size and modification time (the quick check
make and rsync use): hashing every file's content on every run would read the whole
data set each time. Editing or replacing a file changes its key, so it is decoded again.
Files that fail to decode are not cached: they are retried (and reported) on every run.

Center-cropping a cached image to ``img_size`` gives exactly what
``Preprocessing.pil_transform`` gives for the file, so evaluation from the cache and
prediction from files agree.

16-bit models (``Preprocessing.bit_depth == 16``) keep 2-byte rows (uint16). Multi-frame
DICOM files give one row per frame with ``frames="all"`` (keys ``... \t#<frame>``).

The cache root holds a ``CACHEDIR.TAG`` marker (the Cache Directory Tagging convention,
which backup tools such as ``tar --exclude-caches`` honour). ``imgcls cache --prune`` and
``--clear`` refuse a folder without it, so a mistyped ``--dir ~`` deletes nothing.
Deleting the folder is always safe; it only costs one decode pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgcls.data.decode import UnreadableImage, frame_count, load_image, path_problem
from imgcls.data.download import cache_dir
from imgcls.data.records import Split
from imgcls.data.transforms import Preprocessing
from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    from torchvision.transforms import v2

CACHE_FORMAT = 3  # bump when the stored bytes would change for the same spec (2: rows stored HWC; 3: intensity)
MARKER = "CACHEDIR.TAG"
MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
               "# This file is a cache directory tag created by imgcls (decoded images).\n"
               "# For information about cache directory tags, see https://bford.info/cachedir/\n")
_KEY = re.compile(r"^v(\d+)-(squash|shorter_side)-(\d+)px-(\d+)ch-(.+?)-(8|16)bit-(first|all)-i(.+)$")
_ANY_KEY = re.compile(r"^v\d+-")  # a cache folder of any format version (older ones are pruned)


@dataclass(frozen=True)
class CacheSpec:
    """What one cached image is: ``channels`` x ``side`` x ``side`` uint8."""

    side: int
    channels: int
    resize: str = "shorter_side"  # shorter_side: resize shorter side, centre square; squash: side x side
    interpolation: str = "bilinear"
    intensity: str = "auto"  # high bit depth -> model input (imgcls.data.intensity)
    bit_depth: int = 8  # 8: uint8 rows; 16: uint16 rows
    frames: str = "first"  # multi-frame DICOM: first frame, or one row per frame

    @classmethod
    def for_preprocessing(cls, pre: Preprocessing) -> CacheSpec:
        side = int(round(pre.img_size / pre.crop_pct)) if pre.resize == "shorter_side" else pre.img_size
        return cls(side=side, channels=pre.in_chans, resize=pre.resize, interpolation=pre.interpolation,
                   intensity=pre.intensity, bit_depth=pre.bit_depth, frames=pre.frames)

    @property
    def key(self) -> str:
        intensity = self.intensity.replace(":", "_", 1)
        return (f"v{CACHE_FORMAT}-{self.resize}-{self.side}px-{self.channels}ch-{self.interpolation}-"
                f"{self.bit_depth}bit-{self.frames}-i{intensity}")

    @classmethod
    def from_key(cls, key: str) -> CacheSpec | None:
        """The inverse of :attr:`key` (None: not a key, or one of an older cache format)."""
        m = _KEY.match(key)
        if not m or int(m.group(1)) != CACHE_FORMAT:
            return None
        spec = cls(side=int(m.group(3)), channels=int(m.group(4)), resize=m.group(2), interpolation=m.group(5),
                   bit_depth=int(m.group(6)), frames=m.group(7), intensity=m.group(8).replace("_", ":", 1))
        return spec if spec.key == key else None

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint16 if self.bit_depth == 16 else torch.uint8

    @property
    def row_bytes(self) -> int:
        return self.channels * self.side * self.side * (self.bit_depth // 8)

    def preprocessing(self) -> Preprocessing:
        """A Preprocessing whose eval transform gives exactly this cache's rows."""
        return Preprocessing(img_size=self.side, in_chans=self.channels, mean=(0.0,) * self.channels,
                             std=(1.0,) * self.channels, resize=self.resize, crop_pct=1.0,
                             interpolation=self.interpolation, intensity=self.intensity, bit_depth=self.bit_depth,
                             frames=self.frames)

    def transform(self) -> v2.Compose:
        return self.preprocessing().pil_transform()

    def decode(self, path: Path, frame: int = 0) -> torch.Tensor:
        """One file (one frame of it) -> (C, side, side) uint8 or uint16. Raises ImgclsError naming the file."""
        img = load_image(path, self.channels, min_side=self.side, square=self.resize == "squash", frame=frame)
        return self.transform()(img)


def decode_min_side(pre: Preprocessing) -> int | None:
    """The shorter side a JPEG may be decoded down to for ``pre`` (Pillow's draft: 1/2, 1/4
    or 1/8 scale) wherever an image reaches a model outside the cache - prediction from
    files, uploads to the server: the cache's stored side for photo-style (shorter-side)
    preprocessing, as the cache decodes, else None (full size)."""
    return CacheSpec.for_preprocessing(pre).side if pre.resize == "shorter_side" else None


def file_key(path: Path) -> str:
    """``realpath \\t size \\t mtime_ns \\t ctime_ns``; raises OSError when the file cannot be
    stat'ed. The change time catches edits that keep size and mtime (``cp -p``, ``rsync -t``,
    ``exiftool -P``, ``touch -r``): no tool can set it back. It also moves on ``chmod`` or a
    rename, which costs one decode more, never a stale image."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}"


# ----------------------------------------------------------------------------- parallel decode
class _DecodeFiles(Dataset):
    def __init__(self, paths: Sequence[Path], spec: CacheSpec, frames: Sequence[int] | None = None):
        self.paths, self.spec = paths, spec
        self.frames = frames if frames is not None else [0] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.spec.decode(self.paths[i], self.frames[i]), ""
        except UnreadableImage as exc:  # reported to the main process, never a dead worker
            return i, None, exc.reason


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # each worker decodes one image at a time: no oversubscription


def decode_workers(requested: int | None, n_files: int) -> int:
    """Worker processes for decoding: one per core (decoding is CPU-bound and Pillow
    releases no parallelism of its own), none for a handful of files, where starting
    processes costs more than it saves."""
    if requested is not None:
        return max(0, requested)
    return 0 if n_files < 64 else min(os.cpu_count() or 1, 8)


def decode_files(paths: Sequence[Path], spec: CacheSpec, workers: int | None = None,
                 frames: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor | None, str]]:
    """Yield ``(i, image or None, error)`` for every path (its frame ``frames[i]``), in completion order."""
    n_workers = decode_workers(workers, len(paths))
    files = _DecodeFiles(paths, spec, frames)
    if n_workers == 0:
        yield from (files[i] for i in range(len(paths)))
        return
    loader = DataLoader(files, batch_size=8, num_workers=n_workers,
                        collate_fn=list, worker_init_fn=_one_thread, prefetch_factor=4)
    for batch in loader:
        yield from batch


# ----------------------------------------------------------------------------- stores
class MemoryStore:
    """Decoded rows in RAM for this process only (``cache=False``)."""

    def __init__(self, spec: CacheSpec):
        self.spec = spec
        self._rows: list[torch.Tensor] = []
        self.index: dict[str, int] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        yield

    def append(self, images: list[torch.Tensor], keys: list[str]) -> None:
        for img, key in zip(images, keys):
            self.index[key] = len(self._rows)
            self._rows.append(img)

    def tensor(self) -> torch.Tensor:
        s = self.spec
        if not self._rows:
            return torch.empty(0, s.channels, s.side, s.side, dtype=s.dtype)
        return torch.stack(self._rows).contiguous(memory_format=torch.channels_last)  # as DiskStore's


class DiskStore:
    """``images.u8`` + ``index.json`` in one folder per CacheSpec (see the module doc)."""

    def __init__(self, root: Path, spec: CacheSpec):
        self.spec = spec
        self.dir = Path(root) / spec.key
        self.data_path = self.dir / "images.u8"
        self.index_path = self.dir / "index.json"
        self.index: dict[str, int] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise runs sharing the cache (two trainings at once on the same folder)."""
        try:
            mark_cache_root(self.dir.parent)
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.dir / "lock", "a+")
        except OSError as exc:
            raise self._error(exc) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.index = self._read_index()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self) -> dict[str, int]:
        rows = self._rows_on_disk()
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {}  # absent or damaged: decode again (the data file is only appended to)
        return {k: v for k, v in index.items() if isinstance(v, int) and 0 <= v < rows}

    def _rows_on_disk(self) -> int:
        try:
            return self.data_path.stat().st_size // self.spec.row_bytes
        except OSError:
            return 0

    def _error(self, exc: OSError) -> ImgclsError:
        return ImgclsError(f"cannot write the decode cache in {self.dir}: {exc.strerror or exc}",
                           "free disk space, point IMGCLS_CACHE_DIR elsewhere, or train with --no-cache")

    def append(self, images: list[torch.Tensor], keys: list[str]) -> None:
        if not images:
            return
        start = self._rows_on_disk()
        try:
            with open(self.data_path, "ab") as f:
                f.truncate(start * self.spec.row_bytes)  # drop a partial row a crash may have left
                for img in images:  # (C, S, S) -> HWC bytes
                    f.write(img.permute(1, 2, 0).contiguous().numpy().tobytes())
            self.index.update({k: start + i for i, k in enumerate(keys)})
            tmp = self.index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.index))
            os.replace(tmp, self.index_path)
        except OSError as exc:
            raise self._error(exc) from None

    def tensor(self) -> torch.Tensor:
        s = self.spec
        rows = self._rows_on_disk()
        if rows == 0:
            return torch.empty(0, s.channels, s.side, s.side, dtype=s.dtype)
        # copy-on-write mapping: pages come from the OS page cache, nothing is read up front
        arr = np.memmap(self.data_path, dtype=np.uint16 if s.bit_depth == 16 else np.uint8, mode="c",
                        shape=(rows, s.side, s.side, s.channels))
        return torch.from_numpy(arr).permute(0, 3, 1, 2)  # (N, C, S, S), channels_last strides


def cache_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("IMGCLS_DECODE_CACHE_DIR") or cache_dir() / "decoded")


def open_store(spec: CacheSpec, cache: bool = True, root: str | Path | None = None) -> DiskStore | MemoryStore:
    if not cache:
        return MemoryStore(spec)  # per call: nothing outlives the split that uses it
    return DiskStore(cache_root(root), spec)


# ----------------------------------------------------------------------------- maintenance
def mark_cache_root(root: Path) -> None:
    """Write the marker into ``root`` (created if needed) when it holds nothing but cache
    folders: a new cache, or one written before the marker existed. A folder with other
    things in it is never claimed, so prune/clear will refuse it."""
    marker = root / MARKER
    if marker.is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    if all(e.name == MARKER or (e.is_dir() and _ANY_KEY.match(e.name)) for e in root.iterdir()):
        marker.write_text(MARKER_TEXT)


def _require_marker(base: Path, action: str) -> None:
    if not (base / MARKER).is_file():
        raise ImgclsError(f"refusing to {action} {base}: it is not an imgcls decode cache (no {MARKER} in it)",
                          "check --dir (imgcls marks the cache folders it creates)")


def _folders(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def _bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _live(key: str) -> bool:
    """Whether the file behind an index key still exists unchanged (same size, mtime and ctime)."""
    path = key.split("\t", 1)[0]
    try:
        return file_key(Path(path)) == key.split("\t#", 1)[0]  # a frame's key: the file's, then \t#N
    except OSError:
        return False


def cache_report(root: str | Path | None = None, check_files: bool = False) -> list[dict]:
    """One entry per cache folder: its spec key, rows, bytes and (``check_files``) how many
    rows belong to files that were since edited, moved or deleted."""
    out = []
    base = cache_root(root)
    for folder in _folders(base):
        spec = CacheSpec.from_key(folder.name)
        data = folder / "images.u8"
        size = data.stat().st_size if data.exists() else 0
        entry = {"key": folder.name, "path": str(folder), "bytes": size, "current_format": spec is not None,
                 "cache_folder": bool(_ANY_KEY.match(folder.name))}
        if spec is not None:
            store = DiskStore(base, spec)
            index = store._read_index()
            entry["rows"] = size // spec.row_bytes
            entry["indexed_files"] = len(index)
            if check_files:
                entry["stale_rows"] = entry["rows"] - sum(1 for k in index if _live(k))
        out.append(entry)
    return out


def prune_cache(root: str | Path | None = None) -> dict[str, int]:
    """The cache's eviction: rewrite every cache folder with only the rows of files that
    still exist unchanged (edited files left their old rows behind; deleted files all of
    theirs), and delete folders of older cache formats (``v1-...``; other folders are left
    alone). Refuses a folder without the cache marker. Runs under each folder's lock, so
    a training reading the cache at the same time waits; a training that has the old file
    mapped keeps reading it (the new data file replaces it atomically). Returns counts."""
    import shutil

    base = cache_root(root)
    kept = dropped = freed = 0
    if base.is_dir():
        _require_marker(base, "prune")
    for folder in _folders(base):
        spec = CacheSpec.from_key(folder.name)
        if spec is None and not _ANY_KEY.match(folder.name):
            continue  # not a cache folder: left alone
        if spec is None:
            freed += _bytes_under(folder)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        store = DiskStore(base, spec)
        with store.locked():
            live = {k: r for k, r in store.index.items() if _live(k)}
            rows = store._rows_on_disk()
            if len(live) == rows:
                kept += rows
                continue
            old = store.tensor().permute(0, 2, 3, 1)  # (N, S, S, C): the bytes as stored
            tmp_data = store.data_path.with_suffix(".tmp")
            new_index = {}
            try:
                with open(tmp_data, "wb") as f:
                    for i, (k, r) in enumerate(sorted(live.items(), key=lambda kv: kv[1])):
                        f.write(old[r].numpy().tobytes())
                        new_index[k] = i
                os.replace(tmp_data, store.data_path)
                store.index = new_index
                tmp = store.index_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(new_index))
                os.replace(tmp, store.index_path)
            except OSError as exc:
                raise store._error(exc) from None
            kept += len(live)
            dropped += rows - len(live)
            freed += (rows - len(live)) * spec.row_bytes
    return {"kept_rows": kept, "dropped_rows": dropped, "freed_bytes": freed}


def clear_cache(root: str | Path | None = None) -> int:
    """Delete the whole decode cache folder (always safe: it costs one decode pass); returns
    bytes freed. Refuses a folder without the cache marker."""
    import shutil

    base = cache_root(root)
    if not base.is_dir():
        return 0
    _require_marker(base, "clear")
    freed = _bytes_under(base)
    shutil.rmtree(base)
    return freed


# ----------------------------------------------------------------------------- splits
@dataclass
class DecodedSplit:
    """A file split turned into an in-memory (memory-mapped) split of decoded images."""

    split: Split  # images: uint8 (N, C, side, side) channels_last, files that failed are left out
    paths: list[Path]  # the files behind split.images, in order (a multi-frame file once per frame)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    decoded: int = 0  # images decoded now (the rest came from the cache)
    frames: list[int] = field(default_factory=list)  # the frame of each row's file (0 unless frames="all")

    def center_cropped(self, size: int) -> torch.Tensor:
        """uint8 (N, C, size, size): what evaluation feeds the model (before normalising)."""
        return center_crop(self.split.images, size)


def decoded_split(split: Split, pre: Preprocessing | None = None, *, spec: CacheSpec | None = None,
                  cache: bool = True, cache_root: str | Path | None = None, workers: int | None = None,
                  progress: bool = False, what: str = "images") -> DecodedSplit:
    """Decode a file split once (through the cache) into a uint8 tensor split.

    ``pre`` (or ``spec``) fixes the size: images are ``img_size / crop_pct`` square for
    ``shorter_side`` preprocessing; centre-crop to ``pre.img_size`` for evaluation
    (``center_crop``) or random-resized-crop them for training. Files that cannot be
    decoded are returned in ``skipped`` with the reason; the caller decides whether that
    is an error (``--strict``). Example, for feature caching::

        d = decoded_split(data.train, clf.preprocessing)
        x = d.center_cropped(clf.preprocessing.img_size)  # (N, C, S, S) uint8, a view
        y = d.split.labels
    """
    if split.in_memory:
        return DecodedSplit(split=split, paths=[])
    if spec is None:
        if pre is None:
            raise ValueError("give pre or spec")
        spec = CacheSpec.for_preprocessing(pre)
    store = open_store(spec, cache, cache_root)
    paths, frames, owner = _units(split.paths, spec.frames)
    keys: list[str | None] = []
    skipped: dict[int, str] = {}
    for i, (p, frame) in enumerate(zip(paths, frames)):
        try:
            keys.append(file_key(p) + (f"\t#{frame}" if frame else ""))
        except OSError:
            keys.append(None)
            problem = path_problem(p)
            skipped[i] = problem.reason if problem is not None else "cannot read"
    with store.locked():
        missing = [i for i, k in enumerate(keys) if k is not None and k not in store.index]
        _fill(store, [(paths[i], frames[i]) for i in missing], [keys[i] for i in missing], missing, skipped,
              workers, progress, what)
        rows = [store.index[k] for i, k in enumerate(keys) if i not in skipped]
        images = store.tensor()
    good = [i for i in range(len(paths)) if i not in skipped]
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        x = images[rows[0]:rows[0] + len(rows)]  # a view of the memory map: nothing copied
    else:
        x = images[torch.tensor(rows, dtype=torch.long)] if rows else images[:0]
    labels = split.labels[torch.tensor([owner[i] for i in good], dtype=torch.long)] if good else split.labels[:0]
    many = Counter(str(paths[i]) for i in good)
    sources = [str(paths[i]) if many[str(paths[i])] == 1 and not frames[i] else f"{paths[i]}#frame{frames[i]}"
               for i in good]
    return DecodedSplit(split=Split(labels=labels, images=x, sources=sources), paths=[paths[i] for i in good],
                        skipped=[(paths[i], skipped[i]) for i in sorted(skipped)],
                        decoded=sum(1 for i in missing if i not in skipped), frames=[frames[i] for i in good])


def _units(files: Sequence[Path], frames: str) -> tuple[list[Path], list[int], list[int]]:
    """(path, frame, index of the file in the split) per image: one per file, or with
    ``frames="all"`` one per frame of a multi-frame (DICOM) file."""
    paths, out_frames, owner = [], [], []
    for i, p in enumerate(files):
        n = frame_count(p) if frames == "all" else 1
        paths += [p] * n
        out_frames += list(range(n))
        owner += [i] * n
    return paths, out_frames, owner


def _fill(store, units: list[tuple[Path, int]], keys: list[str], positions: list[int], skipped: dict[int, str],
          workers: int | None, progress: bool, what: str) -> None:
    """Decode ``units`` (path, frame) and append the good ones to ``store``; record failures in ``skipped``."""
    if not units:
        return
    paths, frames = [u[0] for u in units], [u[1] for u in units]
    bar = None
    if progress and len(paths) >= 32:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(transient=True, console=Console(stderr=True))
        task = bar.add_task(f"decoding {what} once", total=len(paths))
        bar.start()
    done: dict[int, torch.Tensor] = {}
    try:
        for i, img, err in decode_files(paths, store.spec, workers, frames):
            if img is None:
                skipped[positions[i]] = err
            else:
                done[i] = img
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    order = sorted(done)  # keep file order, so a split's rows are contiguous (a view, no copy)
    store.append([done[i] for i in order], [keys[i] for i in order])


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size`` x ``size`` of uint8 (N, C, H, W) images, as torchvision's CenterCrop."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size) or h < size or w < size:
        return images
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]
