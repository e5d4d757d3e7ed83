"""A learned PASS gate: which frame patches to recompute, decided on the host from the patch's
pixels against its reference (PASS's learned per-patch gates, in their smallest form).

The comparator on the device fires when any pixel of a patch moved more than a threshold: one
noisy pixel is enough, and a faint real change below the threshold is missed. The learned gate
looks at the whole patch instead -- four statistics of ``d = new - reference`` (INT8 codes):
``max |d|``, ``mean |d|``, the fraction of pixels with ``|d| > 4`` and ``|mean d|`` -- and a
logistic regression trained on clips of the offline video data (:mod:`tinyaccel.models.video`,
training seeds only) to tell real motion (the noiseless frame changed inside the patch) from
sensor noise. Its cut-off is set for a recall of :data:`RECALL` on the training patches whose
noiseless content moved by more than :data:`VISIBLE` grey levels: missing a real change costs
accuracy, a false alarm only cycles.

The host then sends the mask (``LOAD MASK``) and the device copies the marked patches over the
reference (``PATCH given``): :class:`~tinyaccel.sw.pass_stream.PassStream` with ``gate="host"``.
Training is deterministic (fixed iterations of full-batch gradient descent from zero) and takes
about a second, so the gate is trained when needed rather than cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LearnedGate", "patch_features", "train_gate", "RECALL", "TRAIN_SEEDS", "VISIBLE"]

#: Recall on real changes the cut-off is chosen for.
RECALL = 0.99
#: A real change: the noiseless frame moved by more than this many grey levels somewhere in the
#: patch (sub-pixel motion also makes changes of one or two levels at a stroke's soft edge,
#: which no gate can tell from the sensor noise; asking for those fires on every patch).
VISIBLE = 8
#: Clip seeds the gate trains on (the video data's training range; the test scene is seed 0).
TRAIN_SEEDS = range(5000, 5012)
_FEATURES = ("max|d|", "mean|d|", "frac|d|>4", "|mean d|")


def _patches(x: np.ndarray, patch_shape: tuple[int, int]) -> np.ndarray:
    """``(C, H, W)`` -> ``(patches, C*ph*pw)``, patches row-major (the MASK bit order)."""
    c, h, w = x.shape
    ph, pw = patch_shape
    return (x.reshape(c, h // ph, ph, w // pw, pw).transpose(1, 3, 0, 2, 4)
            .reshape((h // ph) * (w // pw), -1))


def patch_features(new: np.ndarray, ref: np.ndarray, patch_shape: tuple[int, int]) -> np.ndarray:
    """float64 ``(patches, 4)``: the gate's statistics of ``new - ref`` per patch."""
    d = _patches(new.astype(np.int16) - ref.astype(np.int16), patch_shape).astype(np.float64)
    a = np.abs(d)
    return np.stack([a.max(axis=1), a.mean(axis=1), (a > 4).mean(axis=1),
                     np.abs(d.mean(axis=1))], axis=1)


@dataclass
class LearnedGate:
    """Logistic regression on :func:`patch_features`; ``gate(new, ref)`` -> bool per patch."""
    weights: np.ndarray  # (4,) on standardized features
    bias: float
    mean: np.ndarray
    std: np.ndarray
    cutoff: float  # probability above which a patch is recomputed
    patch_shape: tuple[int, int]
    train_recall: float = float("nan")
    train_fire_rate: float = float("nan")

    def probability(self, new: np.ndarray, ref: np.ndarray) -> np.ndarray:
        z = (patch_features(new, ref, self.patch_shape) - self.mean) / self.std
        return 1 / (1 + np.exp(-(z @ self.weights + self.bias)))

    def __call__(self, new: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return self.probability(new, ref) > self.cutoff


def train_gate(pairs, patch_shape: tuple[int, int], iterations: int = 2000,
               lr: float = 0.5) -> LearnedGate:
    """Fit the gate on ``pairs`` of ``(new_codes, ref_codes, changed)``: int8 ``(C, H, W)`` frames
    and bool ``(H, W)`` of the pixels whose noiseless value changed between them."""
    feats, labels = [], []
    for new, ref, changed in pairs:
        feats.append(patch_features(new, ref, patch_shape))
        labels.append(_patches(np.asarray(changed, bool)[None], patch_shape).any(axis=1))
    x, y = np.concatenate(feats), np.concatenate(labels).astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = (x - mean) / std
    pos = max(y.mean(), 1e-6)
    sample_w = np.where(y > 0, 0.5 / pos, 0.5 / max(1 - pos, 1e-6))  # balanced classes
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        g = sample_w * (p - y) / len(y)
        w -= lr * (z.T @ g)
        b -= lr * g.sum()
    p = 1 / (1 + np.exp(-(z @ w + b)))
    real = np.sort(p[y > 0])
    cutoff = float(real[int((1 - RECALL) * len(real))] - 1e-12) if len(real) else 0.5
    fire = p > cutoff
    return LearnedGate(w, b, mean, std, cutoff, tuple(patch_shape),
                       train_recall=float(fire[y > 0].mean()) if len(real) else float("nan"),
                       train_fire_rate=float(fire.mean()))
