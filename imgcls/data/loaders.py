"""Batches of uint8 images for one epoch, from memory or from image files.

Both loaders yield ``(x, y)`` with ``x`` uint8 ``(N, C, H, W)`` on the CPU (pinned when
the model is on a GPU); the engine moves them to the device, augments and normalises
there. Shuffling is reproducible: the order of epoch ``e`` depends only on (seed, e).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from imgcls.data.decode import load_image
from imgcls.data.records import Split
from imgcls.errors import ImgclsError


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class EpochSampler(Sampler[int]):
    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        # maps the epoch's order to what this process reads (rank shard, resume offset)
        self.select: Callable[[torch.Tensor], torch.Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        order = _epoch_order(self.n, self.shuffle, self.seed, self.epoch)
        return self.select(order) if self.select is not None else order

    def __iter__(self):
        return iter(self._order().tolist())

    def __len__(self) -> int:
        return len(self._order()) if self.select is not None else self.n


class FileDataset(Dataset):
    """Decodes one image file per item. A file that fails to decode is reported back to
    the main process (as a message) instead of killing a worker with a traceback."""

    def __init__(self, paths: list[Path], labels: torch.Tensor | None, channels: int,
                 transform: Callable, size: int):
        self.paths, self.labels, self.channels = paths, labels, channels
        self.transform, self.size = transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        label = int(self.labels[i]) if self.labels is not None else -1
        try:
            x = self.transform(load_image(self.paths[i], self.channels))
            return x, label, ""
        except ImgclsError as exc:
            return torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8), label, exc.oneline()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode workers must not fight the training threads on few cores


class Batches:
    """An iterable over one split, re-iterable once per epoch (call ``set_epoch``)."""

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 transform: Callable | None = None, channels: int = 3, size: int = 224,
                 workers: int | None = None, pin_memory: bool = False, drop_last: bool = False):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.epoch = 0
        # drop a ragged last batch only when that leaves at least one full batch
        self.drop_last = drop_last and len(split) > batch_size
        self.pin_memory = pin_memory
        self._loader = None
        self._want_drop_last = drop_last
        # set by shard() for multi-process training, and by resume (batches to skip once)
        self.rank, self.world, self.even, self.skip = 0, 1, True, 0
        if not split.in_memory:
            workers = default_workers() if workers is None else workers
            workers = min(workers, max(1, len(split) // max(1, batch_size)) if len(split) > 0 else 0)
            self._sampler = EpochSampler(len(split), shuffle, seed)
            self._sampler.select = self._select
            self._loader = DataLoader(
                FileDataset(split.paths, split.labels, channels, transform, size),
                batch_size=batch_size, sampler=self._sampler, num_workers=workers,
                pin_memory=pin_memory, drop_last=self.drop_last, worker_init_fn=_worker_init,
                persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
                prefetch_factor=4 if workers > 0 else None,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self._loader is not None:
            self._sampler.set_epoch(epoch)

    def shard(self, rank: int, world: int, even: bool) -> None:
        """Read only this process's share (imgcls.engine.distributed). ``batch_size`` is
        then the per-process batch. even: every rank the same number of batches, each
        the rank's block of a global batch (training); else a strided, unpadded share
        (evaluation, every image once)."""
        self.rank, self.world, self.even = rank, world, even
        self.drop_last = self._want_drop_last and len(self.split) > self.batch_size * world
        if self._loader is not None:
            self._loader.batch_sampler.drop_last = self.drop_last

    def _select(self, order: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            from imgcls.engine.distributed import shard_batch_order, shard_eval_order

            order = (shard_batch_order(order, self.batch_size, self.rank, self.world, self.drop_last) if self.even
                     else order[shard_eval_order(len(order), self.rank, self.world)])
        return order[self.skip * self.batch_size:] if self.skip else order

    def __len__(self) -> int:
        n = len(self.split)
        if self.world > 1:
            g = self.batch_size * self.world
            if self.even:
                return n // g if self.drop_last else -(-n // g)
            n = len(range(self.rank, n, self.world))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip, steps = self.skip, len(self)
        try:
            yield from self._iter(steps - skip)
        finally:
            self.skip = 0  # a resume offset applies to one epoch only

    def _iter(self, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            order = self._select(_epoch_order(len(self.split), self.shuffle, self.seed, self.epoch))
            for b in range(steps):
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                x, y = self.split.images[idx], self.split.labels[idx]
                yield (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)
            return
        for x, y, errors in self._loader:
            bad = [e for e in errors if e]
            if bad:
                raise ImgclsError(bad[0], f"{len(bad)} bad file(s) in this batch")
            yield x, y
