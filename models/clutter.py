"""Clutter digits: the digits split drawn on real photographs, with noise and occlusion.

A harder offline classification task than the 8 x 8 digits, for experiments where FP32 must sit
clearly below 100 % so that a one-point loss means something (collaborative learning, training
methods). Every image of the fixed digits split (:func:`tinyaccel.models.data.load_digits_split`:
1437 train / 360 test) becomes :data:`SIZE` x :data:`SIZE` grey images:

- background: a seeded crop of one of scikit-image's photographs (:data:`video.BACKGROUNDS
  <tinyaccel.models.video.BACKGROUNDS>`), grey levels in [``BG_LOW``, ``BG_HIGH``];
- the digit drawn bilinearly at a random size (:data:`DIGIT_PX`) and position, blended with a
  random opacity (:data:`OPACITY`) of bright ink (a faint digit on a bright, busy photo is hard
  to see: the task is meant to have errors);
- with probability :data:`OCCLUDE_P` an opaque bar of random grey, width and orientation crosses
  the image (occlusion);
- Gaussian noise (:data:`NOISE` sigma), then an 8-bit camera's rounding.

Each digit is rendered :data:`RENDERS` times: 4311 training and 1080 test images (one test image
is 0.09 percentage points). Render ``k`` of image ``i`` is drawn from its own generator seeded by
``(seed, part, k, i)``, so the set is the same on every machine. Labels are the digits' labels.
``clutter-cnn`` (:mod:`tinyaccel.models.zoo`) is the model trained on it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from . import video
from .data import DigitsSplit, fit_classifier

__all__ = ["ClutterCNN", "train", "NAME", "DEFAULT_EPOCHS", "SIZE", "DIGIT_PX", "OPACITY",
           "OCCLUDE_P", "NOISE", "PHOTO_PX", "RENDERS", "BG_HIGH", "render", "load_clutter_split"]

NAME = "clutter-cnn"
DEFAULT_EPOCHS = 30
SIZE = 16  #: image side, pixels
DIGIT_PX = (11, 16)  #: digit side drawn, pixels (inclusive range)
OPACITY = (0.7, 1.0)  #: digit blend factor
OCCLUDE_P = 0.3  #: probability of an occluding bar
NOISE = 0.04  #: sigma of the additive Gaussian noise
BG_HIGH = 0.5  #: the brightest background grey (the ink is video.INK)
PHOTO_PX = 96  #: short side of the shrunk photographs crops are cut from
RENDERS = 3  #: renders of each digit of the split (train and test)
_PARTS = {"train": 1, "test": 2}


@lru_cache(maxsize=len(video.BACKGROUNDS))
def _small_photo(name: str) -> np.ndarray:
    """Photo ``name`` shrunk once to :data:`PHOTO_PX` on its short side (crops are then cheap)."""
    from skimage.transform import rescale
    img = video._photo(name)
    return rescale(img, PHOTO_PX / min(img.shape), anti_aliasing=True)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A random crop (photo, zoom, position) of a shrunk photograph, ``SIZE x SIZE``, grey
    levels stretched into [``BG_LOW``, ``BG_HIGH``]."""
    from scipy.ndimage import zoom
    img = _small_photo(video.BACKGROUNDS[int(rng.integers(len(video.BACKGROUNDS)))])
    side = int(rng.integers(SIZE, 3 * SIZE + 1))
    y0 = int(rng.integers(0, img.shape[0] - side + 1))
    x0 = int(rng.integers(0, img.shape[1] - side + 1))
    crop = zoom(img[y0:y0 + side, x0:x0 + side], SIZE / side, order=1, grid_mode=True,
                mode="nearest")[:SIZE, :SIZE]
    lo, hi = np.percentile(crop, 1), np.percentile(crop, 99)
    crop = np.clip((crop - lo) / max(hi - lo, 1e-6), 0, 1)
    return video.BG_LOW + (BG_HIGH - video.BG_LOW) * crop


def render(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One cluttered ``SIZE x SIZE`` float32 image in [0, 1] of an 8 x 8 ``digit`` in [0, 1]."""
    img = _background(rng)
    size = int(rng.integers(DIGIT_PX[0], DIGIT_PX[1] + 1))
    y0, x0 = rng.uniform(-1.0, SIZE - size + 1.0, size=2)
    alpha = video._render(digit, y0, x0, size, SIZE, SIZE) * rng.uniform(*OPACITY)
    img = img * (1.0 - alpha) + video.INK * alpha
    if rng.random() < OCCLUDE_P:
        width = int(rng.integers(1, 4))
        start = int(rng.integers(0, SIZE - width + 1))
        grey = rng.uniform(0.0, 1.0)
        if rng.random() < 0.5:
            img[start:start + width, :] = grey
        else:
            img[:, start:start + width] = grey
    img = img + rng.normal(0.0, NOISE, img.shape)
    return video._quantize(img)


@lru_cache(maxsize=2)
def load_clutter_split(seed: int = 0) -> DigitsSplit:
    """The clutter split: ``N x 1 x SIZE x SIZE`` float32 images in [0, 1] and int64 labels,
    drawn from the fixed digits split (``RENDERS`` x 1437 train / 360 test). Tensors are shared
    between calls: do not modify them."""
    parts = []
    for part in ("train", "test"):
        digits, labels = video._digit_images(part)
        renders = RENDERS
        images = np.stack([render(d, np.random.default_rng((seed, _PARTS[part], k, i)))
                           for k in range(renders) for i, d in enumerate(digits)])
        labels = np.tile(labels.astype(np.int64), renders)
        parts += [torch.from_numpy(images[:, None]), torch.from_numpy(labels)]
    return DigitsSplit(*parts)


class ClutterCNN(nn.Module):
    """The clutter-digits classifier: conv-ReLU x3 (the last two strided), flatten, linear.

    ::

        input 1x16x16
        conv1  3x3, 1 -> 16, pad 1             ReLU   16x16x16
        conv2  3x3, 16 -> 32, stride 2, pad 1  ReLU   32x8x8
        conv3  3x3, 32 -> 32, stride 2, pad 1  ReLU   32x4x4
        flatten                                        512
        fc     Linear 512 -> 10                        logits
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * (SIZE // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.flatten(x))


def train(model: nn.Module, epochs: int, seed: int) -> dict:
    """The zoo trainer: :func:`~tinyaccel.models.data.fit_classifier` on the clutter split."""
    return fit_classifier(model, load_clutter_split(), epochs, seed, lr=3e-3)
