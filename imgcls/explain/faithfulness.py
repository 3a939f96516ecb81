"""Is the explanation faithful to the model? Deletion and insertion curves (Petsiuk et al.,
RISE, 2018), compared with the same curves for random pixel orders.

* deletion: replace the most important pixels first by the mean colour and follow the
  class probability; a faithful map makes it fall fast (low AUC is good);
* insertion: start from the all-mean image and put the most important pixels back first;
  a faithful map makes the probability rise fast (high AUC is good).
The random baseline is the mean over a few random orders, so "beats random" means the
ranking carries information about the model, whatever the image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imgcls.explain.base import ExplainContext


def _order(attr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel indices, most important first; ties broken randomly (Grad-CAM maps of small
    images have large flat regions, and a fixed tie order would be a hidden bias)."""
    flat = attr.reshape(-1)
    return np.lexsort((rng.random(flat.size), -flat))


def _curves(ctx: ExplainContext, x: torch.Tensor, orders: list[np.ndarray], target: int,
            steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Class probability after each of ``steps`` equal chunks, for deletion and insertion
    along each order: (len(orders), steps + 1) each. One batched pass per order."""
    _, c, h, w = x.shape
    n = h * w
    base = ctx.baseline().expand(1, c, h, w)
    counts = np.linspace(0, n, steps + 1).round().astype(int)
    dels, ins = [], []
    for order in orders:
        # rank[p] = position of pixel p in the order; mask_k = pixels among the first counts[k]
        rank = torch.empty(n, dtype=torch.long)
        rank[torch.from_numpy(order)] = torch.arange(n)
        first = (rank[None, :] < torch.from_numpy(counts)[:, None]).view(steps + 1, 1, h, w).to(x.device)
        deleted = torch.where(first, base, x)  # (steps+1, C, H, W)
        inserted = torch.where(first, x, base)
        p = ctx.probabilities(torch.cat([deleted, inserted]))[:, target].cpu().numpy()
        dels.append(p[: steps + 1])
        ins.append(p[steps + 1:])
    return np.stack(dels), np.stack(ins)


def _auc(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def deletion_insertion(ctx: ExplainContext, x: torch.Tensor, attr: np.ndarray, target: int,
                       steps: int = 20, random_orders: int = 3, seed: int = 0) -> dict[str, Any]:
    """AUCs (probability x fraction of pixels, in [0, 1]) of the explanation's deletion and
    insertion curves and of ``random_orders`` random orders (averaged)."""
    rng = np.random.default_rng(seed)
    h, w = x.shape[-2:]
    orders = [_order(attr, rng)] + [rng.permutation(h * w) for _ in range(random_orders)]
    before = ctx.model.evaluations
    dels, ins = _curves(ctx, x, orders, target, steps)
    ctx.model.evaluations = before  # the score's own model calls are reported separately
    d, i = _auc(dels[0]), _auc(ins[0])
    rd, ri = float(np.mean([_auc(c) for c in dels[1:]])), float(np.mean([_auc(c) for c in ins[1:]]))
    return {
        "deletion_auc": round(d, 4), "insertion_auc": round(i, 4),
        "random_deletion_auc": round(rd, 4), "random_insertion_auc": round(ri, 4),
        "deletion_gain": round(rd - d, 4), "insertion_gain": round(i - ri, 4),  # > 0: better than random
        "beats_random": bool(d < rd and i > ri),
        "steps": steps, "random_orders": random_orders,
        "evaluations": 2 * (steps + 1) * len(orders),
        "deletion_curve": [round(float(v), 4) for v in dels[0]],
        "insertion_curve": [round(float(v), 4) for v in ins[0]],
    }
