"""Layer to GEMMs: the one mapping of a quantized layer onto INT8 GEMMs (or a host op).

The compiler runs these GEMMs on a device (:mod:`tinyaccel.sw.compiler`) and the reference
executor on the host (:mod:`tinyaccel.sw.reference`); both place the results with
:func:`assemble`, so they compute the same integers by construction.

=========  ========================================================================================
kind       GEMMs (``A`` int8 ``(M, K)``, ``B`` int8 ``(K, N)``; rows of ``A`` are output positions)
=========  ========================================================================================
conv2d     per group ``g``: ``A = im2col(x[:, group g], pad_value=zp_in)`` (rows ``(n, ho, wo)``,
           columns ``(c, i, j)``), ``B = weight[group g].reshape(O_g, -1).T``
linear     ``A = x``, ``B = weight.T``
avgpool    as conv2d (a depthwise conv with unit weights)
add        per channel ``c``: ``A = [a[:, c] | b[:, c]]`` (K = 2), ``B = weight[c]`` (2, 1)
flatten    host: a reshape in NCHW order
maxpool    host: the max over windows of INT8 codes (padding never wins the max)
=========  ========================================================================================

Groups (depthwise convs, the channels of a residual add) are packed block-diagonally up to
``cols`` output channels per GEMM: the array spends the same cycles as on the separate GEMMs (one
column block either way) but runs far fewer instructions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the universal torch idiom

from ..errors import ShapeError
from .im2col import im2col
from .quant_ir import HOST_KINDS, LayerKind, QuantLayer

__all__ = ["LayerGemm", "layer_gemms", "assemble", "host_layer", "useful_macs"]

#: One GEMM of a layer: ``(A int8 (M, K), B int8 (K, N), output channel slice)``.
LayerGemm = tuple[np.ndarray, np.ndarray, slice]


def _block_diagonal(parts: list[tuple[np.ndarray, np.ndarray]], cols: int):
    """Pack per-group GEMMs ``A_g (M, K_g) @ B_g (K_g, N_g)`` into fewer, block-diagonal ones.

    Groups are packed while their outputs fit one array column block (``sum N_g <= cols``).
    Yields ``(A, B, first group, groups packed)``.
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


def layer_gemms(layer: QuantLayer, inputs: list[np.ndarray], cols: int = 1) -> list[LayerGemm]:
    """The GEMMs of one layer: ``[(A int8 (M, K), B int8 (K, N), output channel slice)]``.

    Rows of every ``A`` are output positions ``(n, ho, wo)`` (or samples for ``linear``); the
    GEMM outputs, placed at their channel slices by :func:`assemble`, are the layer's output.
    Groups are packed block-diagonally up to ``cols`` output channels per GEMM (``cols=1``: one
    GEMM per group).

    Raises
    ------
    ShapeError
        For a layer without GEMMs (``flatten``, ``maxpool``: see :func:`host_layer`).
    """
    x = inputs[0]
    if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
        cin, cout = x.shape[1], layer.weight.shape[0]
        cg, og = cin // layer.groups, cout // layer.groups
        w = layer.weight.reshape(cout, -1)
        parts = [(im2col(x[:, g * cg:(g + 1) * cg], layer.kernel_size, layer.stride,
                         layer.pads, layer.dilation, pad_value=layer.pad_value),
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


def assemble(layer: QuantLayer, gemms: list[LayerGemm], results: list[np.ndarray],
             batch: int) -> np.ndarray:
    """Place the GEMM results at their channel slices: the layer's output, channels last.

    ``(N, Ho, Wo, C)`` for convolutions, pooling and add, ``(N, C)`` for ``linear``; the dtype is
    the results' (int8 requantized outputs, or int32 accumulators).
    """
    out = np.empty((gemms[0][0].shape[0], layer.requant.bias.shape[0]), results[0].dtype)
    for (_, _, channels), result in zip(gemms, results, strict=True):
        out[:, channels] = result
    if layer.kind == LayerKind.LINEAR:
        return out
    return out.reshape(batch, *layer.output_shape[1:], -1)


def host_layer(layer: QuantLayer, x: np.ndarray) -> np.ndarray:
    """A host-side layer on INT8 codes: flatten, or max pooling (padding never wins the max)."""
    if layer.kind not in HOST_KINDS:
        raise ShapeError(f"layer {layer.name!r} ({layer.kind.value}) is not a host layer")
    if layer.kind == LayerKind.FLATTEN:
        return x.reshape(len(x), -1)
    y = F.max_pool2d(torch.from_numpy(x.astype(np.float32)), layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation)  # int8 codes are exact in float32
    return y.numpy().astype(np.int8)


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
