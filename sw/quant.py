"""Post-training INT8 quantization of PyTorch models: calibration and the fixed-point encoding.

``quantize(model, calib_x)`` lowers a float model to float ops (the torch.fx front end,
:mod:`tinyaccel.sw.fx_frontend`: BatchNorm folded, ReLU / ReLU6 fused), calibrates activation
ranges on sample data and returns a :class:`~tinyaccel.sw.quant_ir.QuantModel`: a list of
:class:`~tinyaccel.sw.quant_ir.QuantLayer` records with INT8 weights and per-output-channel
requantization parameters in the hardware's fixed-point form (``docs/architecture.md`` section 6,
``ChannelParams``). The compiler (:mod:`tinyaccel.sw.compiler`) runs each layer's GEMMs
(:mod:`tinyaccel.sw.lowering`) on a device; :func:`tinyaccel.sw.reference.run_quantized` runs the
same records in NumPy with the golden numerics, so INT8 accuracy is known before the accelerator
runs.

Scheme
------
- **Weights**: symmetric, per output channel: ``s_w[c] = max|w[c]| / 127``, zero point 0, values
  in [-127, 127] (-128 is never used, so the weight range is symmetric and ``-w`` is exact).
- **Activations**: asymmetric INT8, per tensor: ``s = (max - min) / 255`` and an integer zero
  point ``zp`` in [-128, 127], with the range widened to contain 0 so that real 0 (padding,
  ReLU) is exact. Why asymmetric: the input image ([0, 1]) and every ReLU / ReLU6 output are
  one-sided, so symmetric INT8 would leave half of the 256 codes unused (7 bits of resolution
  instead of 8). The price is the input zero point in ``sum_k (x_k - zp_in) w_k``, and it is
  free: ``sum_k x_k w_k - zp_in * sum_k w_k`` folds exactly into the per-channel INT32 bias, so
  the MAC array stays a plain INT8 x INT8 GEMM and the requant unit already adds the output zero
  point. The one rule for the compiler: **pad convolution inputs with ``zp_in``, not 0**.
  (Octo's training path quantizes symmetrically; that is a different module.)
- **Calibration**: min/max over the calibration batch (default), or the ``percentile`` /
  ``100 - percentile`` percentiles of a seeded subsample.
- **Requantization**: per output channel ``c`` the real scale ``s_acc[c] / s_out`` (with
  ``s_acc[c] = s_in * s_w[c]``, the real value of one accumulator LSB) is encoded by
  :func:`quantize_multiplier` (TFLite's QuantizeMultiplier); the float
  bias is rounded to INT32 at ``s_acc[c]``; a channel whose weights are so small next to its
  bias that it would not fit gets a weight scale floor (:func:`bias_safe_weight_scale`). ReLU sets
  ``clamp_min = zp_out``, ReLU6 also ``clamp_max = zp_out + round(6 / s_out)``.
- Rounding of weights, biases and activations is half away from zero, as the requant unit's.

Layers: the kinds are listed in :mod:`tinyaccel.sw.quant_ir`, their GEMMs in
:mod:`tinyaccel.sw.lowering`. For ``add`` (residual) the INT8 weights ``w_a / w_b ~= s_a / s_b``
come from :func:`add_weights` (both <= 127; exact when the scales are equal) and ``s_acc = s_w``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import FieldError, ShapeError, TinyAccelError
from ..sim.numerics import MAX_SHIFT
from .fx_frontend import FloatOp, FxLowering, run_float_ops
from .quant_ir import (
    HOST_KINDS,
    INPUT,
    INT8_MAX,
    INT8_MIN,
    INT32_MAX,
    INT32_MIN,
    WEIGHT_MAX,
    Activation,
    LayerKind,
    QuantLayer,
    QuantModel,
    QuantParams,
    RequantParams,
    round_half_away,
)

__all__ = [
    "quantize", "quantize_weight_per_channel", "quantize_bias", "add_weights",
    "quantize_multiplier", "bias_safe_weight_scale", "BIAS_LIMIT",
]


# -- quantization primitives -------------------------------------------------------------------

def quantize_weight_per_channel(w) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8: ``(q int8, scale float64 (Cout,))``, axis 0 = channel.

    ``scale[c] = max|w[c]| / 127``; an all-zero channel gets scale 1 (its codes are all 0).
    """
    w = np.asarray(w, dtype=np.float64)
    absmax = np.abs(w.reshape(len(w), -1)).max(axis=1) if w.size else np.zeros(len(w))
    scale = np.where(absmax > 0, absmax / WEIGHT_MAX, 1.0)
    q = round_half_away(w / scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    return np.clip(q, -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8), scale


def quantize_bias(b, acc_scale, layer: str = "?") -> np.ndarray:
    """Round ``b / acc_scale`` (per channel) to INT32, half away from zero.

    Raises
    ------
    FieldError
        When a channel's quantized bias does not fit INT32 (names the layer, channel, values).
    """
    b = np.asarray(b, dtype=np.float64)
    q = round_half_away(b / acc_scale)
    bad = np.flatnonzero(~((q >= INT32_MIN) & (q <= INT32_MAX)))
    if len(bad):
        c = int(bad[0])
        raise FieldError(f"layer {layer!r}: bias[{c}]={b[c]:.6g} at accumulator scale "
                         f"{acc_scale[c]:.6g} is {q[c]:.6g}, outside INT32; the weights or input "
                         f"scale of this channel are too small for its bias")
    return q.astype(np.int32)


#: The largest |bias| in accumulator LSBs a weight scale floor aims for: 2^30, half of INT32, so
#: the input zero point x weight sum and the GEMM's sum still fit the INT32 accumulator.
BIAS_LIMIT = 1 << 30


def bias_safe_weight_scale(w_scale, b, in_scale: float) -> np.ndarray:
    """Raise the weight scale of channels whose bias would not fit INT32 at ``in_scale * s_w``.

    A channel whose weights are vanishingly small next to its bias (a near-dead channel of a
    random or pruned network, BatchNorm folded) gets ``s_w = max|w| / 127`` so small that
    ``b / (s_in * s_w)`` overflows INT32. Only for those channels (``|round(b / s_acc)| >
    2^31 - 1``) the scale is floored at ``|b| / (s_in * 2^30)``: the bias is then 2^30
    accumulator LSBs, and the weights, re-rounded at the coarser scale, shrink (often to 0).
    The error this adds is at most half a weight LSB per term, ``0.5 * K * s_w * max|x|``, which
    is ``~ K * 255 / 2^31 * |b|``: below 1e-4 of the bias for any K the array runs. Every other
    channel, and so every model that quantized before, is unchanged bit for bit.
    """
    w_scale = np.asarray(w_scale, dtype=np.float64)
    b = np.abs(np.asarray(b, dtype=np.float64))
    overflow = round_half_away(b / (in_scale * w_scale)) > INT32_MAX
    return np.where(overflow, b / (in_scale * BIAS_LIMIT), w_scale)


def _requantize_weight(w: np.ndarray, weight: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """``weight`` with the channels whose scale :func:`bias_safe_weight_scale` raised re-rounded."""
    q = np.clip(round_half_away(w / w_scale.reshape((-1,) + (1,) * (w.ndim - 1))),
                -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    _, original = quantize_weight_per_channel(w)
    changed = (w_scale != original).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.where(changed, q, weight)


def add_weights(s_a: float, s_b: float) -> tuple[int, int, float]:
    """INT8 weights ``(w_a, w_b)`` in 1..127 and a scale ``s_w`` with ``s_w * w_i ~= s_i``.

    ``w_a / w_b`` is the best approximation of ``s_a / s_b`` with both terms <= 127 (exact,
    ``(1, 1)``, when the scales are equal); ``s_w`` splits the remaining relative error evenly.
    """
    ratio = s_a / s_b
    best = None
    for w_b in range(1, WEIGHT_MAX + 1):
        w_a = int(np.clip(round_half_away(ratio * w_b), 1, WEIGHT_MAX))
        err = abs(math.log(w_a / w_b / ratio))
        if best is None or err < best[0] - 1e-15:
            best = (err, w_a, w_b)
    _, w_a, w_b = best
    return w_a, w_b, math.sqrt(s_a / w_a * s_b / w_b)


def quantize_multiplier(real_scale) -> tuple:
    """Encode a real scale as ``(multiplier, shift)`` with ``scale ~= multiplier * 2^(shift-31)``.

    TFLite's QuantizeMultiplier: ``frexp`` gives ``m in [0.5, 1)``, ``multiplier =
    round(m * 2^31)`` (half away from zero), and a multiplier rounded up to ``2^31`` becomes
    ``2^30`` with ``shift + 1``. Scale 0 gives ``(0, 0)``; scales too small for a shift of -31
    flush to ``(0, 0)``; scales too large for +31 saturate to ``(2^31 - 1, 31)``. Scalars give
    ints; arrays give an int32 and an int8 array.

    Raises
    ------
    FieldError
        For a negative or non-finite scale (named with the value).
    """
    scale = np.asarray(real_scale, dtype=np.float64)
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        bad = scale[~np.isfinite(scale) | (scale < 0)].flat[0]
        raise FieldError(f"real_scale={bad} must be finite and >= 0")
    m, e = np.frexp(scale)
    q = np.floor(m * 2.0 ** 31 + 0.5).astype(np.int64)  # m >= 0: floor(x+0.5) rounds half up
    e = e.astype(np.int64)
    up = q == 1 << 31
    q = np.where(up, q >> 1, q)
    e = np.where(up, e + 1, e)
    zero = (scale == 0) | (e < -MAX_SHIFT)
    q = np.where(zero, 0, q)
    e = np.where(zero, 0, e)
    big = e > MAX_SHIFT
    q = np.where(big, INT32_MAX, q)
    e = np.where(big, MAX_SHIFT, e)
    if scale.ndim == 0:
        return int(q), int(e)
    return q.astype(np.int32), e.astype(np.int8)


# -- calibration and quantization --------------------------------------------------------------

class _Observer:
    """Running min/max and (for percentiles) a seeded subsample of one tensor's values."""

    def __init__(self, keep: int, rng: np.random.Generator):
        self.lo, self.hi = math.inf, -math.inf
        self.keep, self.rng, self.samples = keep, rng, []

    def update(self, t: torch.Tensor) -> None:
        v = t.detach().reshape(-1).numpy()
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        if self.keep:
            self.samples.append(v if v.size <= self.keep else
                                self.rng.choice(v, self.keep, replace=False))

    def range(self, method: str, percentile: float) -> tuple[float, float]:
        if method == "minmax":
            return self.lo, self.hi
        v = np.concatenate(self.samples)
        return float(np.percentile(v, 100 - percentile)), float(np.percentile(v, percentile))


def quantize(model: nn.Module, calib_x, method: str = "minmax", percentile: float = 99.99,
             batch_size: int = 256, seed: int = 0) -> QuantModel:
    """Post-training-quantize ``model`` with calibration data ``calib_x`` (N x C x H x W).

    ``method`` is ``"minmax"`` or ``"percentile"`` (ranges at the ``percentile`` and
    ``100 - percentile`` percentiles of a subsample drawn with ``seed``). The model is used in
    eval mode (BatchNorm running statistics) and is not modified.

    Raises
    ------
    UnsupportedLayerError
        For a layer the INT8 path cannot express; the message names its module path and type.
    FieldError
        When a quantized bias does not fit INT32.
    """
    if method not in ("minmax", "percentile"):
        raise FieldError(f"calibration method={method!r}; use 'minmax' or 'percentile'")
    if not 50.0 < percentile <= 100.0:
        raise FieldError(f"percentile={percentile} must be in (50, 100]")
    x = torch.as_tensor(calib_x.detach().cpu().numpy() if isinstance(calib_x, torch.Tensor)
                        else np.asarray(calib_x), dtype=torch.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ShapeError(f"calibration data of shape {tuple(x.shape)}: need a non-empty batch")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ops, output = FxLowering(model, x[:1]).run()
            observers = _calibrate(model, ops, output, x, method, percentile, batch_size, seed)
    finally:
        for m, training in modes:
            m.training = training

    meta = {"method": method, "samples": len(x)}
    if method == "percentile":
        meta["percentile"] = percentile
    qparams = {INPUT: QuantParams.from_range(*observers[INPUT].range(method, percentile))}
    layers = []
    for op in ops:
        in_q = tuple(qparams[i] for i in op.inputs)
        if op.kind in HOST_KINDS:
            qparams[op.name] = in_q[0]
            layers.append(QuantLayer(op.name, op.kind, op.module_type, tuple(op.inputs), in_q,
                                     in_q[0], tuple(op.input_shapes), op.output_shape,
                                     fused=tuple(op.fused), kernel_size=op.kernel_size,
                                     stride=op.stride, padding=op.padding,
                                     dilation=op.dilation))
            continue
        qparams[op.name] = QuantParams.from_range(*observers[op.name].range(method, percentile))
        layers.append(_quantize_op(op, in_q, qparams[op.name]))
    return QuantModel(tuple(layers), qparams[INPUT], tuple(x.shape[1:]), output, meta)


def _calibrate(model, ops, output, x, method, percentile, batch_size, seed):
    rng = np.random.default_rng(seed)
    keep = 0 if method == "minmax" else max(1, 200_000 * batch_size // len(x))
    names = [INPUT] + [op.name for op in ops if op.kind not in HOST_KINDS]
    observers = {name: _Observer(keep, rng) for name in names}
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        env = run_float_ops(ops, xb)
        if i == 0:  # the lowering must compute what the model computes
            want, got = model(xb), env[output]
            tol = 1e-4 * (1.0 + float(want.abs().max()))
            if want.shape != got.shape or float((want - got).abs().max()) > tol:
                raise TinyAccelError(f"internal: the lowered graph of {type(model).__name__} "
                                     f"differs from the model by "
                                     f"{float((want - got).abs().max()):.3g}")
        for name in names:
            observers[name].update(env[name])
    return observers


def _requant(op: FloatOp, acc_scale: np.ndarray, bias_q: np.ndarray, acc_offset: np.ndarray,
             out_q: QuantParams) -> RequantParams:
    real = acc_scale / out_q.scale
    multiplier, shift = quantize_multiplier(real)
    acc_bias = bias_q.astype(np.int64) - acc_offset
    bad = np.flatnonzero((acc_bias < INT32_MIN) | (acc_bias > INT32_MAX))
    if len(bad):
        c = int(bad[0])
        raise FieldError(f"layer {op.name!r}: channel {c} accumulator bias {acc_bias[c]} "
                         f"(bias {bias_q[c]} minus input zero point x weight sum) is outside "
                         f"INT32")
    c = len(real)
    zp = out_q.zero_point
    cmin, cmax = INT8_MIN, INT8_MAX
    if op.activation in (Activation.RELU, Activation.RELU6):
        cmin = zp
    if op.activation == Activation.RELU6:
        cmax = int(min(INT8_MAX, zp + round_half_away(6.0 / out_q.scale)))
    full = lambda v: np.full(c, v, dtype=np.int8)  # noqa: E731
    return RequantParams(acc_bias.astype(np.int32), np.asarray(multiplier, np.int32),
                         np.asarray(shift, np.int8), full(zp), full(cmin), full(cmax), real)


def _quantize_op(op: FloatOp, in_q: tuple[QuantParams, ...], out_q: QuantParams) -> QuantLayer:
    common = dict(name=op.name, kind=op.kind, module_type=op.module_type,
                  inputs=tuple(op.inputs), input_q=in_q, output_q=out_q,
                  input_shapes=tuple(op.input_shapes), output_shape=op.output_shape,
                  activation=op.activation, fused=tuple(op.fused))
    if op.kind == LayerKind.ADD:
        (qa, qb), channels = in_q, op.output_shape[0]
        w_a, w_b, s_w = add_weights(qa.scale, qb.scale)
        weight = np.tile(np.array([[w_a, w_b]], np.int8), (channels, 1))
        acc_scale = np.full(channels, s_w)
        bias_q = np.zeros(channels, np.int32)
        offset = np.full(channels, w_a * qa.zero_point + w_b * qb.zero_point, np.int64)
        return QuantLayer(**common, weight=weight, bias=bias_q, acc_scale=acc_scale,
                          requant=_requant(op, acc_scale, bias_q, offset, out_q))
    w = op.float_weight.double().numpy()
    b = (op.float_bias.double().numpy() if op.float_bias is not None
         else np.zeros(len(w)))
    if op.kind == LayerKind.AVGPOOL:  # weights 1 at scale 1/(kh*kw): exact
        kh, kw = op.kernel_size
        weight, w_scale = np.ones(w.shape, np.int8), np.full(len(w), 1.0 / (kh * kw))
    else:
        weight, w_scale = quantize_weight_per_channel(w)
        w_scale = bias_safe_weight_scale(w_scale, b, in_q[0].scale)
        weight = _requantize_weight(w, weight, w_scale)
    acc_scale = in_q[0].scale * w_scale
    bias_q = quantize_bias(b, acc_scale, op.name)
    offset = in_q[0].zero_point * weight.reshape(len(weight), -1).astype(np.int64).sum(axis=1)
    return QuantLayer(**common, weight=weight, weight_scale=w_scale, bias=bias_q,
                      acc_scale=acc_scale, requant=_requant(op, acc_scale, bias_q, offset, out_q),
                      kernel_size=op.kernel_size, stride=op.stride, padding=op.padding,
                      dilation=op.dilation, groups=op.groups, padding_end=op.padding_end,
                      float_weight=w.astype(np.float32),
                      float_bias=None if op.float_bias is None else b.astype(np.float32))
