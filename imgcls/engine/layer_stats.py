"""Block statistics: the per-channel mean and standard deviation of a network's convolution
outputs, taken in the same forward pass as the logits, for the ``layers`` OOD score
(engine/ood.py).

Why: a network's penultimate features are made to separate its classes, not to notice that
an image is of another kind altogether. A grey digit on black, resized to 32x32 RGB, gives a
CIFAR-10 network penultimate features close to some class (kNN AUROC 0.89-0.90 on
bench/ood_conformal.py), while the statistics of its first convolutions are nothing like a
photo's. The score is the feature-statistics idea of Lee et al. (NeurIPS 2018, Mahalanobis
distance at several layers) and of "Gram matrices" (Sastry & Oore, ICML 2020), on channel
means and standard deviations: cheap (one reduction per hooked layer) and architecture-free.

Which layers: the ordinary (not depthwise) ``nn.Conv2d`` modules in module order whose
relative depth ``i / (n - 1)`` lies in ``DEPTH`` (the middle of the network; the one nearest
its centre when none does), at most ``MAX_LAYERS`` of them spread evenly. Measured on the
CIFAR-10 network (7 convolutions, docs/benchmarks.md): a single layer's AUROC against MNIST
rises from 0.92 (first convolution) to 0.99 (the fifth, at 2/3 of the depth) and falls to
0.33 at the last, whose statistics the classifier has made class-like; against photo crops
the layers add little to kNN, so the score keeps kNN beside them.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_LAYERS = 4
DEPTH = (0.5, 0.75)  # relative depth of the hooked convolutions


def stat_layers(model: nn.Module) -> list[nn.Conv2d]:
    """The convolutions whose outputs are summarised (see the module docstring)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    if len(convs) <= 1:
        return convs
    depth = [i / (len(convs) - 1) for i in range(len(convs))]
    picked = [c for c, d in zip(convs, depth) if DEPTH[0] <= d <= DEPTH[1]]
    if not picked:
        centre = sum(DEPTH) / 2
        picked = [min(zip(convs, depth), key=lambda cd: abs(cd[1] - centre))[0]]
    if len(picked) <= MAX_LAYERS:
        return picked
    step = (len(picked) - 1) / (MAX_LAYERS - 1)
    return [picked[round(i * step)] for i in range(MAX_LAYERS)]


def stat_dims(model: nn.Module) -> list[int]:
    """Width of each layer's statistics: a mean and a standard deviation per channel."""
    return [2 * c.out_channels for c in stat_layers(model)]


class LayerStats:
    """``with LayerStats(model) as ls: model(x); ls.take()`` -> (N, sum of stat_dims) float32:
    each hooked layer's channel means, then its channel standard deviations, over H x W."""

    def __init__(self, model: nn.Module):
        self.layers = stat_layers(model)
        self._got: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        a = output.float()
        self._got.append(torch.cat([a.mean((2, 3)), a.std((2, 3), correction=0)], 1))

    def __enter__(self) -> LayerStats:
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> torch.Tensor:
        """The statistics of the forward passes since the last ``take`` (one pass expected)."""
        if len(self._got) != len(self.layers):
            raise RuntimeError(f"expected {len(self.layers)} hooked outputs, got {len(self._got)}: "
                               "the network did not run each hooked convolution once")
        out = torch.cat(self._got, 1)
        self._got = []
        return out
