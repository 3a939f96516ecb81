"""The performance path of training: data on the device, thread budget, EMA of weights,
flip test-time augmentation, mixup/cutmix, torch.compile and data-dependent model init.

The training loop (trainer.py) calls into here through a few one-line hooks, so the loop
stays readable and each technique can be measured on its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.data.loaders import Batches, alternating_flip
from imgcls.data.transforms import Preprocessing
from imgcls.engine.callbacks import Callback, TrainState

# Move an in-memory training set to the GPU once when it takes at most this share of the
# free device memory (CIFAR-10 as uint8 is 150 MB; the rest is left for activations).
DEVICE_DATA_SHARE = 0.25


# ---------------------------------------------------------------------- threads
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def idle_cores(interval: float = 0.25) -> float | None:
    """How many cores sat idle over the next ``interval`` seconds (Linux /proc/stat), or
    None where that cannot be read."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals[:8])  # idle + iowait, total (without guest time)

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def configure_threads(threads: int | None, decode_workers: int = 0) -> int:
    """Set torch's intra-op threads; returns the count.

    Default: the cores this process may use (at most OMP_NUM_THREADS when set; minus
    decode workers running alongside),
    lowered to the cores actually idle right now. OpenMP threads that must share a busy
    core spin against each other: measured on the shared 2-core machine with other jobs
    running, the reference CNN trained at 342 img/s with 2 threads and 1,257 with 1.
    """
    if threads is None:
        # an explicit OMP_NUM_THREADS (set by users, or by the DDP launcher per process) caps it
        omp = os.environ.get("OMP_NUM_THREADS", "")
        cap = int(omp) if omp.isdigit() and int(omp) > 0 else usable_cores()
        threads = max(1, min(cap, usable_cores()) - decode_workers)
        free = idle_cores()
        if free is not None:
            threads = max(1, min(threads, int(free + 0.5)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_allocator_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc's malloc serve large blocks from its heap instead of a fresh ``mmap`` each
    time. Without this, every tensor over 32 MiB (a float batch of 64 images at 224 px is
    38.5 MiB; airbench's activations at batch 512 are 60-130 MiB) is mapped and unmapped on
    every step, and its pages are faulted in and zeroed again each time: normalising that
    batch took 33 ms, 13 ms with this (bench/data_throughput.py; airbench's training step
    ~5% faster). It is what PyTorch's CPU tuning guide gets by preloading jemalloc or
    tcmalloc, done with two ``mallopt`` calls. Process-wide, once; glibc only (returns False
    elsewhere); ``IMGCLS_MALLOC_TUNING=0`` turns it off. Freed memory up to
    ``trim_threshold`` stays with the process for reuse instead of going back to the OS."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("IMGCLS_MALLOC_TUNING", "1") == "0":
        return False
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                    trim_threshold) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


class AdaptiveThreads(Callback):
    """Re-check the idle cores at each epoch start (from the second on) and resize torch's
    thread pool to them: other jobs on a shared machine come and go during a long run
    (seen here: a CIFAR-10 run started beside other jobs kept 1 thread after the machine
    went idle). Between epochs this process computes nothing, so the idle count is what
    the others leave. Skipped for short epochs, where the 0.25 s probe would show."""

    def __init__(self, min_epoch_s: float = 10.0):
        self.min_epoch_s = min_epoch_s
        self.last_epoch_s = 0.0

    def on_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        self.last_epoch_s = state.metrics.get("epoch_time", 0.0)

    def on_epoch_start(self, state: TrainState) -> None:
        if state.epoch > 1 and self.last_epoch_s >= self.min_epoch_s:
            configure_threads(None)


# ---------------------------------------------------------------------- data on device
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


# ---------------------------------------------------------------------- model hooks
@torch.no_grad()
def init_from_data(model: nn.Module, batches: Batches, pre: Preprocessing, device: torch.device,
                   max_images: int = 5000) -> None:
    """Call the model's ``init_from_data(x)`` hook (e.g. airbench's whitening layer) with up
    to ``max_images`` normalised training images, if the model has one."""
    hook = getattr(model, "init_from_data", None)
    if not callable(hook):
        return
    split = batches.split
    if split.in_memory:
        x = split.images[:max_images]
    else:  # image files: the first few batches
        xs, n = [], 0
        for x, _ in batches:
            xs.append(x)
            n += len(x)
            if n >= max_images:
                break
        x = torch.cat(xs)[:max_images]
    hook(pre.normalize(x.to(device)))


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """The module to call in the loop: ``torch.compile(model)`` when asked (weights stay
    shared with ``model``, so state_dict / saving are unaffected), else ``model``."""
    if not enabled:
        return model
    return torch.compile(model)


# ---------------------------------------------------------------------- mixup / cutmix
class MixLoss:
    """timm's Mixup/CutMix on a normalised float batch, with the soft-target cross-entropy
    that goes with it (timm folds label smoothing into the soft targets)."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
        from timm.data import Mixup

        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                         num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:  # timm mixes a batch with its flip: needs an even batch
            x, y = x[:-1], y[:-1]
        return self.mix(x, y)

    @staticmethod
    def loss(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def mix_loss(mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> MixLoss | None:
    if mixup <= 0 and cutmix <= 0:
        return None
    return MixLoss(mixup, cutmix, label_smoothing, num_classes)


def num_outputs(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n:
        return int(n)
    return int(model.get_classifier().out_features)


# ---------------------------------------------------------------------- TTA
def tta_forward(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits for ``x``. ``flip``: the mean over the image and its mirror; ``flip-shift``:
    half that, half the same for copies shifted by one pixel up-left and down-right
    (reflect-padded), airbench's test-time augmentation."""
    if tta == "none":
        return model(x)
    out = (model(x).float() + model(x.flip(-1)).float()) / 2
    if tta == "flip-shift":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        shifted = [t.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) else t for t in shifted]
        out = out / 2 + sum((model(t).float() + model(t.flip(-1)).float()) / 2 for t in shifted) / 4
    return out


# ---------------------------------------------------------------------- EMA
class EMA(Callback):
    """Exponential moving average of the weights (timm's ModelEmaV3, BatchNorm statistics
    included). Validation, best-model keeping and the final weights use the average: it is
    swapped into the model when an epoch's training ends and the live weights are swapped
    back when the next epoch starts. Decay warms up (timm's schedule) so short runs are
    not dominated by the random initial weights."""

    def __init__(self, decay: float = 0.999):
        self.decay = decay
        self.ema = None
        self.model: nn.Module | None = None
        self._live: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, state: TrainState, model: nn.Module) -> None:
        from timm.utils import ModelEmaV3

        self.model = model
        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=True)

    def on_batch_end(self, state: TrainState) -> None:
        self.ema.update(self.model, step=state.step)

    def on_train_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        self._live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())

    def on_epoch_start(self, state: TrainState) -> None:
        if self._live is not None:
            self.model.load_state_dict(self._live)
            self._live = None


class Lookahead(Callback):
    """Lookahead (Zhang et al. 2019) with airbench's schedule: every ``every`` steps the slow
    weights move toward the live ones, ``slow = decay*slow + (1-decay)*live``, and training
    continues from the slow weights. ``decay`` rises as ``max_decay * (t/T)^3`` over the run
    (t: step, T: all steps), so early training moves freely and late training averages."""

    def __init__(self, every: int = 5, max_decay: float = 0.95 ** 5):
        self.every, self.max_decay = every, max_decay
        self.model: nn.Module | None = None
        self.slow: list[torch.Tensor] = []
        self.total = 1

    def _tensors(self) -> list[torch.Tensor]:
        # float parameters and BatchNorm running statistics (not the integer step counters)
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    def on_fit_start(self, state: TrainState, model: nn.Module) -> None:
        self.model = model
        self.total = max(1, state.epochs * state.steps_per_epoch)
        self.slow = [t.detach().clone() for t in self._tensors()]

    @torch.no_grad()
    def _sync(self, decay: float) -> None:
        live = self._tensors()
        torch._foreach_lerp_(self.slow, live, 1.0 - decay)
        for t, s in zip(live, self.slow):
            t.copy_(s)

    def on_batch_end(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self._sync(self.max_decay * (state.step / self.total) ** 3)

    def on_train_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        if state.step >= self.total:  # the run's end: the model keeps the slow weights (airbench)
            self._sync(1.0)
