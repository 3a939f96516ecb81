"""Device and precision choice, one place for all of it."""

from __future__ import annotations

import contextlib

import torch

from imgcls.errors import ImgclsError


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ImgclsError(f"unknown device '{spec}'", "use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ImgclsError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu or auto")
    return dev


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 / AMX make bf16 autocast faster than fp32 on the CPU; without them
    bf16 is emulated and slower, so 'auto' stays in fp32 there."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX512", "AMX"):
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: read the CPU flags
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if spec == "fp32":
        return None
    if spec == "bf16":
        return torch.bfloat16
    if spec == "fp16":
        if device.type == "cpu":
            raise ImgclsError("--precision fp16 is for GPUs", "use bf16 or fp32 on the CPU")
        return torch.float16
    # auto
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# Inference on a CPU runs in chunks of at most this many input pixels (16 images at 224 px).
# Measured (2-core AMD EPYC, AVX2, fp32, tf_efficientnet_lite0 at 224 px, allocator tuned):
# 86-97 img/s in batches of 16 against 65 at 64 and 44 at 128, where every layer's output
# (205 MB at 128) is freshly faulted in and zeroed by the kernel (2.3 M page faults for 640
# images) instead of reused from the heap. Training steps are not chunked: their batch is
# the recipe's.
CPU_CHUNK_PIXELS = 16 * 224 * 224


def inference_chunks(x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``x`` split along the batch for an inference forward on ``device``: in chunks of
    :data:`CPU_CHUNK_PIXELS` on a CPU (small images stay in one piece), whole elsewhere."""
    if device.type != "cpu":
        return (x,)
    n = max(1, CPU_CHUNK_PIXELS // (x.shape[-1] * x.shape[-2]))
    return (x,) if len(x) <= n else x.split(n)


def chunked(fn, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``fn(x)`` computed over :func:`inference_chunks` and concatenated (no copy when whole)."""
    parts = inference_chunks(x, device)
    return fn(parts[0]) if len(parts) == 1 else torch.cat([fn(c) for c in parts])
