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
maxpool    max over windows of INT8 codes (exact: max commutes with quantization)       host
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
from ..protocol import Program
from ..sim.numerics import im2col
from .gemm import lower_gemm
from .quant import HOST_KINDS, INPUT, LayerKind, QuantLayer, QuantModel, host_layer
from .runtime import Device

__all__ = ["layer_gemms", "LayerStats", "CompiledModel"]


def _block_diagonal(parts: list[tuple[np.ndarray, np.ndarray]], cols: int):
    """Pack per-group GEMMs ``A_g (M, K_g) @ B_g (K_g, N_g)`` into fewer, block-diagonal ones.

    Groups are packed while their outputs fit one array column block (``sum N_g <= cols``):
    the array spends the same cycles as on the separate GEMMs (one column block either way)
    but runs far fewer instructions. Yields ``(A, B, first group, groups packed)``.
    """
    g = 0
    while g < len(parts):
        n = 1
        width = parts[g][1].shape[1]
        while g + n < len(parts) and width + parts[g + n][1].shape[1] <= cols:
            width += parts[g + n][1].shape[1]
            n += 1
        chunk = parts[g:g + n]
        if n == 1:
            yield chunk[0][0], chunk[0][1], g, 1
        else:
            a = np.concatenate([p[0] for p in chunk], axis=1)
            b = np.zeros((a.shape[1], width), np.int8)
            k0 = c0 = 0
            for _, w in chunk:
                b[k0:k0 + w.shape[0], c0:c0 + w.shape[1]] = w
                k0, c0 = k0 + w.shape[0], c0 + w.shape[1]
            yield a, b, g, n
        g += n


def layer_gemms(layer: QuantLayer, inputs: list[np.ndarray], cols: int = 1):
    """The GEMMs of one layer: ``[(A int8 (M, K), B int8 (K, N), output channel slice)]``.

    Rows of every ``A`` are output positions ``(n, ho, wo)`` (or samples for ``linear``); the
    GEMM outputs, placed at their channel slices and reshaped, are the layer's output. Groups
    (depthwise convs, the per-channel sums of a residual add) are packed block-diagonally up to
    ``cols`` output channels per GEMM.
    """
    x = inputs[0]
    if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
        cin, cout = x.shape[1], layer.weight.shape[0]
        cg, og = cin // layer.groups, cout // layer.groups
        w = layer.weight.reshape(cout, -1)
        parts = [(im2col(x[:, g * cg:(g + 1) * cg], layer.kernel_size, layer.stride,
                         layer.padding, layer.dilation, pad_value=layer.pad_value),
                  np.ascontiguousarray(w[g * og:(g + 1) * og].T))
                 for g in range(layer.groups)]
        return [(a, b, slice(g * og, (g + n) * og))
                for a, b, g, n in _block_diagonal(parts, cols)]
    if layer.kind == LayerKind.LINEAR:
        return [(np.ascontiguousarray(x), np.ascontiguousarray(layer.weight.T),
                 slice(0, layer.weight.shape[0]))]
    if layer.kind == LayerKind.ADD:
        # Channel c: acc = w_a[c] * a[c] + w_b[c] * b[c], a group with K = 2 and one output.
        a, b = (np.moveaxis(t, 1, -1).reshape(-1, t.shape[1]) for t in inputs)
        parts = [(np.stack([a[:, c], b[:, c]], axis=1), layer.weight[c].reshape(2, 1))
                 for c in range(a.shape[1])]
        return [(a_, b_, slice(g, g + n)) for a_, b_, g, n in _block_diagonal(parts, cols)]
    raise ShapeError(f"layer {layer.name!r} ({layer.kind.value}) has no GEMM")


def useful_macs(layer: QuantLayer, batch: int) -> int:
    """Multiply-accumulates the layer needs (no padding, no block-diagonal zeros)."""
    out_positions = batch * int(np.prod(layer.output_shape[1:]))  # output_shape is (C, H, W)
    if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
        cin = layer.input_shapes[0][0]
        kh, kw = layer.kernel_size
        return out_positions * (cin // layer.groups) * kh * kw * layer.weight.shape[0]
    if layer.kind == LayerKind.LINEAR:
        return batch * layer.weight.shape[0] * layer.weight.shape[1]
    if layer.kind == LayerKind.ADD:
        return 2 * batch * int(np.prod(layer.output_shape))
    return 0


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
                      for layer in qmodel.layers if layer.kind not in HOST_KINDS}
        self.wall_s = 0.0

    def run_layer(self, layer: QuantLayer, inputs: list[np.ndarray]) -> np.ndarray:
        """One layer on the device: int8 inputs (NCHW or NC) -> int8 output."""
        if layer.kind in HOST_KINDS:
            return host_layer(layer, inputs[0])
        config = self.device.config
        program = Program(config)
        gemms = layer_gemms(layer, inputs, config.cols)
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
        st.macs += useful_macs(layer, inputs[0].shape[0])
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
