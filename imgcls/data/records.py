"""The one shape every data source ends in: splits of (images or file paths, labels).

``Split`` holds either an in-memory uint8 tensor ``(N, C, H, W)`` (arrays, npz, named
data sets) or a list of image file paths (class folders). Everything after this point
(loaders, training, evaluation) is written once against these two kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Split:
    labels: torch.Tensor  # (N,) int64 class indices, or (N, K) float32 multi-hot (multi-label data)
    images: torch.Tensor | None = None  # (N, C, H, W) uint8, for in-memory data
    paths: list[Path] | None = None  # image files, for on-disk data
    # a ShardSplit (data/shardset.py): streamed from a shard set; labels are then its class
    # counts in class order (the stream's own order is its shards')
    shards: Any = None
    # in-memory images decoded from files (the decode pass): the file behind each row, as
    # ``file`` or ``file#frameN`` (frames="all"), for reports that name what they show
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.images, self.paths, self.shards)) != 1:
            raise ValueError("a Split holds either images, paths or shards")
        n = len(self.images) if self.images is not None else len(self.paths) if self.paths is not None \
            else self.shards.count
        if n != len(self.labels):
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        if self.sources is not None and len(self.sources) != n:
            raise ValueError(f"{n} images but {len(self.sources)} sources")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def streamed(self) -> bool:
        return self.shards is not None

    def subset(self, idx: torch.Tensor) -> Split:
        if self.shards is not None:
            raise ValueError("a streamed (sharded) split has no random access")
        idx = idx.long()
        if self.images is not None:
            sources = None if self.sources is None else [self.sources[i] for i in idx.tolist()]
            return Split(labels=self.labels[idx], images=self.images[idx], sources=sources)
        return Split(labels=self.labels[idx], paths=[self.paths[i] for i in idx.tolist()])

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    def class_counts(self, num_classes: int) -> list[int]:
        """Images per class (per label, for multi-label data)."""
        from imgcls.data.multilabel import label_counts

        return label_counts(self.labels, num_classes)


@dataclass
class ImageData:
    """A data set resolved into splits, with its class names and natural image shape."""

    classes: list[str]
    train: Split | None
    val: Split | None = None
    test: Split | None = None
    name: str = "data"
    channels: int = 3  # the images' own channels (1 grayscale, 3 colour)
    native_size: int | None = None  # side of in-memory images; None for files of many sizes
    kind: str = "photos"  # "digits" (small grayscale), "small-colour", "photos": picks presets
    notes: list[str] = field(default_factory=list)  # what loading did (held-out val split, ...)
    # entries of class folders that are not decoded: hidden files and sidecars (split, path, why)
    passed_over: list[tuple[str, Path, str]] = field(default_factory=list)
    # a manifest's extra columns (``run``, ``patient``, ...): column -> {str(path): value}, for --group-by
    columns: dict[str, dict[str, str]] = field(default_factory=dict)
    # per-channel-count normalisation statistics of a shard set's training images ({"1"|"3": {mean, std}})
    stats: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multi_label(self) -> bool:
        """Labels are sets (multi-hot rows), not one class per image."""
        return any(s is not None and s.multi_label for s in (self.train, self.val, self.test))

    def eval_split(self) -> tuple[str, Split]:
        """The split to report final numbers on: test if there is one, else validation."""
        if self.test is not None and len(self.test):
            return "test", self.test
        if self.val is not None and len(self.val):
            return "val", self.val
        if self.train is not None:
            return "train", self.train
        raise ValueError("no data")


def ordered_classes(found: list[str], classes: list[str] | None, where: str, remedy: str) -> list[str]:
    """The class list: ``classes`` (``--classes``) when given, else ``found``. Refuses
    found classes that the given list lacks, naming them and ``where`` they are."""
    if classes is None:
        return found
    extra = [c for c in found if c not in classes]
    if extra:
        from imgcls.errors import ImgclsError

        raise ImgclsError(f"{where} {extra[:5]} that --classes does not list",
                          f"add them to --classes ({','.join(classes)}) or {remedy}")
    return list(classes)
