"""The digits data set, its fixed split, loaders, and the seeded FP32 training loop.

scikit-learn's ``load_digits()`` ships 1797 real handwritten digits (8 x 8, values 0..16) inside the
wheel, so everything here works offline. The split is fixed: 80/20, stratified by class,
``random_state=0`` -> 1437 train / 360 test images. Images are float32 tensors ``N x 1 x 8 x 8``
scaled to [0, 1] (divided by 16); labels are int64.

Training is replayable: :func:`fit_classifier` seeds torch, shuffles with its own generator and runs
single-threaded (thread count changes the order of float reductions), so one seed gives the same
weights bit for bit on any machine with the same torch build.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tinyaccel.errors import ShapeError

__all__ = ["DigitsSplit", "load_digits_split", "make_loader", "calibration_batch", "accuracy",
           "fit_classifier", "single_thread", "SPLIT_SEED", "TEST_FRACTION"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2
DIGITS_MAX = 16.0  # load_digits pixel values are integers 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """A digits train/test split: images ``N x 1 x 8 x 8`` float32 in [0, 1], labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return 10


@lru_cache(maxsize=4)
def load_digits_split(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """The digits split: stratified, ``test_fraction`` held out, shuffled by ``seed``.

    The default (seed 0, 20 %) gives 1437 train and 360 test images; every model in the zoo is
    trained and measured on this split. Tensors are shared between calls: do not modify them.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ShapeError(f"test_fraction={test_fraction} must be in (0, 1)")
    digits = load_digits()
    x = (digits.images.astype(np.float32) / DIGITS_MAX)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    return DigitsSplit(torch.from_numpy(np.ascontiguousarray(x_tr)), torch.from_numpy(y_tr),
                       torch.from_numpy(np.ascontiguousarray(x_te)), torch.from_numpy(y_te))


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """A DataLoader over ``(x, y)``; with ``shuffle`` the order comes from a generator seeded by
    ``seed``, so two loaders built alike yield the same batches."""
    if len(x) != len(y):
        raise ShapeError(f"x has {len(x)} samples but y has {len(y)}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)


def calibration_batch(n: int = 256, seed: int = 0) -> torch.Tensor:
    """``n`` training images (never test images) drawn by ``seed``: the PTQ calibration set."""
    split = load_digits_split()
    if not 0 < n <= len(split.x_train):
        raise ShapeError(f"calibration size n={n} must be in 1..{len(split.x_train)}")
    idx = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))[:n]
    return split.x_train[idx]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block (restores the previous thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``, as a fraction."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)


def fit_classifier(model: nn.Module, split: DigitsSplit, epochs: int, seed: int,
                   lr: float = 3e-3, weight_decay: float = 1e-4,
                   batch_size: int = 64) -> dict:
    """Train ``model`` in place with Adam + cosine learning rate and cross-entropy.

    ``model`` must have been built after ``torch.manual_seed(seed)`` for the run to be replayable
    (the trainers in the zoo do this). Returns metrics: ``train_acc``, ``test_acc`` (fractions),
    ``final_loss``, ``epochs``, ``seed``, ``seconds``.
    """
    if epochs < 1:
        raise ShapeError(f"epochs={epochs} must be >= 1")
    start = time.perf_counter()
    with single_thread():
        torch.manual_seed(seed)
        loader = make_loader(split.x_train, split.y_train, batch_size, shuffle=True, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
        loss_fn = nn.CrossEntropyLoss()
        loss = torch.tensor(float("nan"))
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        metrics = {
            "train_acc": accuracy(model, split.x_train, split.y_train),
            "test_acc": accuracy(model, split.x_test, split.y_test),
            "final_loss": float(loss.detach()),
            "epochs": epochs,
            "seed": seed,
        }
    metrics["seconds"] = time.perf_counter() - start
    return metrics
