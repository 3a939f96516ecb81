"""Fast small-image architectures, tuned for time-to-accuracy rather than parameter count.

``airbench``: the network of Keller Jordan's airbench94 (CIFAR-10 to 94% in seconds on one
GPU), rebuilt here on our registry: a frozen 2x2 "whitening" convolution initialised from
the eigenvectors of the training images' patch covariance, three conv groups
(conv-pool-BN-GELU-conv-BN-GELU; widths 64/256/256), a global max-pool and a bias-free
linear head scaled by 1/9. BatchNorm weights are frozen at 1 and only the biases learn,
with a 64x higher learning rate (``param_groups``), as in the original.

``airbench_small``: the same design at widths 32/64/128 for 28x28 digits (~5x the
reference CNN's compute, far higher accuracy per epoch).

Models here may expose optional hooks the engine calls when present:
``init_from_data(x)`` with a float, normalised sample of training images (before the
first step), ``param_groups(weight_decay)`` with per-group ``lr_scale`` and
``on_epoch_start(epoch)`` (single-process training only: DDP needs a fixed set of
trainable parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen unit scale: only the bias (shift) is trained.

    eps is PyTorch's 1e-5, not airbench's 1e-12: under CPU bf16 autocast a channel's
    variance can round to slightly below zero and 1e-12 then gives NaN (seen in tests)."""

    def __init__(self, num_features: int, momentum: float = 0.6, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)  # torch counts momentum the other way
        self.weight.requires_grad = False


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias; identity (dirac) init on the first in-channels keeps
    early training close to a shallow net, which speeds it up."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float):
        super().__init__()
        self.conv1 = _Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(cout, bn_momentum)
        self.conv2 = _Conv(cout, cout)
        self.norm2 = _BatchNorm(cout, bn_momentum)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """Same interface as timm models: forward_features / forward_head / reset_classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32,
                 widths: tuple[int, int, int] = (64, 256, 256), bn_momentum: float = 0.6,
                 scaling_factor: float = 1 / 9, whiten_eps: float = 5e-4, whiten_bias_epochs: int = 3):
        super().__init__()
        if img_size < 9:
            raise ValueError(f"airbench needs inputs of at least 9x9 pixels, got {img_size}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.scaling_factor, self.whiten_eps = scaling_factor, whiten_eps
        self.whiten_bias_epochs = whiten_bias_epochs
        whiten_width = 2 * in_chans * 2 * 2
        self.whiten = nn.Conv2d(in_chans, whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from data, then frozen
        self.features = nn.Sequential(
            ConvGroup(whiten_width, widths[0], bn_momentum),
            ConvGroup(widths[0], widths[1], bn_momentum),
            ConvGroup(widths[1], widths[2], bn_momentum),
        )
        self.activ = nn.GELU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.num_features = widths[2]
        self.fc = nn.Linear(widths[2], num_classes, bias=False)

    # ---------------------------------------------------------------- engine hooks
    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Whitening weights from the patch covariance of normalised training images
        (N, C, H, W): eigenvectors scaled by 1/sqrt(eigenvalue), in both signs."""
        c = x.shape[1]
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, c * 4)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov.double())
        eigval, eigvec = eigval.flip(0).clamp_min(0).float(), eigvec.T.flip(0).float()
        scaled = (eigvec / torch.sqrt(eigval + self.whiten_eps)[:, None]).reshape(c * 4, c, 2, 2)
        w = torch.cat((scaled, -scaled)).to(self.whiten.weight)
        self.whiten.weight.copy_(w.contiguous(memory_format=torch.preserve_format))
        self.whiten.bias.zero_()

    def on_epoch_start(self, epoch: int) -> None:
        """The whitening bias trains for the first ``whiten_bias_epochs`` epochs only, then
        stays fixed (airbench; the optimizer skips a parameter without a gradient)."""
        self.whiten.bias.requires_grad = epoch <= self.whiten_bias_epochs

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """BatchNorm biases learn 64x faster (weight decay scaled down to match, so their
        decay per step stays the same), as in airbench."""
        norm = [p for n, p in self.named_parameters() if "norm" in n and p.requires_grad]
        other = [p for n, p in self.named_parameters() if "norm" not in n and p.requires_grad]
        return [{"params": norm, "weight_decay": weight_decay / 64, "lr_scale": 64.0},
                {"params": other, "weight_decay": weight_decay, "lr_scale": 1.0}]

    # ---------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.activ(self.whiten(x)))  # (B, C, h, w): Grad-CAM's layer

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x) * self.scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False)


def airbench(num_classes: int, in_chans: int = 3, img_size: int = 32, **kw: Any) -> nn.Module:
    return AirbenchNet(num_classes, in_chans, img_size, widths=(64, 256, 256), **kw)


def airbench_small(num_classes: int, in_chans: int = 1, img_size: int = 28, **kw: Any) -> nn.Module:
    return AirbenchNet(num_classes, in_chans, img_size, widths=(32, 64, 128), **kw)
