"""Deterministic mode and the record of what a run was made from.

``--deterministic`` seeds every generator, asks PyTorch for deterministic kernels and
records the environment (library versions, device, thread count) and a fingerprint of
the data (sha256 over the file list and contents) in ``model.json``, so a result can be
traced back to exactly what produced it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.data.records import ImageData, Split


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic(seed: int) -> None:
    """Seed everything and make PyTorch pick deterministic kernels (an error, not a
    silent difference, if an op has none)."""
    # cuBLAS needs this set before its first use to be deterministic on CUDA >= 10.2
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed_everything(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def environment(device: torch.device) -> dict[str, Any]:
    """What besides the library versions (the card's ``versions``) decides the numbers."""
    env = {"platform": platform.platform(), "machine": platform.machine(), "device": str(device),
           "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def _hash_split(h, name: str, split: Split | None) -> int:
    if split is None:
        return 0
    h.update(f"{name}:{len(split)}\n".encode())
    h.update(split.labels.to(torch.int64).contiguous().numpy().tobytes())
    if split.streamed:  # a shard set: the index's sha256 of each shard stands for its bytes
        h.update("".join(f"{s.name}:{s.count}:{s.sha256}\n" for s in split.shards.shards).encode())
        return len(split)
    if split.in_memory:
        x = split.images.contiguous()
        h.update(repr(tuple(x.shape)).encode())
        h.update(x.numpy().tobytes())
        return len(split)
    root = Path(os.path.commonpath([str(p) for p in split.paths])) if split.paths else Path()
    for p in split.paths:
        # relative names: the same data in another folder or on another machine matches
        h.update(str(Path(p).relative_to(root) if root != Path(p) else Path(p).name).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest() if hasattr(hashlib, "file_digest")
                     else hashlib.sha256(f.read()).digest())
    return len(split)


def data_fingerprint(data: ImageData) -> dict[str, Any]:
    """sha256 over the class names, then per split its labels and either the image bytes
    (in-memory data) or every file's relative name and content hash, in loading order."""
    h = hashlib.sha256()
    h.update(("\0".join(data.classes) + "\n").encode())
    counts = {name: _hash_split(h, name, getattr(data, name)) for name in ("train", "val", "test")}
    return {"sha256": h.hexdigest(), "images": {k: v for k, v in counts.items() if v}}
