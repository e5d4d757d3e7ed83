"""Convolution as GEMM: :func:`im2col` lowers a conv input to GEMM rows, :func:`col2im_int` is
its exact adjoint (the backward pass sums GEMM columns back into the input's positions)."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError

__all__ = ["im2col", "col2im_int", "conv_output_size"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _pads(padding) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` from ``p``, ``(ph, pw)`` or the four values."""
    if not np.isscalar(padding) and len(padding) == 4:
        return tuple(int(p) for p in padding)
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def conv_output_size(h: int, w: int, kernel_size, stride=1, padding=0,
                     dilation=1) -> tuple[int, int]:
    """``(Ho, Wo)`` of a 2-D convolution of an ``h x w`` input (PyTorch's formula).

    ``padding`` is ``p``, ``(ph, pw)`` or ``(top, bottom, left, right)``.
    """
    (kh, kw), (sh, sw), (dh, dw) = map(_pair, (kernel_size, stride, dilation))
    top, bottom, left, right = _pads(padding)
    return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (w + left + right - dw * (kw - 1) - 1) // sw + 1)


def im2col(x: np.ndarray, kernel_size: int | tuple[int, int], stride: int | tuple = 1,
           padding: int | tuple = 0, dilation: int | tuple = 1,
           pad_value: int = 0) -> np.ndarray:
    """Lower a 2-D convolution input to GEMM rows.

    ``x`` is ``(N, C, H, W)``; the result is ``(N*Ho*Wo, C*kh*kw)`` with rows in ``(n, ho, wo)``
    order and columns in ``(c, i, j)`` order, so ``im2col(x) @ w.reshape(Cout, -1).T`` is the
    convolution (PyTorch's weight layout). Padding uses ``pad_value`` (the input zero point);
    ``padding`` is ``p``, ``(ph, pw)`` or asymmetric ``(top, bottom, left, right)``.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ShapeError(f"im2col needs (N, C, H, W), got shape {x.shape}")
    (kh, kw), (sh, sw), (dh, dw) = map(_pair, (kernel_size, stride, dilation))
    top, bottom, left, right = _pads(padding)
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, w, (kh, kw), (sh, sw), (top, bottom, left, right), (dh, dw))
    if ho <= 0 or wo <= 0:
        raise ShapeError(f"im2col: kernel {kh}x{kw} (dilation {dh},{dw}) does not fit input "
                         f"{h}x{w} with padding {top, bottom, left, right}")
    xp = np.full((n, c, h + top + bottom, w + left + right), pad_value, dtype=x.dtype)
    xp[:, :, top:top + h, left:left + w] = x
    cols = np.empty((n, ho, wo, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            win = xp[:, :, r0:r0 + sh * (ho - 1) + 1:sh, c0:c0 + sw * (wo - 1) + 1:sw]
            cols[..., i, j] = win.transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, c * kh * kw)


def col2im_int(cols: np.ndarray, x_shape: tuple[int, int, int, int], kernel_size, stride=1,
               padding=0, dilation=1) -> np.ndarray:
    """Adjoint of :func:`im2col`, exact: sum GEMM columns into int64 NCHW.

    ``cols`` is ``(N*Ho*Wo, C*kh*kw)`` (integers); the overlapping contributions are added in
    int64 in a fixed order, so the result does not depend on threads or summation order.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
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
