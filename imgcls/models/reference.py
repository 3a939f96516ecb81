"""The reference network: the classic small Keras CNN for 28x28 digits.

conv 32 3x3 ReLU -> max-pool 2 -> conv 64 3x3 ReLU -> max-pool 2 -> flatten ->
dense 64 ReLU -> dense num_classes (each conv block pools before its ReLU, the same function
computed faster: see below). 121,930 parameters for 28x28x1 inputs and 10
classes, the count Keras reports. The softmax is left to the loss / predictor (logits
out), as usual in PyTorch.
"""

from __future__ import annotations

from torch import nn

from imgcls.models.base import FeaturesHeadNet


class ReferenceCNN(FeaturesHeadNet):
    """Same interface as timm models: forward_features / forward_head / reset_classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28):
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        # Each block pools before its ReLU: max-pooling and ReLU commute (both monotonic), so
        # conv -> pool -> ReLU is the same function as Keras' conv -> ReLU -> pool, with the same
        # gradients (pool-then-ReLU sends each window's gradient to its largest input and gates
        # it by that input's sign; ReLU-then-pool gates first, then routes to the same input),
        # and the ReLU and its backward run on a quarter of the values: 1.17x the training steps
        # per second on 2 CPU cores (bf16, channels-last; bench/reference_pool_order.py).
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # (B,32,13,13) at 28
            nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # (B,64,5,5) at 28
        )
        side = ((img_size - 2) // 2 - 2) // 2
        if side < 1:
            raise ValueError(f"reference_cnn needs inputs of at least 10x10 pixels, got {img_size}")
        self.num_features = 64
        self.pre_logits = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(inplace=True))
        self.fc = nn.Linear(64, num_classes)
