"""Compile a quantized model (``sw/quant``) onto the accelerator and run it on any backend.

Every arithmetic layer of a :class:`~tinyaccel.sw.quant.QuantModel` is a GEMM plus per-channel
requantization, and runs on the accelerator:

=========  =========================================================================  ==========
layer      lowering                                                                    where
=========  =========================================================================  ==========
conv2d     per group: ``im2col`` on the host (padding = input zero point), GEMM +       accelerator
           REQUANT (bias, BN, zero points and ReLU/ReLU6 folded into ChannelParams)
linear     GEMM + REQUANT                                                              accelerator
avgpool    a depthwise conv with unit weights; the 1/(kh*kw) lives in the multiplier   accelerator
add        ``[a | b] @ blockdiag(w_a, w_b)`` (K = 2C) + REQUANT                         accelerator
flatten    reshape                                                                     host
=========  =========================================================================  ==========

One program per layer (all groups of a grouped conv in one program) ends with
``SYNC counters=1 clear=1``, so each layer reports its own cycles and MACs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ShapeError
from ..hw.isa import Counter, Opcode
from ..hw.protocol import Program
from ..sim.numerics import im2col
from .gemm import lower_gemm
from .quant import INPUT, LayerKind, QuantLayer, QuantModel
from .runtime import Device

__all__ = ["layer_gemms", "LayerStats", "CompiledModel"]


def layer_gemms(layer: QuantLayer, inputs: list[np.ndarray]):
    """The GEMMs of one layer: ``[(A int8 (M, K), B int8 (K, N), channel slice)]``.

    Rows of every ``A`` are output positions ``(n, ho, wo)`` (or samples for ``linear``); the
    concatenation of the GEMM outputs along channels, reshaped, is the layer's output.
    """
    x = inputs[0]
    if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
        cin, cout = x.shape[1], layer.weight.shape[0]
        cg, og = cin // layer.groups, cout // layer.groups
        w = layer.weight.reshape(cout, -1)
        return [(im2col(x[:, g * cg:(g + 1) * cg], layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, pad_value=layer.pad_value),
                 np.ascontiguousarray(w[g * og:(g + 1) * og].T), slice(g * og, (g + 1) * og))
                for g in range(layer.groups)]
    if layer.kind == LayerKind.LINEAR:
        return [(np.ascontiguousarray(x), np.ascontiguousarray(layer.weight.T),
                 slice(0, layer.weight.shape[0]))]
    if layer.kind == LayerKind.ADD:
        a, b = (np.moveaxis(t, 1, -1).reshape(-1, t.shape[1]) for t in inputs)
        c = a.shape[1]
        blockdiag = np.zeros((2 * c, c), np.int8)
        blockdiag[np.arange(c), np.arange(c)] = layer.weight[:, 0]
        blockdiag[c + np.arange(c), np.arange(c)] = layer.weight[:, 1]
        return [(np.ascontiguousarray(np.concatenate([a, b], axis=1)), blockdiag, slice(0, c))]
    raise ShapeError(f"layer {layer.name!r} ({layer.kind.value}) has no GEMM")


@dataclass
class LayerStats:
    """What one layer cost on the accelerator, summed over the batches run."""
    name: str
    kind: str
    array_macs: int  # MAC units of the configuration
    gemms: int = 0
    macs: int = 0  # useful MACs (M x N x K of the real shapes)
    macs_issued: int = 0  # MACs the array performed (padding included)
    cycles: int = 0  # accelerator cycles (RTL and board backends; 0 on golden)

    @property
    def utilization(self) -> float:
        """Useful MACs per array-MAC-cycle over the layer's whole program (loads included)."""
        return self.macs / (self.cycles * self.array_macs) if self.cycles else float("nan")


class CompiledModel:
    """A quantized model bound to a device: call it with float input, get float logits.

    Parameters
    ----------
    qmodel:
        The output of :func:`tinyaccel.sw.quant.quantize`.
    device:
        A :class:`~tinyaccel.sw.runtime.Device` (golden, RTL or board).
    batch_size:
        Images per device program (larger batches fill the array better).
    """

    def __init__(self, qmodel: QuantModel, device: Device, batch_size: int = 64):
        self.qmodel = qmodel
        self.device = device
        self.batch_size = batch_size
        self.stats = {layer.name: LayerStats(layer.name, layer.kind.value, device.config.macs)
                      for layer in qmodel.layers if layer.kind != LayerKind.FLATTEN}
        self.wall_s = 0.0

    def run_layer(self, layer: QuantLayer, inputs: list[np.ndarray]) -> np.ndarray:
        """One layer on the device: int8 inputs (NCHW or NC) -> int8 output."""
        if layer.kind == LayerKind.FLATTEN:
            return inputs[0].reshape(len(inputs[0]), -1)
        config = self.device.config
        program = Program(config)
        gemms = layer_gemms(layer, inputs)
        lowerings = []
        for a, b, channels in gemms:
            params = {name: getattr(layer.requant, name)[channels]
                      for name in layer.requant.FIELDS}
            lowerings.append((lower_gemm(config, program, a, b, params), channels))
        program.sync(counters=True, clear=True)
        responses = self.device.run(program)
        stores = [r for instr, r in zip(program.instructions, responses, strict=True)
                  if instr.opcode == Opcode.STORE]
        first_m = gemms[0][0].shape[0]
        out = np.empty((first_m, layer.requant.bias.shape[0]), np.int8)
        pos = 0
        for lowering, channels in lowerings:
            n = lowering.store_count
            out[:, channels] = lowering.collect(stores[pos:pos + n])
            pos += n
        st = self.stats[layer.name]
        counters = responses[-1].counters
        st.gemms += len(gemms)
        st.macs += sum(a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in gemms)
        st.macs_issued += counters[Counter.MACS_ISSUED]
        st.cycles += counters[Counter.CYCLES]
        if layer.kind == LayerKind.LINEAR:
            return out
        n = inputs[0].shape[0]
        return np.moveaxis(out.reshape(n, *layer.output_shape[1:], -1), -1, 1)

    def run_int(self, x_int8: np.ndarray, return_all: bool = False):
        """Run on already-quantized int8 input; int8 output codes (or every layer's)."""
        env = {INPUT: x_int8}
        for layer in self.qmodel.layers:
            env[layer.name] = self.run_layer(layer, [env[i] for i in layer.inputs])
        return env if return_all else env[self.qmodel.output]

    def __call__(self, x, progress=None) -> torch.Tensor:
        """Float input (N x C x H x W tensor or array) -> float logits, batch by batch."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if tuple(x.shape[1:]) != tuple(self.qmodel.input_shape):
            raise ShapeError(f"input of shape {tuple(x.shape)}; the model takes (N, "
                             f"{', '.join(map(str, self.qmodel.input_shape))})")
        start = time.perf_counter()
        q = self.qmodel.input_q.quantize(x.astype(np.float32))
        outs = []
        batches = range(0, len(q), self.batch_size)
        for i in (progress(batches, desc=f"infer ({self.device.backend.name})", unit="batch")
                  if progress else batches):
            outs.append(self.run_int(q[i:i + self.batch_size]))
        self.wall_s += time.perf_counter() - start
        return torch.from_numpy(self.qmodel.output_q.dequantize(np.concatenate(outs)))

    @property
    def cycles(self) -> int:
        return sum(s.cycles for s in self.stats.values())
