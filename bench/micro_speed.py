"""Training-step throughput of the fast path's ingredients, interleaved (A B A B ...).

    python bench/micro_speed.py --model reference_cnn --batch-size 128 --rounds 3

For one model, compares precision (fp32 / bf16 autocast) x memory format (contiguous /
channels-last) and the batch augmentation + normalisation cost, on random data, in the
same process, alternating the variants each round so machine load hits all alike.
Prints JSON: median images/s per variant and the ratio to fp32-contiguous.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median  # noqa: E402

from imgcls.data.transforms import BatchAugment, Preprocessing  # noqa: E402
from imgcls.engine.optim import build_optimizer  # noqa: E402
from imgcls.models import MODEL_DEFAULTS, create_model  # noqa: E402


def step_rate(model, x, y, amp: bool, steps: int) -> float:
    opt = build_optimizer(model, "sgd", 0.01)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps (allocator, oneDNN primitive caches)
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference_cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = MODEL_DEFAULTS.get(args.model, {"img_size": 32, "in_chans": 3})
    c, s = d["in_chans"], d["img_size"]
    torch.manual_seed(0)
    x8 = torch.randint(0, 256, (args.batch_size, c, s, s), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch_size,))
    pre = Preprocessing(s, c, (0.5,) * c, (0.25,) * c)
    aug = BatchAugment(translate=2, hflip=c == 3)
    variants = {f"{p}-{m}": (p == "bf16", m == "channels_last") for p in ("fp32", "bf16")
                for m in ("contiguous", "channels_last")}
    rates: dict[str, list[float]] = {k: [] for k in [*variants, "augment+normalize"]}
    for _ in range(args.rounds):
        for name, (amp, cl) in variants.items():
            model = create_model(args.model, 10, in_chans=c, img_size=s)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            rates[name].append(step_rate(model, pre.normalize(x8, cl), y, amp, args.steps))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            pre.normalize(aug(x8), True)
        rates["augment+normalize"].append(args.steps * len(x8) / (time.perf_counter() - t0))
    base = median(rates["fp32-contiguous"])
    print(json.dumps({"benchmark": "micro_speed", "model": args.model, "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), "machine": machine(), "command": " ".join(sys.argv),
                      "img_per_s": {k: round(median(v)) for k, v in rates.items()},
                      "ratio_to_fp32_contiguous": {k: round(median(v) / base, 2) for k, v in rates.items()
                                                   if k in variants}}, indent=1))


if __name__ == "__main__":
    main()
