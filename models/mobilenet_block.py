"""A MobileNet-style model for the 8 x 8 digits: depthwise convs, ReLU6, a residual add, pooling.

::

    input 1x8x8
    stem      conv 3x3, 1 -> 16, pad 1, BN, ReLU6                          16x8x8
    block     inverted residual (MobileNetV2), expansion 2:
                expand  conv 1x1, 16 -> 32, BN, ReLU6                       32x8x8
                dw      depthwise conv 3x3, 32 groups, pad 1, BN, ReLU6     32x8x8
                project conv 1x1, 32 -> 16, BN  (linear bottleneck)         16x8x8
              + stem output (residual add, no activation)                  16x8x8
    pool      AvgPool2d 2                                                  16x4x4
    sep       depthwise 3x3, 16 groups, pad 1, BN, ReLU6;
              pointwise 1x1, 16 -> 32, BN, ReLU6                           32x4x4
    gap       AdaptiveAvgPool2d 1, flatten                                 32
    fc        Linear 32 -> 10                                              logits

It exists to exercise, end to end, every layer kind beyond the plain CNN: depthwise convolution,
ReLU6 (``clamp_max`` in the requant unit), BatchNorm (folded into the convolutions by the
quantizer), a residual add whose output is signed, windowed and global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetBlockNet", "DEFAULT_EPOCHS", "NAME"]

NAME = "mobilenet-block"
DEFAULT_EPOCHS = 20


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + optional ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(c_out),
        ]
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection, + x."""

    def __init__(self, channels: int, expansion: int = 2):
        super().__init__()
        hidden = channels * expansion
        self.expand = ConvBNReLU6(channels, hidden, 1)
        self.dw = ConvBNReLU6(hidden, hidden, 3, groups=hidden)
        self.project = ConvBNReLU6(hidden, channels, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class MobileNetBlockNet(nn.Module):
    """Stem, one inverted residual block, AvgPool, a depthwise-separable conv, GAP, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBNReLU6(1, width, 3)
        self.block = InvertedResidual(width, expansion=2)
        self.pool = nn.AvgPool2d(2)
        self.sep_dw = ConvBNReLU6(width, width, 3, groups=width)
        self.sep_pw = ConvBNReLU6(width, 2 * width, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        x = self.sep_pw(self.sep_dw(x))
        return self.fc(self.flatten(self.gap(x)))

