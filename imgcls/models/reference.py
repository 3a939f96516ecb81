"""The reference network: the classic small Keras CNN for 28x28 digits.

conv 32 3x3 ReLU -> max-pool 2 -> conv 64 3x3 ReLU -> max-pool 2 -> flatten ->
dense 64 ReLU -> dense num_classes. 121,930 parameters for 28x28x1 inputs and 10
classes, the count Keras reports. The softmax is left to the loss / predictor (logits
out), as usual in PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn


class ReferenceCNN(nn.Module):
    """Same interface as timm models: forward_features / forward_head / reset_classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28):
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B,32,13,13) at 28
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (B,64,5,5) at 28
        )
        side = ((img_size - 2) // 2 - 2) // 2
        if side < 1:
            raise ValueError(f"reference_cnn needs inputs of at least 10x10 pixels, got {img_size}")
        self.num_features = 64
        self.pre_logits = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(inplace=True))
        self.fc = nn.Linear(64, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, 64, h, w): the last conv block (Grad-CAM's default layer)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(64, num_classes)
