"""An in-memory training split held on the GPU once, batched by indexing there."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from imgcls.data.loaders import Batches, alternating_flip

# Move an in-memory training set to the GPU once when it takes at most this share of the
# free device memory (CIFAR-10 as uint8 is 150 MB; the rest is left for activations).
DEVICE_DATA_SHARE = 0.25


class DeviceBatches:
    """An in-memory split held on the training device as uint8 (moved once), batched by
    indexing there: no per-step host-to-device copies, no pinned staging buffers. The
    epoch order, this process's shard and a resume offset all come from the wrapped
    :class:`Batches`, so the batches are exactly the ones it would yield."""

    def __init__(self, batches: Batches, device: torch.device):
        self.batches = batches
        self.split = batches.split
        self.images = batches.split.images.to(device)
        self.labels = batches.split.labels.to(device)

    def __getattr__(self, name: str):  # batch_size, order, epoch, ... of the wrapped loader
        return getattr(self.batches, name)

    @property
    def skip(self) -> int:  # set by the trainer when resuming mid-epoch
        return self.batches.skip

    @skip.setter
    def skip(self, value: int) -> None:
        self.batches.skip = value

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batches
        skip, steps, bs = b.skip, len(b), b.batch_size
        try:
            order = b._select(b.order.indices(b.epoch)).to(self.images.device)
            first = None if b.flip_first is None else b.flip_first.to(self.images.device)  # once per epoch
            for i in range(steps - skip):
                idx = order[i * bs:(i + 1) * bs]
                x = self.images[idx]
                if first is not None:
                    x = alternating_flip(x, idx, first, b.epoch)
                yield x, self.labels[idx]
        finally:
            b.skip = 0  # a resume offset applies to one epoch only, as in Batches


def maybe_on_device(batches: Batches | None, device: torch.device):
    """``batches`` as :class:`DeviceBatches` on a GPU when the split is in memory (batched
    by plain indexing: no worker transform, no centre crop) and fits; unchanged otherwise
    (on a CPU the images already are where the model is)."""
    if batches is None or device.type != "cuda" or not batches.split.in_memory:
        return batches
    if getattr(batches, "_loader", None) is not None or getattr(batches, "center_crop", None):
        return batches
    free, _ = torch.cuda.mem_get_info(device)
    if batches.split.images.numel() > DEVICE_DATA_SHARE * free:
        return batches
    return DeviceBatches(batches, device)
