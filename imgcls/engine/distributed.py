"""Data-parallel training on PyTorch's own engine (torch.distributed + DDP).

One process per device. ``torchrun`` (or ``imgcls train --devices N``, which starts it)
sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup` reads them, joins the process group
(NCCL on GPUs, Gloo on CPUs) and pins each process to ``cuda:LOCAL_RANK``.

Batches are split *inside* each global batch: global batch k is the same set of images
as in a single-process run with the same seed, and rank r takes its r-th block. With
equal per-rank batches DDP's averaged gradient is the single-process gradient, so the
same ``--batch-size`` (always the GLOBAL batch) and ``--lr`` reproduce a one-device run
(up to float reduction order and per-device BatchNorm statistics).

Only rank 0 writes the run folder and prints progress; metrics are summed across ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from imgcls.data.shards import shard_batch_order, shard_eval_order  # noqa: F401 (re-exported)
from imgcls.errors import ImgclsError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend or None}


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> DistContext:
    """The context of an already initialised process group, else the single-process one."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = dist.get_backend()
    dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, backend)


def setup(device_spec: str = "auto") -> DistContext:
    """Join the process group torchrun described in the environment (idempotent);
    the single-process context when not launched by torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    if dist.is_initialized():
        return current()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ImgclsError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu")
        if local >= torch.cuda.device_count():
            raise ImgclsError(f"process {local} has no GPU: this machine has {torch.cuda.device_count()}",
                              "use --nproc-per-node (or --devices) at most the number of GPUs")
        torch.cuda.set_device(local)  # before init: NCCL binds each process to its own GPU
        backend, device = "nccl", torch.device("cuda", local)
    elif device_spec in ("auto", "cpu"):
        backend, device = "gloo", torch.device("cpu")
    else:
        raise ImgclsError(f"--device {device_spec} cannot be used for multi-process training",
                          "use --device auto, cpu or cuda")
    try:
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("IMGCLS_DIST_TIMEOUT_MIN", "30"))),
                                device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError) as exc:
        raise ImgclsError(f"cannot join the {backend} process group: {exc}".splitlines()[0],
                          "check MASTER_ADDR / --rdzv-endpoint and that every node can reach it") from None
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP around ``model`` (already on ctx.device); the plain model when single-process."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.local_rank] if ctx.device is not None and ctx.device.type == "cuda" else None
    # DDP's default buffer sync keeps BatchNorm running statistics identical on all ranks
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)


def sum_across(values: list[float | torch.Tensor], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum numbers over all ranks in one collective (a no-op single-process)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_across(flags: list[bool], ctx: DistContext, device: torch.device) -> list[bool]:
    """Per flag: true on any rank. Lets rank-local events (a signal, rank 0's clock)
    become a decision all ranks take at the same step, so no rank waits in a collective."""
    if not ctx.enabled:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank (small picklable values made by imgcls itself,
    e.g. the run folder path; never user data)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` as a list on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def weights_digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_in_sync(model: torch.nn.Module, ctx: DistContext) -> str | None:
    """The sha256 of the weights, after checking every rank holds the same ones (DDP
    keeps them equal; a difference is a bug, reported as such rather than saved)."""
    if not ctx.enabled:
        return None
    digests = gather_object(weights_digest(model), ctx)
    if len(set(digests)) != 1:
        raise RuntimeError(f"internal error: the processes' weights diverged ({digests})")
    return digests[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def local_batch_size(global_batch: int, ctx: DistContext) -> int:
    if global_batch % ctx.world_size:
        raise ImgclsError(f"--batch-size {global_batch} is the global batch and must divide evenly over "
                          f"{ctx.world_size} processes",
                          f"use a multiple of {ctx.world_size}, "
                          f"e.g. {ctx.world_size * max(1, global_batch // ctx.world_size)}")
    return global_batch // ctx.world_size


# ---------------------------------------------------------------------- launcher
def launch(nproc: int, train_args: list[str], command: str = "train") -> int:
    """``imgcls train --devices N`` (or ``imgcls predict --devices N``: ``command``): start N
    processes on this machine through PyTorch's own launcher (torch.distributed.run =
    torchrun) and wait for them. Multi-node runs call torchrun directly (docs/distributed.md)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "imgcls", command, *train_args]
    env = dict(os.environ)
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= nproc):
        # CPU processes share the cores: split them instead of oversubscribing
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # on SIGTERM / Ctrl-C torchrun waits this long for the workers' checkpoint before SIGKILL
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    proc = subprocess.Popen(cmd, env=env)
    # a scheduler's SIGTERM reaches this process only: pass it on so the workers checkpoint
    old = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the terminal sent SIGINT to the workers too: wait for their checkpoint
    finally:
        signal.signal(signal.SIGTERM, old)
