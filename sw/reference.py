"""The host reference executors of a quantized model: INT8 with the golden numerics, and FP32.

:func:`run_quantized` runs a :class:`~tinyaccel.sw.quant_ir.QuantModel` in NumPy through the same
layer-to-GEMM mapping as the compiler (:mod:`tinyaccel.sw.lowering`), with exact integer GEMMs
(:func:`~tinyaccel.sim.numerics.exact_gemm`) and :func:`~tinyaccel.sim.numerics.requantize`, so
INT8 accuracy is known before the accelerator runs and every device result has a reference.
:func:`run_float` runs the FP32 model the quantized one came from (BatchNorm folded).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DTypeError, ShapeError
from ..sim.numerics import exact_gemm
from .fx_frontend import run_float_ops
from .lowering import assemble, host_layer, layer_gemms
from .quant_ir import HOST_KINDS, INPUT, QuantLayer, QuantModel

__all__ = ["accumulate", "execute_layer", "run_quantized", "run_float"]


def accumulate(layer: QuantLayer, inputs: list[np.ndarray]) -> np.ndarray:
    """The exact INT32 accumulators of a layer, channels last: ``(N, Ho, Wo, C)`` or ``(N, C)``.

    This is what the accelerator's GEMMs leave in ACC (before requantization, without bias):
    the layer's GEMMs (:func:`~tinyaccel.sw.lowering.layer_gemms`, one per group) computed
    exactly on the host.

    Raises
    ------
    ShapeError
        For a layer without GEMMs (``flatten``, ``maxpool``).
    """
    gemms = layer_gemms(layer, inputs)
    results = [exact_gemm(a, b) for a, b, _ in gemms]
    return assemble(layer, gemms, results, inputs[0].shape[0])


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
    and :func:`~tinyaccel.sim.numerics.requantize`. ``return_int`` gives the int8 output codes
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


def run_float(qmodel: QuantModel, x, return_all: bool = False):
    """Run the lowered FP32 model (BatchNorm folded) that ``qmodel`` was quantized from.

    Returns the float32 output (NumPy), or with ``return_all`` a dict of every layer's output.
    """
    x = torch.as_tensor(_check_input(qmodel, x))
    with torch.no_grad():
        env = run_float_ops(qmodel.layers, x)
    if return_all:
        return {k: v.numpy() for k, v in env.items()}
    return env[qmodel.output].numpy()
