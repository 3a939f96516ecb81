"""Batches streamed from a shard set (data/shardset.py): the loader the data pipeline
(data/pipeline.py) uses when a split lives in shards instead of memory or files.

* Each (rank, loader worker) reads its own shards (:func:`~imgcls.data.shardset.assign`),
  so an epoch reads every sample exactly once across all processes. Which shards a rank
  reads is fixed; the order of a worker's shards and its shuffle buffer change every
  epoch, seeded by (seed, epoch, rank, worker).
* Shards are read in chunks of samples and shuffled as arrays (:class:`_Pool`, webdataset's
  ``shuffle`` done batch-wise): raw shards (decoded uint8 pixels, ``imgcls shard --resize``)
  go from a Parquet row group or a run of tar members to a batch without per-sample image
  work; encoded ones are decoded in the loader workers (the same decode as image files,
  data/decode.py) when their batch is made. Batches are uint8 like every other loader's,
  augmented and normalised by the same code: random resized crops of photos (in the workers
  on a CPU, as from the decode cache), alternating flips of small images (by sample id).
* Every rank runs the same number of steps per epoch (computed from the index's counts):
  a rank whose shards hold fewer samples repeats its first batch at the end of the epoch,
  so DDP never waits for a rank that has run out of data (DistributedSampler pads the same
  way). ``padded`` says how many batches were repeats.
* A bad shard or member (missing, truncated, corrupt image, checksum mismatch) is reported
  with the shard and member names; ``strict`` makes it an error, else it is skipped (its
  samples are not trained on; those read before the damage are) and listed in ``problems``.
* Resuming mid-epoch continues from the recorded position (:class:`StreamPosition`, saved
  in every checkpoint): per worker, how far it had read and which samples before that were
  not yet trained on. Shards wholly trained on are not opened again. Without a position
  (another worker layout), the epoch's seeded stream is replayed and trained batches dropped.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgcls.data.decode import load_image_bytes
from imgcls.data.loaders import alternating_flip
from imgcls.data.records import Split
from imgcls.data.shardset import ShardError, ShardSplit, Unit, assign, batches_of, read_chunks
from imgcls.errors import ImgclsError

MAX_REPORTED = 20  # problems printed one per line; the rest are counted


_PNG = b"\x89PNG\r\n\x1a\n"


def _png_at_size(data: bytes, size: int, channels: int) -> torch.Tensor | None:
    """An 8-bit grey / RGB PNG of ``size`` x ``size``: its pixels straight from PIL, without
    load_image_bytes' checks and conversions, which cannot change them here (65 vs 87 us a
    32x32 CIFAR image, this machine; torchvision's faster decode_png is deprecated). None
    (use the general path) for anything whose pixels load_image_bytes would change:
    transparency (flattened), EXIF orientation, palettes, 16 bits, another size or mode."""
    import io
    import struct

    from PIL import Image

    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    depth, ctype = data[24], data[25]
    if (w, h) != (size, size) or depth != 8 or ctype not in (0, 2) or (ctype == 0) != (channels == 1):
        return None
    if b"tRNS" in data or b"eXIf" in data:  # (a false match in the compressed data only costs the fast path)
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
            a = np.asarray(img)
    except Exception:  # damaged: the general path names the problem
        return None
    if a.shape != ((size, size) if channels == 1 else (size, size, 3)) or a.dtype != np.uint8:
        return None
    return torch.from_numpy(a[None].copy() if a.ndim == 2 else a.transpose(2, 0, 1).copy())


class BytesDecoder:
    """Image bytes -> the uint8 tensor a loader yields: ``load_image_bytes`` (decode.py) and
    a PIL -> tensor transform (the cache's or the model's eval transform)."""

    def __init__(self, transform: Callable, channels: int, min_side: int | None = None, square: bool = False,
                 exact: int | None = None):
        self.transform, self.channels, self.min_side, self.square = transform, channels, min_side, square
        # squash-resized 8-bit images already at ``exact`` x ``exact``: the transform would
        # return their pixels unchanged; taking them directly is 5x faster (small images)
        self.exact = exact

    def __call__(self, data: bytes, name: str) -> torch.Tensor:
        if self.exact is not None and data[:8] == _PNG:
            fast = _png_at_size(data, self.exact, self.channels)
            if fast is not None:
                return fast
        img = load_image_bytes(data, name, self.channels, self.min_side, self.square)
        if self.exact is not None and img.size == (self.exact, self.exact) and img.mode in ("L", "RGB"):
            a = np.array(img)
            return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())
        return self.transform(img)


def _objects(items: list) -> np.ndarray:
    out = np.empty(len(items), object)
    for i, v in enumerate(items):
        out[i] = v
    return out


class _Pool:
    """The shuffle buffer, on whole arrays: chunks go in, batches of ``batch`` come out,
    each drawn at random from the ``buffer`` samples held (webdataset's ``shuffle``
    semantics, batched: no per-sample Python for raw pixels), or first in, first out
    without ``shuffle``. Columns: ``pos`` (stream positions), ``x``, ``y``, ``src``."""

    def __init__(self, batch: int, buffer: int, shuffle: bool, rng: np.random.Generator):
        self.batch, self.buffer, self.shuffle, self.rng = batch, max(buffer, batch), shuffle, rng
        self.cols: dict[str, np.ndarray] | None = None
        self.n = 0

    def add(self, cols: dict[str, np.ndarray]) -> None:
        k = len(cols["pos"])
        if not k:
            return
        if self.cols is None or self.n + k > len(self.cols["pos"]):
            cap = max(2 * (self.n + k), self.buffer + 2 * k)
            new = {c: np.empty((cap, *a.shape[1:]), a.dtype) for c, a in cols.items()}
            if self.cols is not None:
                for c in new:
                    new[c][:self.n] = self.cols[c][:self.n]
            self.cols = new
        for c, a in cols.items():
            self.cols[c][self.n:self.n + k] = a
        self.n += k

    def ready(self) -> bool:
        return self.n >= (self.buffer if self.shuffle else self.batch)

    def take(self) -> dict[str, np.ndarray]:
        n, b = self.n, min(self.batch, self.n)
        cols = self.cols
        if not self.shuffle:
            out = {c: a[:b].copy() for c, a in cols.items()}
            for a in cols.values():
                a[:n - b] = a[b:n]
        else:
            sel = self.rng.choice(n, b, replace=False)
            out = {c: a[sel] for c, a in cols.items()}
            holes = sel[sel < n - b]  # refill them from the tail (the tail's own picks just go)
            tail = np.setdiff1d(np.arange(n - b, n), sel, assume_unique=True)
            for a in cols.values():
                a[holes] = a[tail]
        self.n = n - b
        return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 1, H, W) with PIL's convert("L") weights (ITU-R 601-2)."""
    w = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
    return ((x.int() * w).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor").to(torch.uint8)


class ShardStream(IterableDataset):
    """One epoch of one rank's samples, batched in each loader worker: items are
    ``(x uint8 (B, C, S, S), y, problems, sources, settled)``; a batch may be empty
    (problems only). ``settled``: ``(worker, read, positions)``, the stream positions the
    batch disposes of (its samples and its problems) and how far the worker has read, from
    which the main process keeps the epoch's position (:class:`StreamPosition`)."""

    def __init__(self, split: ShardSplit, decode: BytesDecoder, batch_size: int, *, workers: int, shuffle: bool,
                 shuffle_buffer: int, seed: int, size: int | None = None, channels: int | None = None,
                 crop: Callable | None = None, center: int | None = None):
        self.split, self.decode, self.batch_size = split, decode, batch_size
        self.workers, self.shuffle, self.buffer, self.seed = workers, shuffle, shuffle_buffer, seed
        # raw shards: the side and channels batches are delivered at (resized when stored otherwise)
        self.size, self.channels, self.center = size, channels, center
        self.crop = crop  # a batch transform run in the worker (random resized crops on a CPU)
        self.rank, self.world = 0, 1
        self.resume: dict | None = None  # a recorded position to continue from (one epoch, once)
        self.sources = True  # carry each sample's source name (prediction); training does without
        self.flip_seed: int | None = None  # alternating flips (loaders.alternating_flip), by sample id
        self._flip_first: torch.Tensor | None = None
        # shared with persistent loader workers (their copy of this object outlives an epoch)
        self._epoch = mp.get_context("fork").Value("i", 0, lock=False) if "fork" in mp.get_all_start_methods() \
            else None
        self._epoch_local = 0

    @property
    def epoch(self) -> int:
        return self._epoch.value if self._epoch is not None else self._epoch_local

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self._epoch is not None:
            self._epoch.value = value
        self._epoch_local = value

    def units(self, rank: int, worker: int) -> list[Unit]:
        return assign(self.split.shards, self.world, self.workers, self.seed, self.epoch, self.shuffle)[rank][worker]

    def unit_counts(self, rank: int, worker: int) -> list[int]:
        return [u.count(self.split.shards) for u in self.units(rank, worker)]

    def _to_batch(self, x: np.ndarray, names: np.ndarray | None, pos: np.ndarray,
                  problems: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """The pool's samples as a uint8 (B, C, S, S) batch (raw: a channels_last view of the
        stored rows; encoded: decoded here); samples that fail to decode join ``problems``."""
        if self.split.encoding == "raw":
            t = torch.from_numpy(x).permute(0, 3, 1, 2)
            if self.channels is not None and t.shape[1] != self.channels:
                t = _gray(t) if self.channels == 1 else t.expand(-1, 3, -1, -1)
            if self.size is not None and tuple(t.shape[-2:]) != (self.size, self.size):
                from torchvision.transforms.v2 import functional as F

                t = F.resize(t.contiguous(), [self.size, self.size], antialias=True)
            if self.center is not None and t.shape[-1] > self.center:
                from imgcls.data.cache import center_crop

                t = center_crop(t, self.center)
            return t, np.ones(len(pos), bool)
        xs, ok = [], np.ones(len(pos), bool)
        for i, (data, name) in enumerate(zip(x, names)):
            try:
                xs.append(self.decode(data, name))
            except ImgclsError as exc:
                problems.append(f"{name}: {getattr(exc, 'reason', exc.message)}")
                ok[i] = False
        return (torch.stack(xs) if xs else torch.empty(0, dtype=torch.uint8)), ok

    def _emit(self, take: dict[str, np.ndarray], worker: int, read: int, problems: list[str],
              settled: list[np.ndarray]):
        x, ok = self._to_batch(take["x"], take.get("name"), take["pos"], problems)
        y = take["y"][ok]
        if self.split.label_map is not None:
            y = np.asarray(self.split.label_map, np.int64)[y]
        y = torch.from_numpy(np.ascontiguousarray(y))
        if self.crop is not None and len(y):
            from imgcls.data.loaders import batch_seed

            gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, torch.from_numpy(take["pos"])))
            x = self.crop(x, gen=gen)
        if self.flip_seed is not None and len(y):
            x = alternating_flip(x, torch.from_numpy(take["id"][ok]), self._first_flips(), self.epoch)
        done = np.concatenate([take["pos"], *settled]) if settled else take["pos"]
        sources = [s for s, good in zip(take["src"].tolist(), ok) if good] if "src" in take else []
        return x, y, list(problems), sources, (worker, read, done)

    def _first_flips(self) -> torch.Tensor:
        """The fixed random half of the samples mirrored in odd epochs (by sample id: a
        shard's place in the index, then the sample's in the shard), as Batches.alternate_flips."""
        if self._flip_first is None:
            n = max(1, self.split.count)
            self._flip_first = torch.rand(n, generator=torch.Generator().manual_seed(self.flip_seed * 7_919 + 17)) < 0.5
        return self._flip_first

    def __iter__(self):
        resume, self.resume = self.resume, None  # once (a persistent worker keeps this object)
        return self._iter(resume)

    def _iter(self, resume: dict | None):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        units = self.units(self.rank, worker)
        counts = [u.count(self.split.shards) for u in units]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        mine = None
        if resume is not None and resume.get("epoch") == self.epoch and worker < len(resume["workers"]):
            w = resume["workers"][worker]
            mine = (int(w["read"]), np.asarray(w["pending"], np.int64))
        seed = ((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) * 101 + worker
        pool = _Pool(self.batch_size, self.buffer if self.shuffle else 0, self.shuffle and self.buffer > 1,
                     np.random.default_rng(seed))
        read = mine[0] if mine else 0
        problems: list[str] = []
        settled: list[np.ndarray] = []
        encoded = self.split.encoding != "raw"
        base = np.concatenate([[0], np.cumsum([s.count for s in self.split.shards])]).astype(np.int64)
        for j, u in enumerate(units):
            a, n = int(offsets[j]), counts[j]
            want = None
            if mine is not None:
                pend = mine[1][(mine[1] >= a) & (mine[1] < a + n)]
                if a + n <= mine[0] and not len(pend):
                    continue  # consumed before the checkpoint: not even opened
                want = (mine[0], pend)
            nxt = 0
            try:
                for ch in read_chunks(self.split.shards[u.shard], self.split, sources=self.sources):
                    for o, why in ch.problems:
                        if o % u.parts == u.part and (want is None or a + o // u.parts >= want[0]
                                                      or a + o // u.parts in want[1]):
                            problems.append(why)
                            settled.append(np.array([a + o // u.parts], np.int64))
                    if ch.problems:
                        nxt = max(nxt, max(o for o, _ in ch.problems) // u.parts + 1)
                    sel = ch.ordinal % u.parts == u.part if u.parts > 1 else slice(None)
                    local = ch.ordinal[sel] // u.parts
                    if not len(local):
                        continue
                    nxt = max(nxt, int(local[-1]) + 1)
                    pos = a + local
                    cols = {"pos": pos, "x": ch.x[sel], "y": ch.y[sel]}
                    if self.flip_seed is not None:  # a sample's id, the same in every epoch
                        cols["id"] = (base[u.shard] + ch.ordinal[sel]) % max(1, int(base[-1]))
                    if self.sources:
                        cols["src"] = _objects(ch.sources)[sel]
                    if encoded:  # bytes, decoded when the batch is made (the buffer holds bytes)
                        cols["name"] = _objects(ch.names)[sel]
                    if want is not None:
                        keep = (pos >= want[0]) | np.isin(pos, want[1])
                        cols = {c: v[keep] for c, v in cols.items()}
                    pool.add(cols)
                    read = max(read, a + nxt)
                    while pool.ready():
                        yield self._emit(pool.take(), worker, read, problems, settled)
                        problems, settled = [], []
            except ShardError as exc:
                problems.append(str(exc))
                rest = np.arange(a + nxt, a + n, dtype=np.int64)  # never read: disposed of with the problem
                if want is not None:
                    rest = rest[(rest >= want[0]) | np.isin(rest, want[1])]
                settled.append(rest)
                read = max(read, a + n)
        while pool.n or problems:
            take = pool.take() if pool.n else {"pos": np.empty(0, np.int64), "x": np.empty(0, object),
                                               "y": np.empty(0, np.int64), "src": np.empty(0, object),
                                               "name": np.empty(0, object), "id": np.empty(0, np.int64)}
            yield self._emit(take, worker, read, problems, settled)
            problems, settled = [], []


class StreamPosition:
    """Where one rank is in an epoch's stream: per loader worker, how far it has read
    (``read``) and which positions before that were not yet trained on (``pending``: in
    the shuffle buffer or in batches still on their way). What a checkpoint records
    (:meth:`state`) and what resuming continues from: the positions trained on are never
    read again, the pending ones are read again first."""

    def __init__(self, epoch: int, totals: list[int], resume: dict | None = None):
        self.epoch = epoch
        self.read = [0] * len(totals)
        self.done = [np.zeros(t, bool) for t in totals]
        if resume is not None:
            for w, st in enumerate(resume["workers"][:len(totals)]):
                r = min(int(st["read"]), totals[w])
                self.read[w] = r
                self.done[w][:r] = True
                pend = np.asarray(st["pending"], np.int64)
                self.done[w][pend[pend < totals[w]]] = False

    def settle(self, worker: int, read: int, positions: np.ndarray) -> None:
        d = self.done[worker]
        d[positions[(positions >= 0) & (positions < len(d))]] = True
        self.read[worker] = max(self.read[worker], min(read, len(d)))

    def state(self) -> dict:
        return {"epoch": self.epoch, "workers": [
            {"read": r, "pending": np.flatnonzero(~d[:r]).tolist()} for r, d in zip(self.read, self.done)]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode workers must not fight the training threads on few cores


class StreamBatches:
    """A streamed split as the pipeline's loaders are used: ``set_epoch``, ``shard``,
    ``skip``, ``len`` (steps this epoch) and iteration over ``(x, y)`` uint8 batches.
    ``on_sources`` (prediction) is called with each batch's source names.

    Resuming: :meth:`position` is where this rank is in the epoch after the batches yielded
    so far (what a checkpoint records); :meth:`load_position` continues the epoch from a
    recorded one: every sample not yet trained on is read once, nothing else. Without a
    recorded position, ``skip`` replays the epoch's stream and drops that many batches."""

    def __init__(self, split: Split, batch_size: int, decode: BytesDecoder, *, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1000, workers: int = 2, pin_memory: bool = False, strict: bool = False,
                 size: int | None = None, channels: int | None = None, crop: Callable | None = None,
                 center: int | None = None):
        self.split, self.batch_size, self.strict, self.pin_memory = split, batch_size, strict, pin_memory
        self.workers = max(0, workers)
        self.stream = ShardStream(split.shards, decode, batch_size, workers=max(1, self.workers), shuffle=shuffle,
                                  shuffle_buffer=shuffle_buffer, seed=seed, size=size, channels=channels, crop=crop,
                                  center=center)
        # even (training: set by shard()): every rank the same number of steps, padded; never for evaluation
        self.rank, self.world, self.even, self.skip, self.epoch = 0, 1, False, 0, 0
        self.padded, self.problems, self._dl = 0, [], None
        self.on_sources: Callable[[list[str]], None] | None = None
        self._position: StreamPosition | None = None
        self._resume: dict | None = None
        self._next: tuple[int, Iterator] | None = None  # an epoch started ahead (prefetch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.stream.epoch = epoch

    def alternate_flips(self, seed: int) -> None:
        """Mirror samples by :func:`~imgcls.data.loaders.alternating_flip` (in the loader
        workers), as in-memory training data is: a fixed random half (by sample id, ``seed``)
        in odd epochs, the other half in even ones."""
        self.stream.flip_seed = seed
        self._dl = None

    def shard(self, rank: int, world: int, even: bool) -> None:
        """Read only this rank's shards; ``even``: every rank the same number of steps (training)."""
        self.rank, self.world, self.even = rank, world, even
        self.stream.rank, self.stream.world = rank, world
        self._dl = None  # workers copy the stream when they start

    def _totals(self) -> list[int]:
        return [sum(self.stream.unit_counts(self.rank, w)) for w in range(self.stream.workers)]

    def position(self) -> dict | None:
        """This rank's place in the current epoch (plain ints and lists), or None before it starts."""
        if self._position is None or self._position.epoch != self.epoch:
            return None
        return {**self._position.state(), "rank": self.rank, "world": self.world, "workers_n": self.stream.workers}

    def load_position(self, position: dict | None) -> None:
        """Continue the next iteration (its epoch must be the recorded one) from ``position``;
        one recorded with another layout (ranks, loader workers) is ignored: ``skip`` replays."""
        ok = position is not None and position.get("rank") == self.rank and position.get("world") == self.world \
            and position.get("workers_n") == self.stream.workers
        self._resume = position if ok else None
        self._dl = None  # workers started before this (e.g. by a data-dependent init) do not know it

    def _rank_batches(self, rank: int) -> int:
        return sum(batches_of(self.stream.units(rank, w), self.split.shards.shards, self.batch_size)
                   for w in range(self.stream.workers))

    def __len__(self) -> int:
        if self.even:
            return max(self._rank_batches(r) for r in range(self.world))
        return self._rank_batches(self.rank)

    def _report(self, problems: list[str]) -> None:
        if self.strict:
            raise ImgclsError(problems[0], "fix or re-write the shard (`imgcls shard`), or drop --strict to skip it")
        for p in problems:
            self.problems.append(p)
            if len(self.problems) <= MAX_REPORTED:
                who = f" (rank {self.rank})" if self.world > 1 else ""
                print(f"imgcls: skipped{who}: {p}", file=sys.stderr)
            elif len(self.problems) == MAX_REPORTED + 1:
                print("imgcls: more shard problems; the count is in the summary", file=sys.stderr)

    def prefetch(self, epoch: int) -> None:
        """Start the persistent loader workers on ``epoch`` now, so that its first batches
        are read while the trainer validates the epoch before it. Each worker reads its part
        of the shards up to the shuffle buffer before its first batch, a fixed cost per epoch
        that an epoch of a few batches feels (0.12-0.17 s of a 0.9 s epoch of 245 photos on
        2 cores). Nothing is started where workers do not persist or where a recorded
        position or a skip applies: the next iteration then starts its epoch as before.
        Called before the first epoch, it also forks the workers then (see Trainer.fit)."""
        persistent = self.workers > 0 and self.stream._epoch is not None
        if not persistent or self._resume is not None or self.skip:
            return
        if self.stream.sources != (self.on_sources is not None):  # settle it now, as __iter__ would
            self.stream.sources = self.on_sources is not None
            self._dl = None
        self.stream.epoch = epoch  # the workers read it when they start the epoch
        self._next = (epoch, iter(self._loader()))

    def _loader(self) -> DataLoader:
        """One loader for all epochs; its workers persist (the epoch reaches them through
        shared memory) where processes fork, so an epoch does not start new ones."""
        w = self.workers
        persistent = w > 0 and self.stream._epoch is not None
        if self._dl is None or not persistent:
            self._dl = DataLoader(self.stream, batch_size=None, num_workers=w, pin_memory=self.pin_memory,
                                  worker_init_fn=_worker_init if w else None, prefetch_factor=2 if w else None,
                                  timeout=900 if w else 0, persistent_workers=persistent,
                                  multiprocessing_context="fork" if persistent else None)
        return self._dl

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resume = self._resume if self._resume is not None and self._resume.get("epoch") == self.epoch else None
        self._resume = None
        # with a recorded position the stream holds only what is left: nothing to drop
        skip, steps, self.padded = (0 if resume else self.skip), len(self), 0
        n = self.skip if resume else 0
        self.skip = 0  # a resume offset applies to one epoch only
        if self.stream.sources != (self.on_sources is not None):
            self.stream.sources = self.on_sources is not None
            self._dl = None  # persistent workers hold their copy of the stream
        nxt, self._next = self._next, None
        self.stream.resume = resume
        ahead = nxt is not None and nxt[0] == self.epoch and nxt[1] is getattr(self._dl, "_iterator", None)
        if ahead and resume is None:
            it = nxt[1]  # started by prefetch(): the workers are already reading this epoch
        else:
            it = iter(self._loader())  # workers start (and copy the stream) here
        self.stream.resume = None
        self._position = pos = StreamPosition(self.epoch, self._totals(), resume)
        first, reported = None, len(self.problems)
        for x, y, problems, sources, (worker, read, done) in it:
            pos.settle(worker, read, done)
            if problems:
                self._report(problems)
            if not len(y):
                continue
            if n == steps and self.even:  # more samples than the index says: keep the ranks in step
                self._report([f"{self.split.shards.where}: more samples than its index.json lists; "
                              "the rest of this epoch is not trained on"])
                break
            first = (x, y) if first is None else first
            n += 1
            if n > skip:
                if self.on_sources is not None:
                    self.on_sources(sources)
                yield x, y
        if first is None and len(self.problems) > reported:
            self._nothing_read(len(self.problems) - reported, self.problems[reported])
        while self.even and n < steps:  # fewer samples here than on another rank: repeat a batch
            if first is None:
                first = self._first_batch()
            n += 1
            self.padded += 1
            if n > skip:
                yield first

    def close(self) -> None:
        """Stop the persistent decode workers now (see :meth:`imgcls.data.loaders.Batches.close`:
        a later loader's forked workers must not inherit their iterator); iterating again starts
        new ones."""
        self._next = None
        if self._dl is not None and getattr(self._dl, "_iterator", None) is not None:
            self._dl._iterator = None

    def _nothing_read(self, bad: int, problem: str) -> None:
        """Every sample this rank was given was skipped: an error, never an empty result."""
        who = f"rank {self.rank}: " if self.world > 1 else ""
        raise ImgclsError(f"{who}all {bad} sample(s) read from {self.split.shards.where} were skipped "
                          f"(first: {problem})", "fix the shards or re-write them with `imgcls shard`")

    def _first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch to repeat when a resumed epoch had nothing left to read on this rank."""
        for x, y, *_ in self._loader():
            if len(y):
                return x, y
        raise ImgclsError(f"rank {self.rank} read no samples from {self.split.shards.where}",
                          "check the shards it was given (every one unreadable?)")
