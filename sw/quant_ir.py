"""The quantized model: the records :func:`tinyaccel.sw.quant.quantize` produces and the compiler,
the reference executor and the tests consume.

A :class:`QuantModel` is a list of :class:`QuantLayer` records in execution order; each holds INT8
weights and per-output-channel requantization parameters (:class:`RequantParams`) in the
hardware's fixed-point form (``docs/architecture.md`` section 6, ``ChannelParams``). How each
:class:`LayerKind` maps to GEMMs is :mod:`tinyaccel.sw.lowering`.

=========  ========================================================================================
kind       float source
=========  ========================================================================================
conv2d     ``nn.Conv2d`` (any groups: depthwise is ``groups = C``; zero padding, asymmetric when
           an ``F.pad`` / ``nn.ZeroPad2d`` precedes it; + BatchNorm2d + ReLU/ReLU6)
linear     ``nn.Linear`` on ``(N, features)`` (+ BatchNorm1d + ReLU/ReLU6)
avgpool    ``nn.AvgPool2d`` (no padding) and ``nn.AdaptiveAvgPool2d`` (output size dividing the
           input): a depthwise conv2d whose INT8 weights are all 1 and whose weight scale is
           ``1 / (kh * kw)`` -- exact, the division lives in the requant multiplier
add        ``a + b`` of two same-shape tensors (residual): per channel ``acc = w_a (a - zp_a) +
           w_b (b - zp_b)``, INT8 ``(w_a, w_b)`` in ``weight`` (C, 2)
flatten    ``nn.Flatten`` / ``torch.flatten(x, 1)`` / ``x.view(x.size(0), -1)``: a reshape in
           NCHW order, no arithmetic; ``output_q == input_q``
maxpool    ``nn.MaxPool2d`` (host): the max of INT8 codes, ``output_q == input_q`` — exact, as
           the quantizer is monotonic
=========  ========================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from ..errors import DTypeError, FieldError
from ..sim.numerics import requantize

__all__ = [
    "QuantParams", "RequantParams", "QuantLayer", "QuantModel", "LayerKind", "Activation",
    "HOST_KINDS", "INPUT", "INT8_MIN", "INT8_MAX", "WEIGHT_MAX", "INT32_MIN", "INT32_MAX",
    "round_half_away",
]

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_MAX = 127  #: weights use [-127, 127]
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INPUT = "input"  #: name of the model input tensor in ``QuantLayer.inputs``


class LayerKind(StrEnum):
    """What a :class:`QuantLayer` computes (GEMMs: :mod:`tinyaccel.sw.lowering`)."""

    CONV2D = "conv2d"
    LINEAR = "linear"
    AVGPOOL = "avgpool"
    ADD = "add"
    FLATTEN = "flatten"
    MAXPOOL = "maxpool"


#: Layers the host runs on INT8 codes with the input's quantization (no arithmetic that needs
#: requantization: max commutes with the monotonic quantizer, flatten is a reshape).
HOST_KINDS = frozenset({LayerKind.FLATTEN, LayerKind.MAXPOOL})


class Activation(StrEnum):
    """Activation fused into a layer's requantization (as clamp bounds)."""

    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"


def round_half_away(x):
    """Round half away from zero (as the requant unit and TFLite's TfLiteRound)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


# -- records -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantParams:
    """Per-tensor affine INT8 quantization: ``real = scale * (q - zero_point)``, q in [-128, 127].
    """

    scale: float
    zero_point: int

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise FieldError(f"QuantParams.scale={self.scale} must be finite and > 0")
        if not INT8_MIN <= self.zero_point <= INT8_MAX:
            raise FieldError(f"QuantParams.zero_point={self.zero_point} is outside "
                             f"{INT8_MIN}..{INT8_MAX}")

    @classmethod
    def from_range(cls, lo: float, hi: float) -> QuantParams:
        """Asymmetric parameters covering ``[min(lo, 0), max(hi, 0)]`` (0 is always exact)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FieldError(f"calibration range [{lo}, {hi}] is not finite")
        if hi == lo:  # an all-zero tensor: any scale represents it exactly
            return cls(1.0, 0)
        scale = (hi - lo) / (INT8_MAX - INT8_MIN)
        zp = int(np.clip(round_half_away(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
        return cls(scale, zp)

    @property
    def real_min(self) -> float:
        return self.scale * (INT8_MIN - self.zero_point)

    @property
    def real_max(self) -> float:
        return self.scale * (INT8_MAX - self.zero_point)

    def quantize(self, x) -> np.ndarray:
        """Round ``x`` to the nearest code (half away from zero), saturating: int8 array."""
        x = np.asarray(x, dtype=np.float64)
        q = round_half_away(x / self.scale) + self.zero_point
        return np.clip(q, INT8_MIN, INT8_MAX).astype(np.int8)

    def dequantize(self, q) -> np.ndarray:
        """``scale * (q - zero_point)`` as float32."""
        q = np.asarray(q)
        if q.dtype != np.int8:
            raise DTypeError(f"dequantize expects int8 codes, got {q.dtype}")
        return (self.scale * (q.astype(np.float64) - self.zero_point)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class RequantParams:
    """Per-output-channel requantization, one array entry per channel (hardware field widths).

    The field names are those of :class:`tinyaccel.hw.isa.ChannelParams`; ``bias`` is the INT32
    accumulator offset the requant unit adds: the quantized float bias **minus the input zero
    point folded through the weights** (``bias_q[c] - sum_i zp_i * sum_k w_i[c, k]``).
    ``real_scale`` is the float scale that ``multiplier`` / ``shift`` encode
    (``real_scale ~= multiplier * 2^(shift - 31)``), kept for checks.
    """

    bias: np.ndarray  #: int32 (C,)
    multiplier: np.ndarray  #: int32 (C,)
    shift: np.ndarray  #: int8 (C,)
    zero_point: np.ndarray  #: int8 (C,)
    clamp_min: np.ndarray  #: int8 (C,)
    clamp_max: np.ndarray  #: int8 (C,)
    real_scale: np.ndarray  #: float64 (C,)

    FIELDS = ("bias", "multiplier", "shift", "zero_point", "clamp_min", "clamp_max")

    def __len__(self) -> int:
        return len(self.multiplier)

    def channel_params(self, c: int) -> dict[str, int]:
        """Channel ``c`` as a ``{field: int}`` dict for ``Layout.cast(ChannelParams).const``."""
        return {name: int(getattr(self, name)[c]) for name in self.FIELDS}

    def apply(self, acc: np.ndarray) -> np.ndarray:
        """Requantize int32 accumulators whose last axis is the channel axis -> int8."""
        return requantize(acc, *(getattr(self, name) for name in self.FIELDS))


@dataclass(frozen=True, eq=False)
class QuantLayer:
    """One quantized layer: a GEMM (or a reshape) followed by per-channel requantization.

    Shapes are per sample (no batch axis): ``(C, H, W)`` or ``(features,)``. For ``flatten``
    every array field is None. ``float_weight`` / ``float_bias`` are the FP32 parameters the
    INT8 ones came from (BatchNorm folded), kept for error analysis only.
    """

    name: str  #: module path in the float model (``block.dw.0``), or the fx node name (``add``)
    kind: LayerKind
    module_type: str  #: source type, e.g. ``Conv2d``, ``operator.add``
    inputs: tuple[str, ...]  #: producer layer names; ``"input"`` is the model input
    input_q: tuple[QuantParams, ...]
    output_q: QuantParams
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    activation: Activation = Activation.NONE
    fused: tuple[str, ...] = ()  #: module paths folded into this layer (BatchNorm, ReLU, ...)
    #: int8: conv2d/avgpool ``(Cout, Cin/groups, kh, kw)``, linear ``(Cout, Cin)``, add ``(C, 2)``
    weight: np.ndarray | None = None
    weight_scale: np.ndarray | None = None  #: float64 (Cout,); None for add
    bias: np.ndarray | None = None  #: int32 (Cout,): float bias at scale ``acc_scale``
    acc_scale: np.ndarray | None = None  #: float64 (Cout,): real value of one accumulator LSB
    requant: RequantParams | None = None
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    float_weight: np.ndarray | None = None
    float_bias: np.ndarray | None = None
    #: ``(bottom, right)`` padding when it differs from ``padding`` (``(top, left)``), as Keras'
    #: 'same' padding with stride 2 on an even input (0 before, 1 after); None: symmetric
    padding_end: tuple[int, int] | None = None

    @property
    def out_channels(self) -> int:
        return self.output_shape[0]

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """Convolution padding ``(top, bottom, left, right)``."""
        (top, left), (bottom, right) = self.padding, self.padding_end or self.padding
        return top, bottom, left, right

    @property
    def pad_value(self) -> int:
        """The value convolution padding must hold: the input zero point."""
        return self.input_q[0].zero_point


@dataclass(frozen=True, eq=False)
class QuantModel:
    """A quantized model: layers in execution order, the input and output quantization."""

    layers: tuple[QuantLayer, ...]
    input_q: QuantParams
    input_shape: tuple[int, ...]  #: per sample, e.g. (1, 8, 8)
    output: str  #: name of the layer whose output is the model output
    meta: dict = field(default_factory=dict)  #: calibration method, sample count, ...

    @property
    def output_q(self) -> QuantParams:
        return self.layer(self.output).output_q

    def layer(self, name: str) -> QuantLayer:
        """The layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r}; layers: {', '.join(x.name for x in self.layers)}")

    def summary(self) -> str:
        """A table of the layers: kind, shapes, activation, output scale and zero point."""
        lines = [f"{'layer':20s} {'kind':8s} {'act':5s} {'output':14s} {'s_out':>10s} zp_out"]
        for x in self.layers:
            lines.append(f"{x.name:20s} {x.kind.value:8s} {x.activation.value:5s} "
                         f"{'x'.join(map(str, x.output_shape)):14s} {x.output_q.scale:10.3g} "
                         f"{x.output_q.zero_point}")
        return "\n".join(lines)
