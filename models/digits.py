"""A small CNN for the 8 x 8 digits: the default model of the inference path.

::

    input 1x8x8
    conv1  3x3, 1 -> 16, pad 1            ReLU   16x8x8
    conv2  3x3, 16 -> 32, stride 2, pad 1 ReLU   32x4x4
    conv3  3x3, 32 -> 32, pad 1           ReLU   32x4x4
    flatten (NCHW order: c*16 + h*4 + w)         512
    fc     Linear 512 -> 10                      logits

Every layer maps onto the accelerator: the convolutions and the linear layer are INT8 GEMMs with a
fused ReLU in the requant unit (see :mod:`tinyaccel.sw.quant`). About 19 k parameters; 20 epochs
reach ~97 % test accuracy in 2-3 s on one CPU thread. (Flatten rather than global pooling: pooling
8x8 digits down to one position costs ~2 pp here; the MobileNet block model covers pooling.)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "DEFAULT_EPOCHS", "NAME"]

NAME = "digits-cnn"
DEFAULT_EPOCHS = 20


class DigitsCNN(nn.Module):
    """conv-ReLU x3 (the second strided), flatten, linear classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.flatten(x))

