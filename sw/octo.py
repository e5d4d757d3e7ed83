"""Octo-style INT8 training: every Conv2d/Linear GEMM, forward and backward, on the accelerator.

Octo (Zhou et al., USENIX ATC'21) trains with INT8 arithmetic in both passes and keeps accuracy
with *Loss-aware Compensation* (LAC) and *Parameterized Range Clipping* (PRC). Here each
``Conv2d``/``Linear`` becomes a torch autograd Function whose three GEMMs run as
INT8 x INT8 -> INT32 on a :class:`~tinyaccel.sw.runtime.Device` (golden model, RTL or board; the
INT32 results come back through the ``STORE ACC`` bypass, ``docs/architecture.md`` sections 5-6):

==========  ========================================  =============================================
GEMM        operands (INT8)                           result (dequantized on the host)
==========  ========================================  =============================================
forward     ``q_x`` (SR) x ``q_w`` (SR)               ``y  = s_x s_w (im2col(q_x) q_w^T) + b``
dX          ``q_dy`` x ``q_w'`` (RHE, PRC)            ``dX = s_dy s_w' col2im(q_dy q_w')``
dW          ``q_x'`` (RHE, PRC) x ``q_dy`` (RHE, PRC) ``dW = s_x' s_dy (im2col(q_x')^T q_dy)^T``
==========  ========================================  =============================================

The host does quantization, im2col/col2im (col2im sums the exact INT32 columns in int64 before
scaling), bias, LAC, loss and optimizer. :func:`convert` swaps a user's ``nn.Conv2d``/``nn.Linear``
(and ``nn.ReLU``) modules for :class:`OctoConv2d`/:class:`OctoLinear` (and :class:`OctoReLU`), so
any ``nn.Module`` built from them trains this way::

    model = convert(MyNet(), "octo", Device("golden", "sim"), example_input=x[:1])
    loss = F.cross_entropy(model(x), y) + lac_penalty(model)
    loss.backward()                      # dX and dW GEMMs run on the device

Our reading of Octo's public demo code, confirmed
-------------------------------------------------
We read ``kimihe/Octo`` ("Octo Demo" ver0.8.1: ``quantizer/KMQuantizer_v3.py``,
``common/layers.py``, ``simplecnn_lac/simplecnn_LAC_mnist.py``). Each point: what the demo does,
what we do, and why. Every technique is a switch (:class:`OctoOptions`).

1. **Forward: stochastic rounding** — confirmed. ``probabilistic_round`` is
   ``floor(x/s + U[0,1))`` on per-tensor scales for conv activations and weights. The demo's grid
   is ``(max-min)/510`` with ``q`` in [-255, 255] and a zero point that its dequantization
   (``s_x s_w acc``) ignores, so it is neither INT8 nor exact for one-signed tensors (ReLU outputs).
   **Ours**: symmetric per-tensor INT8, ``s = max|x|/127``, ``q = clamp(floor(x/s + u), -127, 127)``
   with ``u`` from a per-layer seeded ``torch.Generator`` (replayable); no zero point, so the
   accelerator's signed INT8 GEMM and ``s_x s_w acc`` are exact. In eval mode the forward rounds to
   nearest (half to even) and draws no random numbers. Switch: ``stochastic``.
   The demo's Affine layers round to nearest in the forward pass; ours treat Linear like Conv2d.
2. **Backward: symmetric INT8, round half to even** — confirmed: ``bp_dout_quantize``,
   ``bp_col_quantize``, ``bp_col_W_quantize`` use ``np.around`` (half to even) on a symmetric grid.
   **Ours**: ``torch.round`` (half to even), ``s = max|x|/127`` of the (clipped) tensor, clamp to
   ±127 (the demo's ``(max-min)/254`` can exceed ±127 when the tensor is not centred). ``dW`` and
   ``dX`` are INT8 GEMMs as in the demo.
3. **PRC** — confirmed placement, two variants. The demo's ``parametrized_range_clipping(t, z)``
   clips to ``[0.95 min, 0.95 max]`` (``z`` is accepted and unused) and is applied, in backward
   only, to ``dout``, ``col = im2col(X)`` and ``col_W = W`` (forward clipping flags exist, default
   off).
   **Ours**: ``prc_method="minmax"`` (the demo, ``fraction=0.95``) or ``"sigma"`` (the paper's
   intent: ``[mean - z sigma, mean + z sigma]`` intersected with ``[min, max]``, ``z = 2.576`` for
   99 %; statistics in float64 NumPy, thread-independent). Applied to ``dY``, ``X`` and ``W`` of the
   backward pass. ``X`` is clipped before im2col, not after: we save one INT8 copy of ``X`` rather
   than the 9x larger im2col. For ``minmax`` that is the same clipping whenever 0 (the padding) lies
   in the clipped range (always for ReLU outputs and images); for ``sigma`` the statistics are over
   ``X``'s elements instead of im2col's border-weighted multiset. Default ``minmax``, chosen by
   measurement: digits CNN, 10 epochs, seeds 0-2, test accuracy ``minmax`` 97.13 ± 0.32 % vs
   ``sigma`` 95.46 ± 1.16 % (final train loss 0.003 vs 0.15): gradients are heavy-tailed, and
   clipping ``dY`` at 2.576 sd cuts the few large entries that carry most of the signal.
   Switch: ``prc``, ``prc_method``.
4. **LAC** — confirmed form and penalty, placement adapted. The demo's ``Compensation`` layer is
   ``y = x + alpha * mu + offset`` with ``alpha = 1``, ``mu, offset ~ 1e-3 N(0, 1)``, all learned,
   between each quantized conv and its BatchNorm, and the loss adds
   ``0.5 * lambda * (|mu|^2 + |offset|^2)``, ``lambda = 0.1`` (``alpha`` unregularized). Its
   parameters are element-wise over ``(batch, C, H, W)``: each *batch slot* has its own
   compensation, which ties the model to one batch size. **Ours**: element-wise over ``(C, H, W)``
   shared by every sample (``lac_mode="element"``, needs ``example_input`` to size it) or
   channel-wise ``(C, 1, 1)`` (``lac_mode="channel"``); directly after each quantized conv (before
   BN/ReLU, as in the demo; the digits CNN has no BN); ``lambda = 0.1``; not after Linear (nor in
   the demo). Element-wise is the default (the demo's form); channel-wise measured the same
   within noise on digits (97.31 ± 0.42 % vs 97.13 ± 0.32 %, same runs as above) with
   ``C`` instead of ``C*H*W`` parameters per layer. Switch: ``lac``, ``lac_mode``, ``lac_lambda``.
5. **Memory** — the demo's LAC scheme keeps FP32 ``im2col(X)`` and FP32 ``W`` for backward (no
   saving; only its Affine "memory_saving" path reuses the forward INT8 ``x``). **Ours** saves, per
   layer, the INT8 backward copy of ``X`` (PRC + RHE, made in the forward pass) and its scale;
   :class:`OctoReLU` saves its derivative as a packed bit mask (exact: ReLU's backward only needs
   ``x > 0``). Both are measured from the tensors actually saved (:class:`SavedTensorMeter`):
   digits CNN, 2368 B/sample vs 10496 B/sample for FP32 torch (4.43x; 3.57x against an FP32
   that saved every activation once — torch also keeps a flattened copy of the channels-last conv3
   output). Without the bit masks the FP32 ReLU outputs dominate (10304 B/sample, ~1x).
6. **Bias gradient** — the demo fake-quantizes ``db``; ours sums ``dY`` on the host in float64
   (bias is host float glue, not a GEMM).

Determinism: GEMMs are exact integers on every backend, SR draws come from seeded per-layer
generators (their states are part of :func:`octo_state`), NumPy does the statistics and col2im in
a fixed order. Run the torch host math single-threaded (``tinyaccel.models.data.single_thread``,
as :mod:`tinyaccel.sw.train` does) so reductions in loss and optimizer do not depend on threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from ..errors import ShapeError, TrainingDivergedError, UnsupportedLayerError
from ..hw.isa import Counter, Opcode
from ..protocol import Program
from ..sim.numerics import exact_gemm, im2col
from .gemm import lower_gemm

__all__ = [
    "QMAX", "TrainingDivergedError", "OctoOptions", "METHODS", "options_for",
    "symmetric_scale", "quantize_stochastic", "quantize_nearest", "clip_range", "col2im_int",
    "GemmExecutor", "GemmStats", "Int8Conv2dFn", "Int8LinearFn", "PackedReluFn",
    "LossAwareCompensation", "OctoConv2d", "OctoLinear", "OctoReLU", "convert", "octo_layers",
    "lac_penalty", "octo_state", "load_octo_state", "executor_of", "SavedTensorMeter",
]

QMAX = 127  #: symmetric INT8 grid: codes -127..127 (-128 unused, so negation is exact)



def _check_finite(t: torch.Tensor, layer: str, tensor: str) -> None:
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[0].item()
        raise TrainingDivergedError(f"first bad value {bad}", layer=layer, tensor=tensor)


# -- options ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OctoOptions:
    """The switches of INT8 training (see the module docstring for each technique)."""

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


def _backward_quantize(x: torch.Tensor, opts: OctoOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-pass INT8 of ``x``: optional PRC, then round half to even -> (codes, scale)."""
    if opts.prc:
        x = clip_range(x, opts.prc_method, opts.prc_fraction, opts.prc_z)
    scale = symmetric_scale(x)
    return quantize_nearest(x, scale), scale


def col2im_int(cols: np.ndarray, x_shape: tuple[int, int, int, int], kernel_size, stride=1,
               padding=0, dilation=1) -> np.ndarray:
    """Adjoint of :func:`~tinyaccel.sim.numerics.im2col`, exact: sum GEMM columns into int64 NCHW.

    ``cols`` is ``(N*Ho*Wo, C*kh*kw)`` (integers); the overlapping contributions are added in
    int64 in a fixed order, so the result does not depend on threads or summation order.
    """
    def pair(v):
        return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))

    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(pair, (kernel_size, stride, padding, dilation))
    n, c, h, w = x_shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if cols.shape != (n * ho * wo, c * kh * kw):
        raise ShapeError(f"col2im: columns of shape {cols.shape} do not match input {x_shape} "
                         f"with kernel {kh}x{kw} (expected {(n * ho * wo, c * kh * kw)})")
    blocks = cols.reshape(n, ho, wo, c, kh, kw)
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), np.int64)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            xp[:, :, r0:r0 + sh * (ho - 1) + 1:sh, c0:c0 + sw * (wo - 1) + 1:sw] += \
                blocks[..., i, j].transpose(0, 3, 1, 2)
    return xp[:, :, ph:ph + h, pw:pw + w]


# -- the accelerator side -----------------------------------------------------------------------

@dataclass
class GemmStats:
    """What the GEMMs of one layer and phase cost."""

    programs: int = 0
    gemms: int = 0
    macs: int = 0  # useful MACs (M x N x K)
    cycles: int = 0  # accelerator cycles (0 on the golden model)
    wall_s: float = 0.0


class GemmExecutor:
    """Runs groups of INT8 GEMMs, one device program per group, INT32 results via ``STORE ACC``.

    ``device=None`` computes them on the host with :func:`~tinyaccel.sim.numerics.exact_gemm`
    (a reference executor, no accelerator). Statistics are kept per ``(layer, phase)``.
    """

    def __init__(self, device=None):
        self.device = device
        self.stats: dict[tuple[str, str], GemmStats] = {}

    @property
    def backend(self) -> str:
        return "host" if self.device is None else self.device.backend.name

    def run(self, gemms: list[tuple[np.ndarray, np.ndarray]], layer: str = "?",
            phase: str = "?") -> list[np.ndarray]:
        """``[(A int8 (M, K), B int8 (K, N)), ...]`` -> ``[A @ B as int32 (M, N), ...]``."""
        start = time.perf_counter()
        st = self.stats.setdefault((layer, phase), GemmStats())
        st.gemms += len(gemms)
        st.macs += sum(a.shape[0] * a.shape[1] * b.shape[1] for a, b in gemms)
        if self.device is None:
            out = [exact_gemm(a, b) for a, b in gemms]
        else:
            config = self.device.config
            program = Program(config)
            lowerings = [lower_gemm(config, program, np.ascontiguousarray(a),
                                    np.ascontiguousarray(b), out="int32") for a, b in gemms]
            program.sync(counters=True, clear=True)
            responses = self.device.run(program)
            stores = [r for instr, r in zip(program.instructions, responses, strict=True)
                      if instr.opcode == Opcode.STORE]
            out, pos = [], 0
            for lowering in lowerings:
                n = lowering.store_count
                out.append(lowering.collect(stores[pos:pos + n]))
                pos += n
            st.programs += 1
            st.cycles += int(responses[-1].counters[Counter.CYCLES])
        st.wall_s += time.perf_counter() - start
        return out

    def totals(self) -> GemmStats:
        """Sums over every layer and phase."""
        total = GemmStats()
        for st in self.stats.values():
            for name in ("programs", "gemms", "macs", "cycles", "wall_s"):
                setattr(total, name, getattr(total, name) + getattr(st, name))
        return total

    def reset_stats(self) -> None:
        self.stats.clear()


@dataclass
class _LayerRuntime:
    """Per-layer state the autograd Functions need (not tensors, so not an autograd input)."""

    name: str
    options: OctoOptions
    executor: GemmExecutor
    generator: torch.Generator = field(default_factory=torch.Generator)


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _dequantize(acc: np.ndarray, *scales: torch.Tensor) -> torch.Tensor:
    """``acc * prod(scales)`` in float64, returned as float32 (exact int -> float64)."""
    s = 1.0
    for scale in scales:
        s *= float(scale)
    return torch.from_numpy((acc.astype(np.float64) * s).astype(np.float32))


def _forward_quantize(x: torch.Tensor, rt: _LayerRuntime, stochastic: bool):
    scale = symmetric_scale(x)
    if stochastic:
        return quantize_stochastic(x, scale, rt.generator), scale
    return quantize_nearest(x, scale), scale


def _saved_x(x: torch.Tensor, q_x: torch.Tensor, s_x: torch.Tensor, opts: OctoOptions,
             stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The INT8 copy of ``x`` kept for the dW GEMM (reuses the forward codes when identical)."""
    if not opts.prc and not stochastic:
        return q_x, s_x  # the forward codes are already round-half-even of the unclipped x
    return _backward_quantize(x, opts)


def _bias_grad(dy: np.ndarray, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(dy.astype(np.float64).sum(axis=axes).astype(np.float32))


class Int8LinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with the forward, dX and dW GEMMs in INT8 on the device.

    ``apply(x (N, in), weight (out, in), bias or None, runtime, stochastic)``; ``runtime`` is the
    layer's :class:`_LayerRuntime` (name, options, executor, SR generator).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rt: _LayerRuntime, stochastic: bool):
        _check_finite(x, rt.name, "input")
        _check_finite(weight, rt.name, "weight")
        q_x, s_x = _forward_quantize(x, rt, stochastic)
        q_w, s_w = _forward_quantize(weight, rt, stochastic)
        (acc,) = rt.executor.run([(_to_np(q_x), np.ascontiguousarray(_to_np(q_w).T))],
                                 rt.name, "forward")
        y = _dequantize(acc, s_x, s_w)
        if bias is not None:
            y = y + bias.detach()
        ctx.rt = rt
        ctx.has_bias = bias is not None
        if ctx.needs_input_grad[1]:
            q_xb, s_xb = _saved_x(x, q_x, s_x, rt.options, stochastic)
            ctx.save_for_backward(weight, q_xb, s_xb)
        else:
            ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        rt: _LayerRuntime = ctx.rt
        _check_finite(dy, rt.name, "grad_output")
        weight = ctx.saved_tensors[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        q_dy, s_dy = _backward_quantize(dy, rt.options)
        q_dy_np = _to_np(q_dy)
        gemms, dx, dw, db = [], None, None, None
        if need_x:
            q_w, s_w = _backward_quantize(weight, rt.options)
            gemms.append((q_dy_np, _to_np(q_w)))  # (N, out) @ (out, in)
        if need_w:
            q_xb, s_xb = ctx.saved_tensors[1:3]
            gemms.append((np.ascontiguousarray(_to_np(q_xb).T), q_dy_np))  # (in, N) @ (N, out)
        results = rt.executor.run(gemms, rt.name, "backward") if gemms else []
        if need_x:
            dx = _dequantize(results.pop(0), s_dy, s_w)
        if need_w:
            dw = _dequantize(np.ascontiguousarray(results.pop(0).T), s_xb, s_dy)
        if need_b and ctx.has_bias:
            db = _bias_grad(_to_np(dy), (0,))
        return dx, dw, db, None, None


def _transposed_padding(ksize, stride, padding, dilation) -> tuple[int, int] | None:
    """Padding of dY that makes dX a stride-1 correlation with the flipped kernel, or ``None``
    (stride > 1, or padding beyond the kernel's reach) when dX goes through host col2im."""
    if tuple(stride) != (1, 1):
        return None
    pads = tuple(d * (k - 1) - p for k, p, d in zip(ksize, padding, dilation, strict=True))
    return pads if min(pads) >= 0 else None


class Int8Conv2dFn(torch.autograd.Function):
    """2-D convolution (groups = 1) with the forward, dX and dW GEMMs in INT8 on the device.

    ``apply(x (N, C, H, W), weight (O, C, kh, kw), bias or None, runtime, stochastic, stride,
    padding, dilation)``. im2col on the host; zero padding is exact (0 quantizes to 0). dX: for
    stride 1 one GEMM of ``im2col(dY padded)`` with the flipped kernel (the accelerator sums the
    overlaps); otherwise ``dY W`` columns summed by :func:`col2im_int` on the host. Both are the
    same exact integers.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rt: _LayerRuntime, stochastic: bool, stride, padding,
                dilation):
        _check_finite(x, rt.name, "input")
        _check_finite(weight, rt.name, "weight")
        cout, cin, kh, kw = weight.shape
        if x.dim() != 4 or x.shape[1] != cin:
            raise ShapeError(f"layer {rt.name!r}: input of shape {tuple(x.shape)}, the conv "
                             f"takes (N, {cin}, H, W)")
        q_x, s_x = _forward_quantize(x, rt, stochastic)
        q_w, s_w = _forward_quantize(weight, rt, stochastic)
        cols = im2col(_to_np(q_x), (kh, kw), stride, padding, dilation)
        (acc,) = rt.executor.run([(cols, np.ascontiguousarray(_to_np(q_w).reshape(cout, -1).T))],
                                 rt.name, "forward")
        n, _, h, w = x.shape
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        y = _dequantize(acc, s_x, s_w).reshape(n, ho, wo, cout).permute(0, 3, 1, 2)
        if bias is not None:
            y = y + bias.detach().view(1, -1, 1, 1)
        y = y.contiguous()
        ctx.rt, ctx.geometry = rt, (tuple(x.shape), (kh, kw), stride, padding, dilation)
        ctx.has_bias = bias is not None
        if ctx.needs_input_grad[1]:
            q_xb, s_xb = _saved_x(x, q_x, s_x, rt.options, stochastic)
            ctx.save_for_backward(weight, q_xb, s_xb)
        else:
            ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        rt: _LayerRuntime = ctx.rt
        _check_finite(dy, rt.name, "grad_output")
        x_shape, ksize, stride, padding, dilation = ctx.geometry
        weight = ctx.saved_tensors[0]
        cout = weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        q_dy, s_dy = _backward_quantize(dy, rt.options)
        q_dy_rows = np.ascontiguousarray(_to_np(q_dy).transpose(0, 2, 3, 1).reshape(-1, cout))
        gemms, dx, dw, db = [], None, None, None
        transposed = _transposed_padding(ksize, stride, padding, dilation)
        if need_x:
            q_w, s_w = _backward_quantize(weight, rt.options)
            q_w_np = _to_np(q_w)
            if transposed is not None:
                # Stride 1: dX is the correlation of dY, padded, with the flipped kernel; the
                # accelerator does the col2im sum in its K reduction and returns C, not C*kh*kw,
                # columns per position.
                rows = im2col(_to_np(q_dy), ksize, 1, transposed, dilation)
                flipped = q_w_np[:, :, ::-1, ::-1].transpose(0, 2, 3, 1).reshape(-1, x_shape[1])
                gemms.append((rows, np.ascontiguousarray(flipped)))  # (N H W, O kh kw) @ (., C)
            else:
                gemms.append((q_dy_rows, q_w_np.reshape(cout, -1)))  # (M, O) @ (O, C kh kw)
        if need_w:
            q_xb, s_xb = ctx.saved_tensors[1:3]
            cols = im2col(_to_np(q_xb), ksize, stride, padding, dilation)
            gemms.append((np.ascontiguousarray(cols.T), q_dy_rows))  # (C kh kw, M) @ (M, O)
        results = rt.executor.run(gemms, rt.name, "backward") if gemms else []
        if need_x:
            acc = results.pop(0)
            if transposed is not None:
                n, c, h, w = x_shape
                acc = acc.reshape(n, h, w, c).transpose(0, 3, 1, 2)
            else:
                acc = col2im_int(acc, x_shape, ksize, stride, padding, dilation)
            dx = _dequantize(np.ascontiguousarray(acc), s_dy, s_w)
        if need_w:
            dw = _dequantize(np.ascontiguousarray(results.pop(0).T), s_xb, s_dy)
            dw = dw.reshape(weight.shape)
        if need_b and ctx.has_bias:
            db = _bias_grad(_to_np(dy), (0, 2, 3))
        return dx, dw, db, None, None, None, None, None


class PackedReluFn(torch.autograd.Function):
    """ReLU that saves its derivative ``x > 0`` as a packed bit mask (1 bit per element).

    Bit for bit the same gradient as ``torch.relu``; 32x less saved memory than its FP32 output.
    """

    @staticmethod
    def forward(ctx, x):
        positive = _to_np(x > 0)
        ctx.shape = x.shape
        ctx.save_for_backward(torch.from_numpy(np.packbits(positive.reshape(-1))))
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, dy):
        (bits,) = ctx.saved_tensors
        n = math.prod(ctx.shape)
        mask = np.unpackbits(bits.numpy(), count=n).reshape(ctx.shape).astype(bool)
        return dy * torch.from_numpy(mask)


# -- modules ------------------------------------------------------------------------------------

class LossAwareCompensation(nn.Module):
    """Octo's LAC layer: ``y = x + alpha * mu + offset``, all three learned.

    ``shape`` is ``(C, H, W)`` (element-wise) or ``(C, 1, 1)`` (channel-wise); ``alpha`` starts at
    1, ``mu`` and ``offset`` at ``1e-3 N(0, 1)`` drawn from ``generator``. :meth:`penalty` is
    ``0.5 * lambda * (|mu|^2 + |offset|^2)``, added to the loss by :func:`lac_penalty`.
    """

    def __init__(self, shape: tuple[int, ...], lam: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.lam = lam
        self.alpha = nn.Parameter(torch.ones(shape))
        self.mu = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
        self.offset = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha * self.mu + self.offset)

    def penalty(self) -> torch.Tensor:
        return 0.5 * self.lam * (self.mu.square().sum() + self.offset.square().sum())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.alpha.shape)}, lambda={self.lam}"


class _OctoLayer(nn.Module):
    def _setup(self, source: nn.Module, rt: _LayerRuntime):
        self.weight = source.weight
        self.bias = source.bias
        self.runtime = rt

    @property
    def stochastic(self) -> bool:
        return self.training and self.runtime.options.stochastic


class OctoConv2d(_OctoLayer):
    """A ``Conv2d`` whose GEMMs run in INT8 on the accelerator (:class:`Int8Conv2dFn`), followed
    by its :class:`LossAwareCompensation` when LAC is on. Shares the original's parameters."""

    def __init__(self, conv: nn.Conv2d, rt: _LayerRuntime,
                 lac: LossAwareCompensation | None = None):
        super().__init__()
        if conv.groups != 1:
            raise UnsupportedLayerError(f"layer {rt.name!r}: Conv2d with groups={conv.groups}; "
                                        "INT8 training supports groups=1")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedLayerError(
                f"layer {rt.name!r}: Conv2d padding={conv.padding!r} mode "
                f"{conv.padding_mode!r}; INT8 training supports numeric zero padding")
        self._setup(conv, rt)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.lac = lac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Int8Conv2dFn.apply(x, self.weight, self.bias, self.runtime, self.stochastic,
                               tuple(self.stride), tuple(self.padding), tuple(self.dilation))
        return self.lac(y) if self.lac is not None else y

    def extra_repr(self) -> str:
        o, c, kh, kw = self.weight.shape
        return (f"{c}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, options={self.runtime.options}")


class OctoLinear(_OctoLayer):
    """A ``Linear`` whose GEMMs run in INT8 on the accelerator (:class:`Int8LinearFn`)."""

    def __init__(self, linear: nn.Linear, rt: _LayerRuntime):
        super().__init__()
        self._setup(linear, rt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = Int8LinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.runtime,
                               self.stochastic)
        return y.reshape(*lead, -1)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"in_features={i}, out_features={o}, options={self.runtime.options}"


class OctoReLU(nn.Module):
    """ReLU saving a packed bit mask for backward (:class:`PackedReluFn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PackedReluFn.apply(x)


def _layer_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _conv_output_shapes(model: nn.Module, example_input: torch.Tensor, names: list[str]):
    shapes, handles = {}, []
    for name in names:
        def hook(_m, _i, out, name=name):
            shapes[name] = tuple(out.shape[1:])
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def convert(model: nn.Module, method: str = "octo", device=None, *, lac: bool | None = None,
            prc: bool | None = None, stochastic: bool | None = None,
            prc_method: str | None = None, lac_mode: str | None = None,
            lac_lambda: float | None = None, example_input: torch.Tensor | None = None,
            seed: int = 0, relu: bool = True) -> nn.Module:
    """Swap ``model``'s ``Conv2d``/``Linear`` (and ``ReLU``) modules in place for INT8 versions.

    Parameters
    ----------
    model:
        Any ``nn.Module``; its ``nn.Conv2d`` (groups = 1, zero padding) and ``nn.Linear``
        submodules become :class:`OctoConv2d` / :class:`OctoLinear` sharing their parameters.
    method:
        ``"fp32"`` (returns ``model`` untouched), ``"int8-naive"`` or ``"octo"``.
    device:
        A :class:`~tinyaccel.sw.runtime.Device` running the GEMMs, or ``None`` for the host
        reference executor (:func:`~tinyaccel.sim.numerics.exact_gemm`).
    lac, prc, stochastic, prc_method, lac_mode, lac_lambda:
        Override the method's :class:`OctoOptions` (ablations); ``None`` keeps the default.
    example_input:
        A batch the model accepts; needed by element-wise LAC to size each compensation.
    seed:
        Seeds the LAC initialization and each layer's stochastic-rounding generator.
    relu:
        Also swap ``nn.ReLU`` for :class:`OctoReLU` (bit-mask saved for backward; exact).

    Returns the same ``model`` object. Raises :class:`~tinyaccel.sw.quant.UnsupportedLayerError`
    for a Conv2d the path cannot run (naming it) and :class:`~tinyaccel.errors.ShapeError` for bad
    options or a missing ``example_input``.
    """
    opts = options_for(method, lac=lac, prc=prc, stochastic=stochastic, prc_method=prc_method,
                       lac_mode=lac_mode, lac_lambda=lac_lambda)
    if opts is None:
        if any(v is not None for v in (lac, prc, stochastic, prc_method, lac_mode, lac_lambda)):
            raise ShapeError("method 'fp32' takes no INT8 options (lac, prc, ...)")
        return model
    executor = GemmExecutor(device)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU))
               and not isinstance(m, (OctoConv2d, OctoLinear))]
    convs = [name for name, m in targets if isinstance(m, nn.Conv2d)]
    shapes = {}
    if opts.lac and convs:
        if opts.lac_mode == "element":
            if example_input is None:
                raise ShapeError(f"element-wise LAC needs example_input to size the compensation "
                                 f"of layer {convs[0]!r} (or pass lac_mode='channel')")
            shapes = _conv_output_shapes(model, example_input, convs)
        else:
            shapes = {name: (model.get_submodule(name).out_channels, 1, 1) for name in convs}
    for name, module in targets:
        if isinstance(module, nn.ReLU):
            if relu:
                _set_module(model, name, OctoReLU())
            continue
        rt = _LayerRuntime(name, opts, executor,
                           torch.Generator().manual_seed(_layer_seed(seed, name)))
        if isinstance(module, nn.Conv2d):
            comp = None
            if opts.lac:
                gen = torch.Generator().manual_seed(_layer_seed(seed, name + ".lac"))
                comp = LossAwareCompensation(shapes[name], opts.lac_lambda, gen)
            _set_module(model, name, OctoConv2d(module, rt, comp))
        else:
            _set_module(model, name, OctoLinear(module, rt))
    return model


def octo_layers(model: nn.Module) -> Iterator[tuple[str, _OctoLayer]]:
    """``(name, layer)`` of every :class:`OctoConv2d` / :class:`OctoLinear` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _OctoLayer):
            yield name, m


def executor_of(model: nn.Module) -> GemmExecutor | None:
    """The :class:`GemmExecutor` a converted model's layers share (``None`` when unconverted)."""
    for _, layer in octo_layers(model):
        return layer.runtime.executor
    return None


def lac_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of ``0.5 * lambda * (|mu|^2 + |offset|^2)`` over the model's LAC layers (0 if none)."""
    total = torch.zeros(())
    for m in model.modules():
        if isinstance(m, LossAwareCompensation):
            total = total + m.penalty()
    return total


def octo_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-parameter state of INT8 training: each layer's SR generator state."""
    return {name: layer.runtime.generator.get_state() for name, layer in octo_layers(model)}


def load_octo_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`octo_state` (for a bit-identical resume)."""
    layers = dict(octo_layers(model))
    if set(layers) != set(state):
        raise ShapeError(f"INT8 training state for layers {sorted(state)} does not match the "
                         f"model's {sorted(layers)}")
    for name, gen_state in state.items():
        layers[name].runtime.generator.set_state(gen_state)


# -- memory -------------------------------------------------------------------------------------

class SavedTensorMeter(contextlib.AbstractContextManager):
    """Measures the bytes autograd saves for backward inside the ``with`` block.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` (built-in ops and
    ``ctx.save_for_backward`` alike) is counted once per storage (the largest view of it saved,
    so a batch sliced from a data set counts its own elements); parameters of ``exclude``
    (a module) are not activations and are skipped. ``bytes`` is the total, ``by_dtype`` the split.
    """

    def __init__(self, exclude: nn.Module | None = None):
        self._params = ({p.untyped_storage().data_ptr() for p in exclude.parameters()}
                        if exclude is not None else set())
        self._seen: dict[int, tuple[int, str]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._params:
            # A view (e.g. a batch sliced from a data set) counts its own elements only.
            nbytes = t.numel() * t.element_size()
            if nbytes > self._seen.get(ptr, (0, ""))[0]:
                self._seen[ptr] = (nbytes, str(t.dtype).removeprefix("torch."))
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(n for n, _ in self._seen.values())

    @property
    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, dtype in self._seen.values():
            out[dtype] = out.get(dtype, 0) + n
        return out
