"""Post-training INT8 quantization of PyTorch models, and the host-side INT8 reference executor.

``quantize(model, calib_x)`` traces a float model with ``torch.fx``, folds BatchNorm into the
preceding convolution, fuses ReLU / ReLU6 into the layer before them, calibrates activation ranges
on sample data and returns a :class:`QuantModel`: a list of :class:`QuantLayer` records with INT8
weights and per-output-channel requantization parameters in the hardware's fixed-point form
(``docs/architecture.md`` section 6, ``ChannelParams``). The compiler turns each layer into GEMM
tiles and PARAM words; :func:`run_quantized` executes the same records in NumPy with the golden
numerics (:mod:`tinyaccel.sim.numerics`), so INT8 accuracy is known before the accelerator runs.

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
  :func:`~tinyaccel.sim.numerics.quantize_multiplier` (TFLite's QuantizeMultiplier); the float
  bias is rounded to INT32 at ``s_acc[c]`` (an error if it does not fit). ReLU sets
  ``clamp_min = zp_out``, ReLU6 also ``clamp_max = zp_out + round(6 / s_out)``.
- Rounding of weights, biases and activations is half away from zero, as the requant unit's.

Layers
------
=========  ========================================================================================
kind       float source and GEMM mapping
=========  ========================================================================================
conv2d     ``nn.Conv2d`` (any groups: depthwise is ``groups = C``; zero padding; + BatchNorm2d +
           ReLU/ReLU6). GEMM per group ``g``: ``A = im2col(x[:, group g], pad_value=zp_in)``
           (rows ``(n, ho, wo)``, columns ``(c, i, j)``),
           ``B = weight[group g].reshape(O_g, -1).T``.
linear     ``nn.Linear`` on ``(N, features)``. GEMM ``A = x``, ``B = weight.T``.
avgpool    ``nn.AvgPool2d`` (no padding) and ``nn.AdaptiveAvgPool2d`` (output size dividing the
           input): a depthwise conv2d whose INT8 weights are all 1 and whose weight scale is
           ``1 / (kh * kw)`` -- exact, the division lives in the requant multiplier.
add        ``a + b`` of two same-shape tensors (residual). Per channel ``acc = w_a (a - zp_a) +
           w_b (b - zp_b)`` with INT8 ``w_a / w_b ~= s_a / s_b`` (best ratio with both <= 127;
           exact when the scales are equal) and ``s_acc = s_w``: a GEMM with K = 2 per channel
           (``A = [a | b]`` along K, block-diagonal ``B``). ReLU/ReLU6 after it fuse.
flatten    ``nn.Flatten`` / ``torch.flatten(x, 1)``: a reshape in NCHW order, no arithmetic;
           ``output_q == input_q``.
maxpool    ``nn.MaxPool2d`` (host): the max of INT8 codes, ``output_q == input_q`` — exact, as
           the quantizer is monotonic.
=========  ========================================================================================

``nn.Dropout`` and ``nn.Identity`` vanish. Anything else raises :class:`UnsupportedLayerError`
naming the layer's module path and type and why.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the universal torch idiom
from torch import fx, nn

from ..errors import DTypeError, FieldError, ShapeError, TinyAccelError, UnsupportedLayerError
from ..sim.numerics import exact_gemm, im2col, quantize_multiplier, requantize

__all__ = [
    "QuantParams", "RequantParams", "QuantLayer", "QuantModel", "LayerKind", "Activation",
    "UnsupportedLayerError", "quantize", "run_quantized", "run_float", "execute_layer",
    "float_layer", "accumulate", "quantize_weight_per_channel", "quantize_bias",
    "add_weights", "INT8_MIN", "INT8_MAX", "WEIGHT_MAX",
]

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_MAX = 127  #: weights use [-127, 127]
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INPUT = "input"  #: name of the model input tensor in ``QuantLayer.inputs``



class LayerKind(StrEnum):
    """What a :class:`QuantLayer` computes (see the module docstring for the GEMM mapping)."""

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


def _round(x):
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
        zp = int(np.clip(_round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
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
        return np.clip(_round(x / self.scale) + self.zero_point, INT8_MIN, INT8_MAX).astype(
            np.int8)

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

    @property
    def out_channels(self) -> int:
        return self.output_shape[0]

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


# -- quantization primitives -------------------------------------------------------------------

def quantize_weight_per_channel(w) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8: ``(q int8, scale float64 (Cout,))``, axis 0 = channel.

    ``scale[c] = max|w[c]| / 127``; an all-zero channel gets scale 1 (its codes are all 0).
    """
    w = np.asarray(w, dtype=np.float64)
    absmax = np.abs(w.reshape(len(w), -1)).max(axis=1) if w.size else np.zeros(len(w))
    scale = np.where(absmax > 0, absmax / WEIGHT_MAX, 1.0)
    q = _round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    return np.clip(q, -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8), scale


def quantize_bias(b, acc_scale, layer: str = "?") -> np.ndarray:
    """Round ``b / acc_scale`` (per channel) to INT32, half away from zero.

    Raises
    ------
    FieldError
        When a channel's quantized bias does not fit INT32 (names the layer, channel, values).
    """
    b = np.asarray(b, dtype=np.float64)
    q = _round(b / acc_scale)
    bad = np.flatnonzero(~((q >= INT32_MIN) & (q <= INT32_MAX)))
    if len(bad):
        c = int(bad[0])
        raise FieldError(f"layer {layer!r}: bias[{c}]={b[c]:.6g} at accumulator scale "
                         f"{acc_scale[c]:.6g} is {q[c]:.6g}, outside INT32; the weights or input "
                         f"scale of this channel are too small for its bias")
    return q.astype(np.int32)


def add_weights(s_a: float, s_b: float) -> tuple[int, int, float]:
    """INT8 weights ``(w_a, w_b)`` in 1..127 and a scale ``s_w`` with ``s_w * w_i ~= s_i``.

    ``w_a / w_b`` is the best approximation of ``s_a / s_b`` with both terms <= 127 (exact,
    ``(1, 1)``, when the scales are equal); ``s_w`` splits the remaining relative error evenly.
    """
    ratio = s_a / s_b
    best = None
    for w_b in range(1, WEIGHT_MAX + 1):
        w_a = int(np.clip(_round(ratio * w_b), 1, WEIGHT_MAX))
        err = abs(math.log(w_a / w_b / ratio))
        if best is None or err < best[0] - 1e-15:
            best = (err, w_a, w_b)
    _, w_a, w_b = best
    return w_a, w_b, math.sqrt(s_a / w_a * s_b / w_b)


# -- graph lowering ----------------------------------------------------------------------------

@dataclass
class _Op:
    """A float layer while lowering (same field names as QuantLayer where they overlap)."""

    name: str
    kind: LayerKind
    module_type: str
    inputs: list[str]
    float_weight: torch.Tensor | None = None
    float_bias: torch.Tensor | None = None
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    activation: Activation = Activation.NONE
    fused: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shape: tuple[int, ...] = ()


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


_RELU_FUNCS = {F.relu: Activation.RELU, torch.relu: Activation.RELU,
               F.relu6: Activation.RELU6}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_FLATTEN_FUNCS = {torch.flatten}
_SUPPORTED = ("Conv2d, Linear, BatchNorm2d (after a Conv2d), ReLU, ReLU6, AvgPool2d, MaxPool2d, "
              "AdaptiveAvgPool2d, Flatten, Dropout, Identity, tensor + tensor")


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(modules[node.target]).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", repr(node.target))
    module = "" if isinstance(node.target, str) else getattr(node.target, "__module__", "") or ""
    kind = "method" if node.op == "call_method" else "function"
    return f"node {node.name!r} ({kind} {module + '.' if module else ''}{target})"


def _unsupported(node: fx.Node, modules, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"{_describe(node, modules)}: {why}")


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise UnsupportedLayerError(f"node {node.name!r} does not produce a single tensor")
    return tuple(int(d) for d in meta.shape[1:])


class _Lowering:
    """Walk an fx graph and build the list of float ops, fusing BatchNorm and activations."""

    def __init__(self, model: nn.Module, sample: torch.Tensor):
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types; all mean "cannot trace"
            raise UnsupportedLayerError(
                f"model {type(model).__name__} cannot be traced by torch.fx ({exc}); the "
                f"quantizer needs a forward without data-dependent control flow") from exc
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            ShapeProp(self.gm).propagate(sample)
        except Exception as exc:
            raise ShapeError(f"model {type(model).__name__} fails on a sample of shape "
                             f"{tuple(sample.shape)}: {exc}") from exc
        self.modules = dict(self.gm.named_modules())
        self.ops: dict[str, _Op] = {}
        self.alias: dict[str, str] = {}  # fx node name -> op name whose output it is
        self.tip: dict[str, fx.Node] = {}  # op name -> last fx node carrying its output
        self.output: str | None = None

    def run(self) -> tuple[list[_Op], str]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedLayerError(f"the model must take exactly one input tensor, it "
                                        f"takes {len(placeholders)}")
        for node in self.gm.graph.nodes:
            self._visit(node)
        return list(self.ops.values()), self.output

    # helpers
    def _src(self, node: fx.Node, arg) -> str:
        if not isinstance(arg, fx.Node):
            raise _unsupported(node, self.modules, f"input {arg!r} is not a tensor")
        if arg.name not in self.alias:
            raise _unsupported(node, self.modules, f"its input {arg.name!r} is not produced by "
                                                   f"a supported layer")
        return self.alias[arg.name]

    def _new(self, node: fx.Node, op: _Op) -> None:
        op.input_shapes = [_shape(a) for a in node.all_input_nodes]
        op.output_shape = _shape(node)
        self.ops[op.name] = op
        self.alias[node.name] = op.name
        self.tip[op.name] = node

    def _fusable(self, node: fx.Node, what: str) -> _Op:
        """The op ``node`` (a BN or activation) can fuse into, or an error saying why not."""
        (arg,) = node.all_input_nodes
        src = self._src(node, arg)
        if src == INPUT:
            raise _unsupported(node, self.modules, f"{what} on the model input cannot be "
                                                   f"fused into a layer before it")
        if self.tip[src] is not arg or len(arg.users) != 1:
            raise _unsupported(node, self.modules, f"{what} cannot be fused into {src!r}: its "
                                                   f"input also feeds other layers, and the "
                                                   f"accelerator applies {what} only inside "
                                                   f"requantization")
        return self.ops[src]

    def _activation(self, node: fx.Node, act: Activation, path: str) -> None:
        what = "ReLU" if act == Activation.RELU else "ReLU6"
        op = self._fusable(node, what)
        if op.kind in HOST_KINDS:
            raise _unsupported(node, self.modules, f"{what} after a {op.kind.value} cannot be "
                                                   f"fused; apply it before the {op.kind.value}")
        op.activation = (Activation.RELU6 if Activation.RELU6 in (op.activation, act)
                         else Activation.RELU)
        op.fused.append(path)
        self.alias[node.name] = op.name
        self.tip[op.name] = node

    def _identity(self, node: fx.Node) -> None:
        (arg,) = node.all_input_nodes
        src = self._src(node, arg)
        self.alias[node.name] = src
        if src != INPUT and self.tip[src] is arg:
            self.tip[src] = node

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.alias[node.name] = INPUT
        elif node.op == "output":
            (result,) = node.args
            if not isinstance(result, fx.Node):
                raise UnsupportedLayerError(f"the model must return one tensor, it returns "
                                            f"{type(result).__name__}")
            self.output = self._src(node, result)
            if self.output == INPUT:
                raise UnsupportedLayerError("the model returns its input unchanged")
        elif node.op == "call_module":
            self._module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self._function(node)
        else:  # get_attr: a parameter used directly as a tensor
            raise _unsupported(node, self.modules, "tensors other than layer outputs (here a "
                                                   "parameter or buffer) are not supported")

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        name = node.target
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise _unsupported(node, self.modules, f"padding_mode={m.padding_mode!r}; only "
                                                       f"zero padding is supported")
            if isinstance(m.padding, str):
                raise _unsupported(node, self.modules, f"padding={m.padding!r}; give the "
                                                       f"padding as numbers")
            (arg,) = node.all_input_nodes
            self._new(node, _Op(name, LayerKind.CONV2D, "Conv2d", [self._src(node, arg)],
                                m.weight.detach().clone(),
                                None if m.bias is None else m.bias.detach().clone(),
                                _pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                                _pair(m.dilation), m.groups))
        elif isinstance(m, nn.Linear):
            (arg,) = node.all_input_nodes
            if len(_shape(arg)) != 1:
                raise _unsupported(node, self.modules, f"input of per-sample shape "
                                                       f"{_shape(arg)}; only (N, features) is "
                                                       f"supported (flatten first)")
            self._new(node, _Op(name, LayerKind.LINEAR, "Linear", [self._src(node, arg)],
                                m.weight.detach().clone(),
                                None if m.bias is None else m.bias.detach().clone()))
        elif isinstance(m, nn.BatchNorm2d):
            op = self._fusable(node, "BatchNorm2d")
            if op.kind != LayerKind.CONV2D or op.activation != Activation.NONE:
                raise _unsupported(node, self.modules, f"BatchNorm2d folds only into a Conv2d "
                                                       f"directly before it, not into "
                                                       f"{op.kind.value} {op.name!r}")
            if m.running_mean is None or m.running_var is None:
                raise _unsupported(node, self.modules, "BatchNorm2d without running "
                                                       "statistics cannot be folded")
            inv = (m.running_var + m.eps).rsqrt()
            gamma = m.weight.detach() if m.affine else torch.ones_like(inv)
            beta = m.bias.detach() if m.affine else torch.zeros_like(inv)
            bias = op.float_bias if op.float_bias is not None else torch.zeros_like(inv)
            op.float_weight = op.float_weight * (gamma * inv).reshape(-1, 1, 1, 1)
            op.float_bias = (bias - m.running_mean) * gamma * inv + beta
            op.fused.append(name)
            self.alias[node.name] = op.name
            self.tip[op.name] = node
        elif isinstance(m, (nn.ReLU, nn.ReLU6)) or (
                isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
            act = Activation.RELU if isinstance(m, nn.ReLU) else Activation.RELU6
            self._activation(node, act, name)
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            self._pool(node, m)
        elif isinstance(m, nn.MaxPool2d):
            if m.ceil_mode or m.return_indices:
                raise _unsupported(node, self.modules, "only MaxPool2d without ceil_mode or "
                                                       "return_indices is supported")
            (arg,) = node.all_input_nodes
            self._new(node, _Op(node.target, LayerKind.MAXPOOL, "MaxPool2d",
                                [self._src(node, arg)], None, None, _pair(m.kernel_size),
                                _pair(m.stride if m.stride is not None else m.kernel_size),
                                _pair(m.padding), _pair(m.dilation)))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise _unsupported(node, self.modules, f"Flatten({m.start_dim}, {m.end_dim}); "
                                                       f"only Flatten(1, -1) is supported")
            self._flatten(node, name, "Flatten")
        elif isinstance(m, (nn.Dropout, nn.Identity)):
            self._identity(node)
        else:
            raise _unsupported(node, self.modules, f"not supported by the INT8 quantizer; "
                                                   f"supported: {_SUPPORTED}")

    def _pool(self, node: fx.Node, m: nn.Module) -> None:
        (arg,) = node.all_input_nodes
        c, h, w = _shape(arg)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            oh, ow = _pair(m.output_size) if m.output_size is not None else (h, w)
            oh, ow = oh or h, ow or w
            if h % oh or w % ow:
                raise _unsupported(node, self.modules, f"output size {oh}x{ow} does not divide "
                                                       f"the {h}x{w} input")
            kernel = stride = (h // oh, w // ow)
        else:
            if _pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override is not None:
                raise _unsupported(node, self.modules, "only AvgPool2d without padding, "
                                                       "ceil_mode or divisor_override is "
                                                       "supported")
            kernel = _pair(m.kernel_size)
            stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        k = kernel[0] * kernel[1]
        weight = torch.full((c, 1, *kernel), 1.0 / k)
        self._new(node, _Op(node.target, LayerKind.AVGPOOL, type(m).__name__,
                            [self._src(node, arg)], weight, None, kernel, stride, groups=c))

    def _flatten(self, node: fx.Node, name: str, label: str) -> None:
        (arg,) = node.all_input_nodes
        self._new(node, _Op(name, LayerKind.FLATTEN, label, [self._src(node, arg)]))

    def _function(self, node: fx.Node) -> None:
        target = node.target
        if node.op == "call_method":
            if target == "relu" and len(node.args) == 1:
                return self._activation(node, Activation.RELU, node.name)
            if target == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs:
                return self._flatten(node, node.name, "Tensor.flatten")
            if target == "add" and len(node.args) == 2 and not node.kwargs:
                return self._add(node)
            raise _unsupported(node, self.modules, f"not supported by the INT8 quantizer; "
                                                   f"supported: {_SUPPORTED}")
        if target in _RELU_FUNCS and len(node.args) == 1:
            return self._activation(node, _RELU_FUNCS[target], node.name)
        if target in _FLATTEN_FUNCS and tuple(node.args[1:]) in ((1,), (1, -1)) \
                and not node.kwargs:
            return self._flatten(node, node.name, "torch.flatten")
        if target in _ADD_FUNCS and len(node.args) == 2 and not node.kwargs:
            return self._add(node)
        raise _unsupported(node, self.modules, f"not supported by the INT8 quantizer; "
                                               f"supported: {_SUPPORTED}")

    def _add(self, node: fx.Node) -> None:
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            raise _unsupported(node, self.modules, "only tensor + tensor is supported (no "
                                                   "constants)")
        if _shape(a) != _shape(b):
            raise _unsupported(node, self.modules, f"operands of shapes {_shape(a)} and "
                                                   f"{_shape(b)}; broadcasting is not supported")
        self._new(node, _Op(node.name, LayerKind.ADD, "operator.add",
                            [self._src(node, a), self._src(node, b)]))


# -- float and integer execution ---------------------------------------------------------------

def _activate(y: torch.Tensor, act: Activation) -> torch.Tensor:
    if act == Activation.RELU:
        return F.relu(y)
    if act == Activation.RELU6:
        return F.relu6(y)
    return y


def _as_tensor(a) -> torch.Tensor:
    return a if a is None or isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def float_layer(layer, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The FP32 computation of a layer (a :class:`QuantLayer` or the quantizer's float op)."""
    w, b = _as_tensor(layer.float_weight), _as_tensor(layer.float_bias)
    if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
        y = F.conv2d(inputs[0], w.to(inputs[0].dtype), None if b is None else b.to(inputs[0].dtype),
                     layer.stride, layer.padding, layer.dilation, layer.groups)
    elif layer.kind == LayerKind.LINEAR:
        y = F.linear(inputs[0], w.to(inputs[0].dtype), None if b is None else b.to(inputs[0].dtype))
    elif layer.kind == LayerKind.ADD:
        y = inputs[0] + inputs[1]
    elif layer.kind == LayerKind.MAXPOOL:
        y = F.max_pool2d(inputs[0], layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation)
    else:
        y = inputs[0].flatten(1)
    return _activate(y, layer.activation)


def _run_float_ops(ops, x: torch.Tensor) -> dict[str, torch.Tensor]:
    env = {INPUT: x}
    for op in ops:
        env[op.name] = float_layer(op, [env[i] for i in op.inputs])
    return env


def run_float(qmodel: QuantModel, x, return_all: bool = False):
    """Run the lowered FP32 model (BatchNorm folded) that ``qmodel`` was quantized from.

    Returns the float32 output (NumPy), or with ``return_all`` a dict of every layer's output.
    """
    x = torch.as_tensor(_check_input(qmodel, x))
    with torch.no_grad():
        env = _run_float_ops(qmodel.layers, x)
    if return_all:
        return {k: v.numpy() for k, v in env.items()}
    return env[qmodel.output].numpy()


def accumulate(layer: QuantLayer, inputs: list[np.ndarray]) -> np.ndarray:
    """The exact INT32 accumulators of a layer, channels last: ``(N, Ho, Wo, C)`` or ``(N, C)``.

    This is what the accelerator's GEMMs leave in ACC (before requantization, without bias).
    """
    x = inputs[0]
    if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
        n = x.shape[0]
        cin, cout = x.shape[1], layer.weight.shape[0]
        cg, og = cin // layer.groups, cout // layer.groups
        w = layer.weight.reshape(cout, -1)
        parts = []
        for g in range(layer.groups):
            cols = im2col(x[:, g * cg:(g + 1) * cg], layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, pad_value=layer.pad_value)
            parts.append(exact_gemm(cols, np.ascontiguousarray(w[g * og:(g + 1) * og].T)))
        acc = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return acc.reshape(n, *layer.output_shape[1:], cout)
    if layer.kind == LayerKind.LINEAR:
        return exact_gemm(x, np.ascontiguousarray(layer.weight.T))
    if layer.kind == LayerKind.ADD:
        a, b = (np.moveaxis(t, 1, -1).astype(np.int64) for t in inputs)
        acc = a * layer.weight[:, 0].astype(np.int64) + b * layer.weight[:, 1].astype(np.int64)
        return acc.astype(np.int32)  # |acc| <= 2 * 127 * 128
    raise ShapeError(f"layer {layer.name!r} ({layer.kind.value}) has no accumulators")


def host_layer(layer: QuantLayer, x: np.ndarray) -> np.ndarray:
    """A host-side layer on INT8 codes: flatten, or max pooling (padding never wins the max)."""
    if layer.kind == LayerKind.FLATTEN:
        return x.reshape(len(x), -1)
    y = F.max_pool2d(torch.from_numpy(x.astype(np.float32)), layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation)  # int8 codes are exact in float32
    return y.numpy().astype(np.int8)


def execute_layer(layer: QuantLayer, inputs: list[np.ndarray]) -> np.ndarray:
    """Run one quantized layer on int8 inputs (batch first, NCHW) -> int8 output (NCHW)."""
    for i, (x, shape) in enumerate(zip(inputs, layer.input_shapes, strict=True)):
        if x.dtype != np.int8:
            raise DTypeError(f"layer {layer.name!r}: input {i} has dtype {x.dtype}, "
                             f"expected int8")
        if tuple(x.shape[1:]) != shape:
            raise ShapeError(f"layer {layer.name!r}: input {i} has per-sample shape "
                             f"{tuple(x.shape[1:])}, expected {shape}")
    if layer.kind in HOST_KINDS:
        return host_layer(layer, inputs[0])
    y = layer.requant.apply(accumulate(layer, inputs))
    return np.moveaxis(y, -1, 1) if y.ndim > 2 else y


def _check_input(qmodel: QuantModel, x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != len(qmodel.input_shape) + 1 or tuple(x.shape[1:]) != qmodel.input_shape:
        raise ShapeError(f"input of shape {tuple(x.shape)}; the model takes (N, "
                         f"{', '.join(map(str, qmodel.input_shape))})")
    return x.astype(np.float32)


def run_quantized(qmodel: QuantModel, x, return_int: bool = False, return_all: bool = False):
    """Run ``qmodel`` in INT8 on float input ``x`` (N x C x H x W) -> float32 logits.

    The input is quantized with ``qmodel.input_q``; every layer runs with exact integer GEMMs
    (im2col + :func:`~tinyaccel.sim.numerics.exact_gemm`) and
    :func:`~tinyaccel.sim.numerics.requantize`. ``return_int`` gives the int8 output codes
    instead of dequantized logits; ``return_all`` a dict ``{layer name: int8 output}`` (and
    ``"input"``) for layer-by-layer comparisons.
    """
    env = {INPUT: qmodel.input_q.quantize(_check_input(qmodel, x))}
    for layer in qmodel.layers:
        env[layer.name] = execute_layer(layer, [env[i] for i in layer.inputs])
    if return_all:
        return env
    out = env[qmodel.output]
    return out if return_int else qmodel.output_q.dequantize(out)


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
            ops, output = _Lowering(model, x[:1]).run()
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
        env = _run_float_ops(ops, xb)
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


def _requant(op: _Op, acc_scale: np.ndarray, bias_q: np.ndarray, acc_offset: np.ndarray,
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
        cmax = int(min(INT8_MAX, zp + _round(6.0 / out_q.scale)))
    full = lambda v: np.full(c, v, dtype=np.int8)  # noqa: E731
    return RequantParams(acc_bias.astype(np.int32), np.asarray(multiplier, np.int32),
                         np.asarray(shift, np.int8), full(zp), full(cmin), full(cmax), real)


def _quantize_op(op: _Op, in_q: tuple[QuantParams, ...], out_q: QuantParams) -> QuantLayer:
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
    acc_scale = in_q[0].scale * w_scale
    bias_q = quantize_bias(b, acc_scale, op.name)
    offset = in_q[0].zero_point * weight.reshape(len(weight), -1).astype(np.int64).sum(axis=1)
    return QuantLayer(**common, weight=weight, weight_scale=w_scale, bias=bias_q,
                      acc_scale=acc_scale, requant=_requant(op, acc_scale, bias_q, offset, out_q),
                      kernel_size=op.kernel_size, stride=op.stride, padding=op.padding,
                      dilation=op.dilation, groups=op.groups,
                      float_weight=w.astype(np.float32),
                      float_bias=None if op.float_bias is None else b.astype(np.float32))
