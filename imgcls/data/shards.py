"""Which images each of several processes reads (data-parallel training and evaluation):
pure index arithmetic on an epoch's order, so the data pipeline can shard without knowing
about process groups (imgcls.engine.distributed runs those)."""

from __future__ import annotations

import torch


def shard_batch_order(order: torch.Tensor, batch_size: int, rank: int, world: int, drop_last: bool) -> torch.Tensor:
    """This rank's indices, in order, so that its k-th local batch of ``batch_size`` is
    the rank-th block of the k-th GLOBAL batch (``batch_size * world`` images) of
    ``order``. Without drop_last, the ragged end is padded by wrapping around (as
    torch's DistributedSampler does), so every rank runs the same number of steps."""
    if world == 1:
        return order
    g = batch_size * world
    n = len(order)
    full = n // g
    head = order[: full * g].view(full, world, batch_size)[:, rank].reshape(-1)
    rest = n - full * g
    if drop_last or rest == 0 or n == 0:
        return head
    per = -(-rest // world)  # local size of the last, smaller batch
    tail = order[full * g:]
    tail = torch.cat([tail, order[: per * world - rest]]) if per * world > rest else tail
    while len(tail) < per * world:  # fewer images than ranks: wrap more than once
        tail = torch.cat([tail, order[: per * world - len(tail)]])
    return torch.cat([head, tail[rank * per:(rank + 1) * per]])


def shard_eval_order(n: int, rank: int, world: int) -> torch.Tensor:
    """Strided, unpadded shard for evaluation: every image counted exactly once."""
    return torch.arange(rank, n, world)
