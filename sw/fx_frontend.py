"""The torch.fx front end of the quantizer: a float ``nn.Module`` -> a list of float ops.

:class:`FxLowering` traces a model with ``torch.fx``, folds BatchNorm into the preceding
convolution and fuses ReLU / ReLU6 into the layer before them; each op (:class:`FloatOp`) has the
field names of :class:`~tinyaccel.sw.quant_ir.QuantLayer` where they overlap, so
:func:`float_layer` runs either. ``nn.Dropout`` and ``nn.Identity`` vanish. Anything else raises
:class:`~tinyaccel.errors.UnsupportedLayerError` naming the layer's module path and type and why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the universal torch idiom
from torch import fx, nn

from ..errors import ShapeError, UnsupportedLayerError
from .quant_ir import HOST_KINDS, INPUT, Activation, LayerKind

__all__ = ["FloatOp", "FxLowering", "float_layer", "run_float_ops", "SUPPORTED"]


@dataclass
class FloatOp:
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
    padding_end: tuple[int, int] | None = None  #: (bottom, right) when not equal to padding
    fused: list[str] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shape: tuple[int, ...] = ()


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


_RELU_FUNCS = {F.relu: Activation.RELU, torch.relu: Activation.RELU,
               F.relu6: Activation.RELU6}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_FLATTEN_FUNCS = {torch.flatten}
_RESHAPE_METHODS = ("view", "reshape")
SUPPORTED = ("Conv2d, Linear, BatchNorm2d (after a Conv2d), BatchNorm1d (after a Linear), ReLU, "
             "ReLU6, AvgPool2d, MaxPool2d, AdaptiveAvgPool2d, Flatten, x.view(x.size(0), -1), "
             "zero padding (F.pad, ZeroPad2d) before a Conv2d, Dropout, Identity, "
             "tensor + tensor")


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


class FxLowering:
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
        self.ops: dict[str, FloatOp] = {}
        self.alias: dict[str, str] = {}  # fx node name -> op name whose output it is
        self.tip: dict[str, fx.Node] = {}  # op name -> last fx node carrying its output
        # fx node name of a zero pad -> (op name it pads, (left, right, top, bottom)); folded
        # into the convolution that reads it (the pad value is then the input zero point)
        self.pads: dict[str, tuple[str, tuple[int, int, int, int]]] = {}
        self.scalars: set[str] = set()  # x.size(i) nodes: shapes, only for reshapes
        self.output: str | None = None

    def run(self) -> tuple[list[FloatOp], str]:
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
        if arg.name in self.pads:
            raise _unsupported(node, self.modules, f"its input {arg.name!r} is zero padding; "
                                                   f"padding is supported only directly "
                                                   f"before a Conv2d")
        if arg.name not in self.alias:
            raise _unsupported(node, self.modules, f"its input {arg.name!r} is not produced by "
                                                   f"a supported layer")
        return self.alias[arg.name]

    def _new(self, node: fx.Node, op: FloatOp) -> None:
        op.input_shapes = [_shape(a) for a in node.all_input_nodes if a.name not in self.scalars]
        op.output_shape = _shape(node)
        self.ops[op.name] = op
        self.alias[node.name] = op.name
        self.tip[op.name] = node

    def _fusable(self, node: fx.Node, what: str) -> FloatOp:
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
            ph, pw = _pair(m.padding)
            start, end = (ph, pw), None
            if arg.name in self.pads:  # F.pad / ZeroPad2d before: fold it into the padding
                src, (left, right, top, bottom) = self.pads[arg.name]
                start, end = (ph + top, pw + left), (ph + bottom, pw + right)
                end = None if end == start else end
                while arg.name in self.pads:  # the unpadded tensor, for the input shape
                    arg = arg.args[0]
            else:
                src = self._src(node, arg)
            self._new(node, FloatOp(name, LayerKind.CONV2D, "Conv2d", [src],
                                    m.weight.detach().clone(),
                                    None if m.bias is None else m.bias.detach().clone(),
                                    _pair(m.kernel_size), _pair(m.stride), start,
                                    _pair(m.dilation), m.groups, padding_end=end))
            self.ops[name].input_shapes = [_shape(arg)]
        elif isinstance(m, nn.Linear):
            (arg,) = node.all_input_nodes
            if len(_shape(arg)) != 1:
                raise _unsupported(node, self.modules, f"input of per-sample shape "
                                                       f"{_shape(arg)}; only (N, features) is "
                                                       f"supported (flatten first)")
            self._new(node, FloatOp(name, LayerKind.LINEAR, "Linear", [self._src(node, arg)],
                                    m.weight.detach().clone(),
                                    None if m.bias is None else m.bias.detach().clone()))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            what = type(m).__name__
            into = LayerKind.CONV2D if isinstance(m, nn.BatchNorm2d) else LayerKind.LINEAR
            op = self._fusable(node, what)
            if op.kind != into or op.activation != Activation.NONE:
                layer = "Conv2d" if into == LayerKind.CONV2D else "Linear"
                raise _unsupported(node, self.modules, f"{what} folds only into a {layer} "
                                                       f"directly before it, not into "
                                                       f"{op.kind.value} {op.name!r}")
            if m.running_mean is None or m.running_var is None:
                raise _unsupported(node, self.modules, f"{what} without running "
                                                       f"statistics cannot be folded")
            inv = (m.running_var + m.eps).rsqrt()
            gamma = m.weight.detach() if m.affine else torch.ones_like(inv)
            beta = m.bias.detach() if m.affine else torch.zeros_like(inv)
            bias = op.float_bias if op.float_bias is not None else torch.zeros_like(inv)
            per_channel = (gamma * inv).reshape(-1, *[1] * (op.float_weight.ndim - 1))
            op.float_weight = op.float_weight * per_channel
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
            self._new(node, FloatOp(node.target, LayerKind.MAXPOOL, "MaxPool2d",
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
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            self._pad(node, m.padding, m.value)
        else:
            raise _unsupported(node, self.modules, f"not supported by the INT8 quantizer; "
                                                   f"supported: {SUPPORTED}")

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
        self._new(node, FloatOp(node.target, LayerKind.AVGPOOL, type(m).__name__,
                                [self._src(node, arg)], weight, None, kernel, stride, groups=c))

    def _flatten(self, node: fx.Node, name: str, label: str) -> None:
        arg = node.args[0]
        self._new(node, FloatOp(name, LayerKind.FLATTEN, label, [self._src(node, arg)]))
        self.ops[name].input_shapes = [_shape(arg)]

    def _pad(self, node: fx.Node, pad, value) -> None:
        """A constant zero pad of the last two axes: kept until the Conv2d that reads it."""
        pad = tuple(int(p) for p in pad)
        if len(pad) == 2:
            pad += (0, 0)
        if len(pad) != 4 or min(pad) < 0 or value not in (None, 0, 0.0):
            raise _unsupported(node, self.modules, f"padding {pad} with value {value}; only "
                                                   f"non-negative zero padding of H and W "
                                                   f"before a Conv2d is supported")
        arg = node.args[0]
        if isinstance(arg, fx.Node) and arg.name in self.pads:  # pad of a pad: add them
            src, inner = self.pads[arg.name]
            pad = tuple(a + b for a, b in zip(pad, inner, strict=True))
        else:
            src = self._src(node, arg)
        self.pads[node.name] = (src, pad)

    def _reshape(self, node: fx.Node) -> None:
        """``x.view(x.size(0), -1)`` and the like: a flatten when it keeps the batch axis."""
        x = node.args[0]
        if isinstance(x, fx.Node) and x.name not in self.scalars:
            meta_in, meta_out = x.meta.get("tensor_meta"), node.meta.get("tensor_meta")
            dims = node.args[1:] if len(node.args) > 2 or not isinstance(
                node.args[1], (tuple, list)) else tuple(node.args[1])
            batch = dims[0] if dims else None
            keeps_batch = (isinstance(batch, fx.Node) and batch.op == "call_method"
                           and batch.target == "size" and batch.args[0] is x
                           and tuple(batch.args[1:]) == (0,)) or batch == -1
            if (meta_in is not None and meta_out is not None and keeps_batch and len(dims) == 2
                    and len(meta_out.shape) == 2
                    and int(np.prod(meta_in.shape[1:])) == int(meta_out.shape[1])):
                return self._flatten(node, node.name, f"Tensor.{node.target}")
        raise _unsupported(node, self.modules, "only a reshape to (batch, -1) that keeps the "
                                               "batch axis, x.view(x.size(0), -1), is supported")

    def _function(self, node: fx.Node) -> None:
        target = node.target
        if node.op == "call_method":
            if target == "size" and len(node.args) == 2:  # a shape, used by a reshape
                self.scalars.add(node.name)
                return None
            if target in _RESHAPE_METHODS and len(node.args) >= 2 and not node.kwargs:
                return self._reshape(node)
            if target == "relu" and len(node.args) == 1:
                return self._activation(node, Activation.RELU, node.name)
            if target == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs:
                return self._flatten(node, node.name, "Tensor.flatten")
            if target == "add" and len(node.args) == 2 and not node.kwargs:
                return self._add(node)
            raise _unsupported(node, self.modules, f"not supported by the INT8 quantizer; "
                                                   f"supported: {SUPPORTED}")
        if target in _RELU_FUNCS and len(node.args) == 1:
            return self._activation(node, _RELU_FUNCS[target], node.name)
        if target in _FLATTEN_FUNCS and tuple(node.args[1:]) in ((1,), (1, -1)) \
                and not node.kwargs:
            return self._flatten(node, node.name, "torch.flatten")
        if target in _ADD_FUNCS and len(node.args) == 2 and not node.kwargs:
            return self._add(node)
        if target is F.pad:
            names = ("input", "pad", "mode", "value")[:len(node.args)]
            args = dict(zip(names, node.args, strict=True)) | node.kwargs
            if args.get("mode", "constant") == "constant":
                return self._pad(node, args["pad"], args.get("value"))
        raise _unsupported(node, self.modules, f"not supported by the INT8 quantizer; "
                                               f"supported: {SUPPORTED}")

    def _add(self, node: fx.Node) -> None:
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            raise _unsupported(node, self.modules, "only tensor + tensor is supported (no "
                                                   "constants)")
        if _shape(a) != _shape(b):
            raise _unsupported(node, self.modules, f"operands of shapes {_shape(a)} and "
                                                   f"{_shape(b)}; broadcasting is not supported")
        self._new(node, FloatOp(node.name, LayerKind.ADD, "operator.add",
                                [self._src(node, a), self._src(node, b)]))



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
        x, padding = inputs[0], layer.padding
        if getattr(layer, "padding_end", None) is not None:  # asymmetric: pad first
            (top, left), (bottom, right) = layer.padding, layer.padding_end
            x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
        y = F.conv2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype),
                     layer.stride, padding, layer.dilation, layer.groups)
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


def run_float_ops(ops, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ops (or layers) in order on ``x``: ``{name: output}``, the input as ``"input"``."""
    env = {INPUT: x}
    for op in ops:
        env[op.name] = float_layer(op, [env[i] for i in op.inputs])
    return env
