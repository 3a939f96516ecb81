"""Unlabelled images (``imgcls rank UNLABELED``, ``imgcls train --unlabeled POOL``): a folder of
images (recursively) or an ``.npz`` of them, as one :class:`Split` with zero labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imgcls.data.decode import scan_folder
from imgcls.data.records import Split
from imgcls.data.sources import _to_nchw_uint8
from imgcls.errors import ImgclsError

_ARRAY_KEYS = ("x_unlabeled", "x_unlabelled", "x_train", "x", "images")


def pool_split(spec: str | Path) -> tuple[Split, list[Path] | None]:
    """The unlabelled pool: a folder of images (recursively) or an ``.npz`` of images."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = scan_folder(p).files
        if not files:
            raise ImgclsError(f"unlabelled folder {p} has no images",
                              "put the images to rank (jpg, png, ...) in it, or give an .npz of images")
        return Split(labels=torch.zeros(len(files), dtype=torch.long), paths=files), files
    if p.is_file() and p.suffix.lower() == ".npz":
        with np.load(p, allow_pickle=False) as f:
            key = next((k for k in _ARRAY_KEYS if k in f.files), None)
            if key is None:
                raise ImgclsError(f"{p} has none of the arrays {', '.join(_ARRAY_KEYS)}",
                                  "save the unlabelled images as x_unlabeled (N, H, W[, C])")
            x = _to_nchw_uint8(f[key], f"{p}[{key}]")
        if not len(x):
            raise ImgclsError(f"{p}[{key}] has no images", "give at least one unlabelled image")
        return Split(labels=torch.zeros(len(x), dtype=torch.long), images=x), None
    raise ImgclsError(f"unlabelled pool not found: {p}", "give a folder of images or an .npz of images")


def check_pool(train: Split, pool: Split, where: str) -> None:
    """Refuse a pool that cannot join (or train beside) the training split, before any training."""
    if train.in_memory != pool.in_memory:
        raise ImgclsError(f"--unlabeled {where} is {'arrays' if pool.in_memory else 'image files'} but the labelled "
                          f"data is {'arrays' if train.in_memory else 'image files'}", "give the same kind for both")
    if train.in_memory:
        if pool.images.shape[1:] != train.images.shape[1:]:
            raise ImgclsError(f"--unlabeled {where} images are {tuple(pool.images.shape[1:])}, the labelled ones "
                              f"{tuple(train.images.shape[1:])} (C, H, W)", "give unlabelled images of the same shape")
