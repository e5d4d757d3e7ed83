"""The four MLPerf Tiny reference models, as mlcommons/tiny's Keras training scripts define them.

==============  ===========================================================  =======  =======
name            architecture (mlcommons/tiny benchmark/training/...)         input    MACs
==============  ===========================================================  =======  =======
ic-resnet8      image_classification/keras_model.py ``resnet_v1_eembc``:     3x32x32  12.5 M
                conv 3x3 16, three stacks of two 3x3 convs (16, 32, 64
                filters; the 2nd and 3rd stride 2 with a 1x1 stride-2 conv
                shortcut, no BN on it), add + ReLU, AvgPool 8, flatten,
                Dense 10
kws-dscnn       keyword_spotting/keras_model.py ``ds_cnn``: conv 64 (10x4)    1x49x10  2.66 M
                stride 2 'same', BN, ReLU, 4 x (depthwise 3x3 + BN + ReLU,
                pointwise 64 + BN + ReLU), AvgPool (24, 5), flatten, Dense 12
vww-mobilenet   visual_wake_words/vww_model.py ``mobilenet_v1`` (alpha      3x96x96  7.49 M
                0.25): conv 3x3 8 stride 2, 13 depthwise-separable blocks
                (8 -> 256 filters), AvgPool 3, flatten, Dense 2
ad-autoencoder  anomaly_detection/keras_model.py: Dense 128 + BN + ReLU x4,  640      0.26 M
                Dense 8 + BN + ReLU, Dense 128 + BN + ReLU x4, Dense 640
==============  ===========================================================  =======  =======

Keras' ``padding='same'`` pads ``total = max((ceil(n / s) - 1) * s + k - n, 0)`` positions,
``total // 2`` before and the rest after: with stride 2 on an even input this is (0, 1) --
asymmetric, which PyTorch's ``Conv2d(padding=...)`` cannot express -- so :class:`SameConv2d`
pads with ``F.pad`` first when the two sides differ (the front end folds the pad into the
convolution's padding, filled with the input zero point). Keras layers have biases by default
(``use_bias=True``), so every conv and dense layer here has one. The softmax of the Keras heads is
left out: the models return logits.

The datasets (CIFAR-10, Speech Commands, COCO person, ToyADMOS) cannot be downloaded here, so the
zoo gives these models **seeded random weights** (PyTorch's default initialization from the seed)
whose BatchNorm running statistics are calibrated on seeded random inputs
(:func:`calibrate_batchnorm`); no accuracy is claimed. Latency and link traffic depend on the
architecture alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the universal torch idiom
from torch import nn

__all__ = ["same_padding", "SameConv2d", "ResNet8", "DSCNN", "MobileNetV1", "FCAutoencoder",
           "calibrate_batchnorm", "random_inputs", "seeded_random", "PUBLISHED_MACS",
           "BN_CALIBRATION_SAMPLES"]

#: Seeded random inputs whose batch statistics become the BatchNorm running statistics.
BN_CALIBRATION_SAMPLES = 256

#: Millions of MACs per inference as published (MLPerf Tiny, quoted in issue 12), as written:
#: a count agrees when it rounds to the same digits.
PUBLISHED_MACS = {"ic-resnet8": "12.5", "kws-dscnn": "2.66", "vww-mobilenet": "7.49",
                  "ad-autoencoder": "0.26"}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras 'same' padding of one axis: ``(before, after)`` (``after`` may be one more)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Module):
    """A Conv2d with Keras 'same' padding for an ``h x w`` input (symmetric or not)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int,
                 size: tuple[int, int], groups: int = 1):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        (top, bottom), (left, right) = (same_padding(size[0], kh, stride),
                                        same_padding(size[1], kw, stride))
        symmetric = top == bottom and left == right
        self.pad = None if symmetric else (left, right, top, bottom)  # F.pad order
        self.conv = nn.Conv2d(c_in, c_out, (kh, kw), stride,
                              padding=(top, left) if symmetric else 0, groups=groups)
        self.out_size = (-(-size[0] // stride), -(-size[1] // stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x if self.pad is None else F.pad(x, self.pad))


def _conv_bn_relu(c_in, c_out, kernel, stride, size, groups=1, relu=True) -> nn.Sequential:
    layers = [SameConv2d(c_in, c_out, kernel, stride, size, groups), nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualStack(nn.Module):
    """ResNet v1 stack: two 3x3 convs; identity shortcut, or a 1x1 conv (no BN) when strided."""

    def __init__(self, c_in: int, c_out: int, stride: int, size: tuple[int, int]):
        super().__init__()
        self.conv1 = _conv_bn_relu(c_in, c_out, 3, stride, size)
        out = self.conv1[0].out_size
        self.conv2 = _conv_bn_relu(c_out, c_out, 3, 1, out, relu=False)
        self.shortcut = SameConv2d(c_in, c_out, 1, stride, size) if stride != 1 else None
        self.relu = nn.ReLU()
        self.out_size = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return self.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class ResNet8(nn.Module):
    """MLPerf Tiny image classification: ResNet-8 for 32x32 CIFAR-10 (16/32/64 filters)."""

    def __init__(self, filters: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_relu(3, filters, 3, 1, (32, 32))
        self.stack1 = ResidualStack(filters, filters, 1, (32, 32))
        self.stack2 = ResidualStack(filters, 2 * filters, 2, self.stack1.out_size)
        self.stack3 = ResidualStack(2 * filters, 4 * filters, 2, self.stack2.out_size)
        self.pool = nn.AvgPool2d(self.stack3.out_size)
        self.fc = nn.Linear(4 * filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stack3(self.stack2(self.stack1(self.stem(x)))))
        return self.fc(x.view(x.size(0), -1))  # the common PyTorch flatten


class DSCNN(nn.Module):
    """MLPerf Tiny keyword spotting: DS-CNN on 49x10 MFCC features, 12 classes."""

    def __init__(self, filters: int = 64, blocks: int = 4, num_classes: int = 12):
        super().__init__()
        self.conv1 = _conv_bn_relu(1, filters, (10, 4), 2, (49, 10))
        size = self.conv1[0].out_size  # 25 x 5
        self.drop1 = nn.Dropout(0.2)
        self.blocks = nn.Sequential(*[nn.Sequential(
            _conv_bn_relu(filters, filters, 3, 1, size, groups=filters),
            _conv_bn_relu(filters, filters, 1, 1, size)) for _ in range(blocks)])
        self.drop2 = nn.Dropout(0.4)
        self.pool = nn.AvgPool2d((49 // 2, 10 // 2))  # Keras: (int(49/2), int(10/2)) on 25x5
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop2(self.blocks(self.drop1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


class MobileNetV1(nn.Module):
    """MLPerf Tiny visual wake words: MobileNetV1 alpha 0.25 on 96x96 RGB, 2 classes."""

    #: (pointwise filters, depthwise stride) of the 13 depthwise-separable blocks
    BLOCKS = ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (128, 1),
              (128, 1), (128, 1), (128, 1), (256, 2), (256, 1))

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.stem = _conv_bn_relu(3, 8, 3, 2, (96, 96))
        size, c, blocks = self.stem[0].out_size, 8, []
        for filters, stride in self.BLOCKS:
            dw = _conv_bn_relu(c, c, 3, stride, size, groups=c)
            size = dw[0].out_size
            blocks.append(nn.Sequential(dw, _conv_bn_relu(c, filters, 1, 1, size)))
            c = filters
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AvgPool2d(size)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


class FCAutoencoder(nn.Module):
    """MLPerf Tiny anomaly detection: the 640-128x4-8-128x4-640 dense autoencoder."""

    def __init__(self, features: int = 640, hidden: int = 128, bottleneck: int = 8):
        super().__init__()
        widths = [features] + [hidden] * 4 + [bottleneck] + [hidden] * 4
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        layers.append(nn.Linear(hidden, features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def random_inputs(input_shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """Seeded stand-in inputs: images uniform in [0, 1] (3 channels), features N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    if len(input_shape) == 3 and input_shape[0] == 3:
        return torch.rand((n, *input_shape), generator=g)
    return torch.randn((n, *input_shape), generator=g)


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to the batch statistics of ``x`` (in place).

    Random weights with BatchNorm's initial statistics (mean 0, var 1) let activations grow or
    vanish from layer to layer; with statistics measured on inputs the network is well scaled,
    as a trained one is. ``running_var`` gets the biased batch variance, the one train mode
    normalizes with (PyTorch would store the unbiased one), so the model in eval mode computes
    on ``x`` exactly what the calibration pass computed. Returns the model in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    samples: dict[nn.Module, int] = {}  # values per channel each BatchNorm saw

    def record(m, inputs, output):
        samples[m] = inputs[0].numel() // inputs[0].shape[1]

    hooks = [m.register_forward_hook(record) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the exact batch statistics
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # dropout would perturb the statistics
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for m in norms:
        n = samples[m]
        m.running_var.mul_((n - 1) / n)  # unbiased -> biased
        m.momentum = 0.1
    return model.eval()


def seeded_random(model: nn.Module, input_shape: tuple[int, ...], seed: int) -> nn.Module:
    """``model`` (initialized from ``seed``) with BatchNorm calibrated on seeded random inputs.

    The inputs are ``random_inputs(input_shape, BN_CALIBRATION_SAMPLES, seed + 1)``.

    The zoo's stand-in for training when the dataset cannot be downloaded: no accuracy is claimed.
    """
    return calibrate_batchnorm(model, random_inputs(input_shape, BN_CALIBRATION_SAMPLES,
                                                    seed + 1))
