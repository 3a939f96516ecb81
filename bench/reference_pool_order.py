"""The reference CNN's block order: Keras' conv -> ReLU -> max-pool against imgcls'
conv -> max-pool -> ReLU (the same function and gradients), training-step throughput in one
process, interleaved A B A B, bf16 autocast + channels-last as the fast recipe trains.

    flock /tmp/imgcls-heavy.lock python bench/reference_pool_order.py --batch-size 128 --rounds 5

Prints JSON: median images/s of each order, their ratio, and the largest difference of the
two orders' losses over the same steps from the same weights (0: the same numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median  # noqa: E402

from imgcls.models import create_model  # noqa: E402


def build(order: str) -> nn.Module:
    torch.manual_seed(0)
    m = create_model("reference_cnn", 10, in_chans=1, img_size=28)
    if order == "conv-relu-pool":  # Keras' order: the library's blocks with ReLU and pool swapped back
        f = m.features
        m.features = nn.Sequential(f[0], f[2], f[1], f[3], f[5], f[4])
    return m.to(memory_format=torch.channels_last)


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    opt = torch.optim.Adam(model.parameters(), 3e-3, foreach=True)
    losses = []
    for i in range(steps + 3):
        if i == 3:  # three warm-up steps (allocator, oneDNN primitive caches)
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return steps * len(x) / (time.perf_counter() - t0), losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    orders = ("conv-relu-pool", "conv-pool-relu")
    rates: dict[str, list[float]] = {o: [] for o in orders}
    losses: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for o in orders:
            r, losses[o] = run(build(o), x, y, args.steps)
            rates[o].append(r)
    med = {o: median(v) for o, v in rates.items()}
    print(json.dumps({"benchmark": "reference_pool_order", "batch_size": args.batch_size, "threads": args.threads,
                      "machine": machine(), "command": " ".join(sys.argv),
                      "img_per_s": {o: round(v) for o, v in med.items()},
                      "rounds_img_per_s": {o: [round(r) for r in v] for o, v in rates.items()},
                      "ratio": round(med["conv-pool-relu"] / med["conv-relu-pool"], 3),
                      "max_loss_difference": max(abs(a - b) for a, b in zip(*losses.values()))}, indent=1))


if __name__ == "__main__":
    main()
