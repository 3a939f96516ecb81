"""The timm model interface for imgcls' own networks (forward_features / forward_head /
get_classifier / reset_classifier), so fine-tuning, feature caching, summaries and
Grad-CAM treat them like any timm model."""

from __future__ import annotations

import torch
from torch import nn


class FeaturesHeadNet(nn.Module):
    """Subclasses set ``features`` (image-shaped part), ``pre_logits`` (flatten, hidden
    dense layers) and ``fc`` (the classifier: a Linear, or Linear + activation)."""

    features: nn.Module
    pre_logits: nn.Module
    fc: nn.Module
    num_classes: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, C, h, w): the last conv block (Grad-CAM's default layer)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        lin = self.fc[0] if isinstance(self.fc, nn.Sequential) else self.fc
        self.num_classes = num_classes
        self.fc = nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None)
