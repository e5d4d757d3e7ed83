"""The autograd Functions of Octo training: each Conv2d/Linear GEMM, forward and backward, in
INT8 on a device, and the executor that runs them with per-layer statistics.

==========  ========================================  =============================================
GEMM        operands (INT8)                           result (dequantized on the host)
==========  ========================================  =============================================
forward     ``q_x`` (SR) x ``q_w`` (SR)               ``y  = s_x s_w (im2col(q_x) q_w^T) + b``
dX          ``q_dy`` x ``q_w'`` (RHE, PRC)            ``dX = s_dy s_w' col2im(q_dy q_w')``
dW          ``q_x'`` (RHE, PRC) x ``q_dy`` (RHE, PRC) ``dW = s_x' s_dy (im2col(q_x')^T q_dy)^T``
==========  ========================================  =============================================

The GEMMs return INT32 through the ``STORE ACC`` bypass (``docs/architecture.md`` sections 5-6);
:class:`GemmExecutor` runs each layer's GEMMs of one pass in one program
(:func:`tinyaccel.sw.gemm_run.run_gemms`). The method and its measured figures: ``docs/octo.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ShapeError, TrainingDivergedError
from .gemm_run import Gemm, run_gemms
from .im2col import col2im_int, conv_output_size, im2col
from .octo_numerics import (
    OctoOptions,
    backward_quantize,
    quantize_nearest,
    quantize_stochastic,
    symmetric_scale,
)

__all__ = ["GemmStats", "GemmExecutor", "LayerRuntime", "Int8LinearFn", "Int8Conv2dFn",
           "PackedReluFn"]


def _check_finite(t: torch.Tensor, layer: str, tensor: str) -> None:
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[0].item()
        raise TrainingDivergedError(f"first bad value {bad}", layer=layer, tensor=tensor)


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
        run = run_gemms(self.device, [Gemm(a, b) for a, b in gemms])
        if self.device is not None:
            st.programs += 1
            st.cycles += run.cycles
        st.wall_s += time.perf_counter() - start
        return run.results

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
class LayerRuntime:
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


def _forward_quantize(x: torch.Tensor, rt: LayerRuntime, stochastic: bool):
    scale = symmetric_scale(x)
    if stochastic:
        return quantize_stochastic(x, scale, rt.generator), scale
    return quantize_nearest(x, scale), scale


def _saved_x(x: torch.Tensor, q_x: torch.Tensor, s_x: torch.Tensor, opts: OctoOptions,
             stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The INT8 copy of ``x`` kept for the dW GEMM (reuses the forward codes when identical)."""
    if not opts.prc and not stochastic:
        return q_x, s_x  # the forward codes are already round-half-even of the unclipped x
    return backward_quantize(x, opts)


def _save_for_backward(ctx, rt: LayerRuntime, x, q_x, s_x, weight, bias,
                       stochastic: bool) -> None:
    """Keep what backward needs: the runtime, the weight and, for dW, the INT8 copy of ``x``."""
    ctx.rt = rt
    ctx.has_bias = bias is not None
    if ctx.needs_input_grad[1]:
        q_xb, s_xb = _saved_x(x, q_x, s_x, rt.options, stochastic)
        ctx.save_for_backward(weight, q_xb, s_xb)
    else:
        ctx.save_for_backward(weight)


def _bias_grad(dy: np.ndarray, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(dy.astype(np.float64).sum(axis=axes).astype(np.float32))


class Int8LinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with the forward, dX and dW GEMMs in INT8 on the device.

    ``apply(x (N, in), weight (out, in), bias or None, runtime, stochastic)``; ``runtime`` is the
    layer's :class:`LayerRuntime` (name, options, executor, SR generator).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rt: LayerRuntime, stochastic: bool):
        _check_finite(x, rt.name, "input")
        _check_finite(weight, rt.name, "weight")
        q_x, s_x = _forward_quantize(x, rt, stochastic)
        q_w, s_w = _forward_quantize(weight, rt, stochastic)
        (acc,) = rt.executor.run([(_to_np(q_x), np.ascontiguousarray(_to_np(q_w).T))],
                                 rt.name, "forward")
        y = _dequantize(acc, s_x, s_w)
        if bias is not None:
            y = y + bias.detach()
        _save_for_backward(ctx, rt, x, q_x, s_x, weight, bias, stochastic)
        return y

    @staticmethod
    def backward(ctx, dy):
        rt: LayerRuntime = ctx.rt
        _check_finite(dy, rt.name, "grad_output")
        weight = ctx.saved_tensors[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        q_dy, s_dy = backward_quantize(dy, rt.options)
        q_dy_np = _to_np(q_dy)
        gemms, dx, dw, db = [], None, None, None
        if need_x:
            q_w, s_w = backward_quantize(weight, rt.options)
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
    def forward(ctx, x, weight, bias, rt: LayerRuntime, stochastic: bool, stride, padding,
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
        ho, wo = conv_output_size(h, w, (kh, kw), stride, padding, dilation)
        y = _dequantize(acc, s_x, s_w).reshape(n, ho, wo, cout).permute(0, 3, 1, 2)
        if bias is not None:
            y = y + bias.detach().view(1, -1, 1, 1)
        y = y.contiguous()
        ctx.geometry = (tuple(x.shape), (kh, kw), stride, padding, dilation)
        _save_for_backward(ctx, rt, x, q_x, s_x, weight, bias, stochastic)
        return y

    @staticmethod
    def backward(ctx, dy):
        rt: LayerRuntime = ctx.rt
        _check_finite(dy, rt.name, "grad_output")
        x_shape, ksize, stride, padding, dilation = ctx.geometry
        weight = ctx.saved_tensors[0]
        cout = weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        q_dy, s_dy = backward_quantize(dy, rt.options)
        q_dy_rows = np.ascontiguousarray(_to_np(q_dy).transpose(0, 2, 3, 1).reshape(-1, cout))
        gemms, dx, dw, db = [], None, None, None
        transposed = _transposed_padding(ksize, stride, padding, dilation)
        if need_x:
            q_w, s_w = backward_quantize(weight, rt.options)
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
