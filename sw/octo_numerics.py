"""Octo training numerics: the options, symmetric INT8 rounding and range clipping (PRC).

Forward operands round stochastically (:func:`quantize_stochastic`), backward operands round half
to even after optional clipping (:func:`backward_quantize`), all on a symmetric per-tensor grid
(:func:`symmetric_scale`, codes -127..127). Why each choice: ``docs/octo.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ShapeError

__all__ = ["QMAX", "OctoOptions", "METHODS", "options_for", "symmetric_scale",
           "quantize_stochastic", "quantize_nearest", "clip_range", "backward_quantize"]

QMAX = 127  #: symmetric INT8 grid: codes -127..127 (-128 unused, so negation is exact)


# -- options ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OctoOptions:
    """The switches of INT8 training (each technique: ``docs/octo.md``)."""

    stochastic: bool = True  #: forward pass: stochastic rounding (else round half to even)
    prc: bool = True  #: backward pass: clip dY, X, W before quantizing them
    prc_method: str = "minmax"  #: "minmax" (demo: fraction x min/max) or "sigma" (mean +/- z sd)
    prc_fraction: float = 0.95
    prc_z: float = 2.576
    lac: bool = True  #: a LossAwareCompensation layer after each quantized conv
    lac_mode: str = "element"  #: "element" (C, H, W) or "channel" (C, 1, 1)
    lac_lambda: float = 0.1  #: weight of 0.5 * (|mu|^2 + |offset|^2) in the loss

    def __post_init__(self):
        if self.prc_method not in ("minmax", "sigma"):
            raise ShapeError(f"prc_method={self.prc_method!r} must be 'minmax' or 'sigma'")
        if self.lac_mode not in ("element", "channel"):
            raise ShapeError(f"lac_mode={self.lac_mode!r} must be 'element' or 'channel'")
        if not 0.0 < self.prc_fraction <= 1.0:
            raise ShapeError(f"prc_fraction={self.prc_fraction} must be in (0, 1]")
        if not self.prc_z > 0.0:
            raise ShapeError(f"prc_z={self.prc_z} must be positive")
        if self.lac_lambda < 0.0:
            raise ShapeError(f"lac_lambda={self.lac_lambda} must be >= 0")


#: The training methods. ``fp32`` is plain torch (no conversion).
METHODS: dict[str, OctoOptions | None] = {
    "fp32": None,
    "int8-naive": OctoOptions(stochastic=False, prc=False, lac=False),
    "octo": OctoOptions(),
}


def options_for(method: str, **overrides) -> OctoOptions | None:
    """The :class:`OctoOptions` of ``method`` with ``overrides`` (e.g. ``lac=False``) applied.

    ``None`` overrides are ignored; ``fp32`` takes no overrides and returns ``None``.
    """
    if method not in METHODS:
        raise ShapeError(f"unknown training method {method!r}; choose one of {', '.join(METHODS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = METHODS[method]
    if base is None:
        return None
    return replace(base, **overrides)


# -- quantizers ---------------------------------------------------------------------------------

def symmetric_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric INT8 scale ``max|x| / 127`` (float32, 1.0 for an all-zero tensor)."""
    amax = x.detach().abs().max() if x.numel() else torch.tensor(0.0)
    amax = amax.to(torch.float32)
    return torch.where(amax > 0, amax / QMAX, torch.ones((), dtype=torch.float32))


def quantize_stochastic(x: torch.Tensor, scale: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    """Stochastic rounding to INT8: ``clamp(floor(x/s + U[0, 1)), -127, 127)``.

    Unbiased (``E[q] s = x`` inside the range). ``U`` is drawn from ``generator``, so the same
    generator state gives the same codes.
    """
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    return torch.floor(x.detach() / scale + u).clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_nearest(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round half to even to INT8: ``clamp(round(x/s), -127, 127)`` (NumPy's ``around``)."""
    return torch.round(x.detach() / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def clip_range(x: torch.Tensor, method: str = "minmax", fraction: float = 0.95,
               z: float = 2.576) -> torch.Tensor:
    """PRC: clip ``x`` to a narrower range before quantizing it.

    ``minmax``: ``[fraction * min, fraction * max]`` (Octo's demo; a bound of the other sign than
    its extreme, e.g. ``min > 0``, still clips towards 0 as in the demo).
    ``sigma``: ``[mean - z sd, mean + z sd]`` intersected with ``[min, max]``; ``z = 2.576`` keeps
    99 % of a normal distribution. Statistics in float64 (NumPy, independent of thread count).
    """
    x = x.detach()
    if x.numel() == 0:
        return x
    if method == "minmax":
        lo, hi = fraction * x.min(), fraction * x.max()
        return torch.clamp(x, lo.item(), hi.item())
    if method == "sigma":
        a = x.numpy().astype(np.float64)
        mean, sd = float(a.mean()), float(a.std())
        lo, hi = max(mean - z * sd, float(a.min())), min(mean + z * sd, float(a.max()))
        return torch.clamp(x, lo, hi)
    raise ShapeError(f"PRC method {method!r} must be 'minmax' or 'sigma'")


def backward_quantize(x: torch.Tensor, opts: OctoOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-pass INT8 of ``x``: optional PRC, then round half to even -> (codes, scale)."""
    if opts.prc:
        x = clip_range(x, opts.prc_method, opts.prc_fraction, opts.prc_z)
    scale = symmetric_scale(x)
    return quantize_nearest(x, scale), scale
