"""Batches streamed from a shard set (data/shardset.py): the loader the data pipeline
(data/pipeline.py) uses when a split lives in shards instead of memory or files.

* Each (rank, loader worker) reads its own shards (:func:`~imgcls.data.shardset.assign`),
  so an epoch reads every sample exactly once across all processes. Which shards a rank
  reads is fixed; the order of a worker's shards and a shuffle buffer (webdataset's
  ``shuffle``) change every epoch, seeded by (seed, epoch, rank, worker).
* Decoding happens in the loader workers (the same decode as image files,
  data/decode.py, on the member's bytes), into uint8 batches like every other loader; the
  engine augments and normalises them on the device as it does for every source.
* Every rank runs the same number of steps per epoch (computed from the index's counts):
  a rank whose shards hold fewer samples repeats its first batch at the end of the epoch,
  so DDP never waits for a rank that has run out of data (DistributedSampler pads the same
  way). ``padded`` says how many batches were repeats.
* A bad shard or member (missing, truncated, corrupt image, checksum mismatch) is reported
  with the shard and member names; ``strict`` makes it an error, else it is skipped (its
  samples are not trained on; those read before the damage are) and listed in ``problems``.
* Resuming mid-epoch replays the epoch's (deterministic) stream and drops the batches
  already trained on: exact, at the cost of reading them again.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imgcls.data.decode import load_image_bytes
from imgcls.data.records import Split
from imgcls.data.shardset import Member, ShardError, ShardSplit, Unit, assign, batches_of, read_shard
from imgcls.errors import ImgclsError

MAX_REPORTED = 20  # problems printed one per line; the rest are counted


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
        img = load_image_bytes(data, name, self.channels, self.min_side, self.square)
        if self.exact is not None and img.size == (self.exact, self.exact) and img.mode in ("L", "RGB"):
            a = np.array(img)
            return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())
        return self.transform(img)


class ShardStream(IterableDataset):
    """One epoch of one rank's samples, batched in each loader worker: items are
    ``(x uint8 (B, C, S, S), y, problems, sources)``; a batch may be empty (problems only)."""

    def __init__(self, split: ShardSplit, decode: BytesDecoder, batch_size: int, *, workers: int, shuffle: bool,
                 shuffle_buffer: int, seed: int):
        self.split, self.decode, self.batch_size = split, decode, batch_size
        self.workers, self.shuffle, self.buffer, self.seed = workers, shuffle, shuffle_buffer, seed
        self.rank, self.world = 0, 1
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

    def _members(self, units: list[Unit]) -> Iterator[Member | str]:
        """The units' samples (a str: a problem), shard by shard."""
        for u in units:
            shard = self.split.shards[u.shard]
            try:
                for pos, m in enumerate(read_shard(shard, self.split.format)):
                    if pos % u.parts == u.part:
                        yield m
            except ShardError as exc:
                yield str(exc)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self._members(self.units(self.rank, worker))
        if self.shuffle and self.buffer > 1:
            from webdataset.filters import shuffle

            seed = ((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) * 101 + worker
            stream = shuffle(self.buffer, initial=min(self.buffer, 100), seed=seed)(stream)
        xs, ys, problems, sources = [], [], [], []
        for item in stream:
            if isinstance(item, str):
                problems.append(item)
                continue
            if item.problem:
                problems.append(item.problem)
                continue
            try:
                xs.append(self.decode(item.image, item.name))
            except ImgclsError as exc:
                problems.append(f"{item.name}: {getattr(exc, 'reason', exc.message)}")
                continue
            ys.append(self.split.label_of(item.label))
            sources.append(item.source)
            if len(xs) == self.batch_size:
                yield torch.stack(xs), torch.tensor(ys, dtype=torch.long), problems, sources
                xs, ys, problems, sources = [], [], [], []
        if xs or problems:
            x = torch.stack(xs) if xs else torch.empty(0, dtype=torch.uint8)
            yield x, torch.tensor(ys, dtype=torch.long), problems, sources


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode workers must not fight the training threads on few cores


class StreamBatches:
    """A streamed split as the pipeline's loaders are used: ``set_epoch``, ``shard``,
    ``skip``, ``len`` (steps this epoch) and iteration over ``(x, y)`` uint8 batches.
    ``on_sources`` (prediction) is called with each batch's source names."""

    def __init__(self, split: Split, batch_size: int, decode: BytesDecoder, *, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1000, workers: int = 2, pin_memory: bool = False, strict: bool = False):
        self.split, self.batch_size, self.strict, self.pin_memory = split, batch_size, strict, pin_memory
        self.workers = max(0, workers)
        self.stream = ShardStream(split.shards, decode, batch_size, workers=max(1, self.workers), shuffle=shuffle,
                                  shuffle_buffer=shuffle_buffer, seed=seed)
        # even (training: set by shard()): every rank the same number of steps, padded; never for evaluation
        self.rank, self.world, self.even, self.skip, self.epoch = 0, 1, False, 0, 0
        self.padded, self.problems, self._dl = 0, [], None
        self.on_sources: Callable[[list[str]], None] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.stream.epoch = epoch

    def shard(self, rank: int, world: int, even: bool) -> None:
        """Read only this rank's shards; ``even``: every rank the same number of steps (training)."""
        self.rank, self.world, self.even = rank, world, even
        self.stream.rank, self.stream.world = rank, world
        self._dl = None  # workers copy the stream when they start

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
        skip, steps, self.padded = self.skip, len(self), 0
        self.skip = 0  # a resume offset applies to one epoch only
        n, first = 0, None
        for x, y, problems, sources in self._loader():
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
        while self.even and n < steps:  # fewer samples here than on another rank: repeat a batch
            if first is None:
                raise ImgclsError(f"rank {self.rank} read no samples from {self.split.shards.where}",
                                  "check the shards it was given (every one unreadable?)")
            n += 1
            self.padded += 1
            if n > skip:
                yield first
