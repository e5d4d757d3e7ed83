"""The golden numerics: pure, vectorized NumPy functions, one per arithmetic rule of the contract.

``docs/architecture.md`` sections 6 (GEMM and requantization), 7 (PASS patch-skip) and 8 (SGQ)
are defined by these functions; the golden machine calls them, and the RTL unit tests compare
against them bit for bit. Every function is exact: no tolerance anywhere.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
from amaranth.lib import data

from ..errors import DTypeError, FieldError, ShapeError
from ..hw.isa import SGQ_MODE_BITS, ChannelParams, SgqMode, SgqStripeHeader, field_table

__all__ = [
    "exact_gemm", "GemmWorkspace",
    "saturating_rounding_doubling_high_mul", "rounding_divide_by_pot", "requantize",
    "window_gather", "tiled_index", "patch_skip", "dilate_mask",
    "sgq_encode", "sgq_payload_bytes", "sgq_stripe_modes", "sgq_max_error",
]

INT32_MIN = int(np.iinfo(np.int32).min)
INT32_MAX = int(np.iinfo(np.int32).max)
#: Largest shift magnitude the requantizer applies (``shift`` is clamped to it).
MAX_SHIFT = 31

# Largest |INT8 x INT8| product: (-128) * (-128) = 2^14.
_MAX_PRODUCT = 1 << 14
# Sums of at most this many products are exact in float32 (24-bit significand).
_F32_MAX_K = (1 << 24) // _MAX_PRODUCT - 1
_F64_MAX_K = (1 << 53) // _MAX_PRODUCT - 1

_PARAM_FIELDS = {info.name: info for info in field_table(ChannelParams)}


def _check_int8(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.int8:
        raise DTypeError(f"{name} has dtype {array.dtype}, expected int8")
    return array


# -- GEMM --------------------------------------------------------------------------------------

# GEMMs up to this many MACs run on one BLAS thread: below it thread hand-off costs more than it
# saves, and a second thread on a shared (or oversubscribed, pytest -n 2) core stalls the call
# by 10-40x.
_SINGLE_THREAD_MACS = 1 << 28


@functools.cache
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return None
    return ThreadpoolController().select(user_api="blas")


def _blas_threads(macs: int):
    controller = _blas_controller()
    if controller is None or macs > _SINGLE_THREAD_MACS:
        return contextlib.nullcontext()
    return controller.limit(limits=1)


class GemmWorkspace:
    """Reusable float buffers for :func:`exact_gemm`.

    Fresh large arrays cost page faults on every call, and a multi-threaded BLAS suffers most
    from them; a machine that runs many GEMMs keeps one workspace and passes it in.
    """

    def __init__(self):
        self._flat: dict[tuple[str, np.dtype], np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A contiguous (uninitialized) array of ``shape`` backed by the buffer ``name``."""
        key, size = (name, np.dtype(dtype)), int(np.prod(shape))
        flat = self._flat.get(key)
        if flat is None or flat.size < size:
            flat = self._flat[key] = np.empty(size, dtype)
        return flat[:size].reshape(shape)


def exact_gemm(a: np.ndarray, b: np.ndarray, workspace: GemmWorkspace | None = None
               ) -> np.ndarray:
    """Exact ``a @ b`` of INT8 matrices as INT32, through float BLAS.

    float32 sgemm while every partial sum is an integer below 2^24 (``K <= 1023``), float64
    otherwise (exact below 2^53); never NumPy's slow integer matmul. ``workspace`` (optional)
    holds the float operands between calls.

    Raises
    ------
    DTypeError
        When ``a`` or ``b`` is not int8.
    ShapeError
        When the shapes are not ``(M, K)`` and ``(K, N)``.
    """
    a = _check_int8("exact_gemm operand a", a)
    b = _check_int8("exact_gemm operand b", b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ShapeError(f"exact_gemm needs (M, K) @ (K, N), got {a.shape} @ {b.shape}")
    k = a.shape[1]
    if k > _F64_MAX_K:
        raise ShapeError(f"exact_gemm: K={k} exceeds {_F64_MAX_K}, the exact float64 limit")
    ftype = np.float32 if k <= _F32_MAX_K else np.float64
    if workspace is None:
        af, bf, out = a.astype(ftype), b.astype(ftype), None
    else:
        af = workspace.array("a", a.shape, ftype)
        bf = workspace.array("b", b.shape, ftype)
        np.copyto(af, a)
        np.copyto(bf, b)
        out = workspace.array("c", (a.shape[0], b.shape[1]), ftype)
    with _blas_threads(a.shape[0] * k * b.shape[1]):
        c = np.matmul(af, bf, out=out)
    if k * _MAX_PRODUCT > INT32_MAX:  # only reachable beyond the 16-bit k field
        c = np.clip(c, INT32_MIN, INT32_MAX)
    return c.astype(np.int32)


# -- requantization (section 6) ----------------------------------------------------------------

def _as_int64(name: str, value, lo: int, hi: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iub":
        raise DTypeError(f"{name} has dtype {arr.dtype}, expected integers")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        bad = arr[(arr < lo) | (arr > hi)].flat[0]
        raise FieldError(f"{name}={bad} is outside {lo}..{hi}")
    return arr


def _srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SRDHM on int64 arrays holding int32 values (no checks)."""
    ab = a * b  # |ab| <= 2^62: fits int64
    s = ab + np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))  # fits int64
    # C++ division truncates toward zero; >> floors, so negate around it for negative sums.
    q = np.where(s >= 0, s >> 31, -((-s) >> 31))
    return np.where((a == INT32_MIN) & (b == INT32_MIN), np.int64(INT32_MAX), q)


def _rdbpot(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """RoundingDivideByPOT on int64 arrays (no checks)."""
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul of INT32 values, elementwise (broadcast).

    ``trunc((a*b + nudge) / 2^31)`` with ``nudge = 2^30`` for ``a*b >= 0`` else ``1 - 2^30``;
    ``a = b = -2^31`` saturates to ``2^31 - 1``.
    """
    a = _as_int64("a", a, INT32_MIN, INT32_MAX)
    b = _as_int64("b", b, INT32_MIN, INT32_MAX)
    return _srdhm(a, b).astype(np.int32)


def rounding_divide_by_pot(x, e) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: ``x / 2^e`` rounded half away from zero, ``0 <= e <= 31``.

    Raises
    ------
    FieldError
        When ``x`` is outside INT32 or ``e`` outside [0, 31].
    """
    x = _as_int64("x", x, INT32_MIN, INT32_MAX)
    e = _as_int64("e", e, 0, MAX_SHIFT)
    return _rdbpot(x, e).astype(np.int32)


def _param(name: str, value) -> np.ndarray:
    info = _PARAM_FIELDS[name]
    lo, hi = -(1 << (info.width - 1)), (1 << (info.width - 1)) - 1
    return _as_int64(name, value, lo, hi)


def requantize(acc, bias, multiplier, shift, zero_point, clamp_min, clamp_max) -> np.ndarray:
    """Requantize INT32 accumulators to INT8 exactly as contract section 6 (elementwise).

    ``acc`` is int32 of any shape; the parameters broadcast against it (per output channel along
    the last axis, or scalars). Parameter values must fit their ChannelParams fields; ``shift``
    is clamped to [-31, 31] as the hardware does.

    Raises
    ------
    DTypeError
        When ``acc`` is not int32.
    FieldError
        When a parameter does not fit its ChannelParams field (named with the value).
    """
    acc = np.asarray(acc)
    if acc.dtype != np.int32:
        raise DTypeError(f"requantize: acc has dtype {acc.dtype}, expected int32")
    bias = _param("bias", bias)
    multiplier = _param("multiplier", multiplier)
    shift = np.clip(_param("shift", shift), -MAX_SHIFT, MAX_SHIFT)
    zero_point = _param("zero_point", zero_point)
    clamp_min = _param("clamp_min", clamp_min)
    clamp_max = _param("clamp_max", clamp_max)
    x = np.clip(acc.astype(np.int64) + bias, INT32_MIN, INT32_MAX)
    x = np.clip(x << np.maximum(shift, 0), INT32_MIN, INT32_MAX)  # |x| * 2^31 fits int64
    y = _srdhm(x, multiplier)
    y = _rdbpot(y, np.maximum(-shift, 0))
    y = np.minimum(np.maximum(y + zero_point, clamp_min), clamp_max)
    return y.astype(np.int8)


# -- IM2COL window address generator (section 5) ---------------------------------------------

def tiled_index(y, x, width: int, patch_shape: tuple[int, int]):
    """The index of pixel ``(y, x)`` of a ``width``-wide *tiled* tensor (section 7): patches of
    ``ph x pw`` pixels in row-major order, pixels row-major inside a patch. ``width`` must be a
    multiple of ``pw``. Works elementwise on arrays."""
    ph, pw = patch_shape
    return ((y // ph) * (width // pw) + x // pw) * (ph * pw) + (y % ph) * pw + x % pw


def _tiled_position(p, width: int, patch_shape: tuple[int, int]):
    """``(y, x)`` of tiled pixel index ``p`` (the inverse of :func:`tiled_index`)."""
    ph, pw = patch_shape
    patch, r = np.divmod(p, ph * pw)
    py, px = np.divmod(patch, width // pw)
    return py * ph + r // pw, px * pw + r % pw


def window_gather(out: np.ndarray, rows: int, *, src: int, pitch: int, channels: int, in_h: int,
                  in_w: int, kh: int, kw: int, stride: int, dilation: int, pad_top: int,
                  pad_left: int, pad_value: int, oy0: int, out_w: int, m_blocks: int,
                  pack: int, pool: int = 0, patch_shape: tuple[int, int] | None = None,
                  **_) -> np.ndarray:
    """IM2COL: the INP words (int8 ``(m_blocks*K, rows)``, ``K = kh*kw*channels``; with
    ``pool`` ``K = channels``, the max over the taps) that the window of a convolution reads
    from the activation tensor in ``out`` (the OUT buffer, int8 ``(depth, cols)``), as
    :class:`~tinyaccel.hw.isa.Im2colOperands` defines them; with ``patch_shape`` (the ``tiled``
    field set) pixel indices are tiled (:func:`tiled_index`). Every block is gathered: the
    ``gate`` field is applied by the caller.

    ``pad_value`` is the field's 8-bit code (two's complement). The operands must be legal
    (:func:`tinyaccel.sim.golden.check_instruction`): every pixel read lies in ``out``.
    """
    cols = out.shape[1]
    if m_blocks == 0:
        return np.zeros((0, rows), np.int8)
    ky, kx, c = (g.ravel() for g in np.meshgrid(np.arange(kh), np.arange(kw),
                                                  np.arange(channels), indexing="ij"))
    p = oy0 * out_w + np.arange(m_blocks * rows)
    if patch_shape is None:
        oy, ox = np.divmod(p, out_w)
    else:
        oy, ox = _tiled_position(p, out_w, patch_shape)
    iy = oy[:, None] * stride - pad_top + ky[None, :] * dilation  # (pixels, K)
    ix = ox[:, None] * stride - pad_left + kx[None, :] * dilation
    inside = (iy >= 0) & (iy < in_h) & (ix >= 0) & (ix < in_w)
    if patch_shape is None:
        q = np.where(inside, iy * in_w + ix, 0)
    else:
        q = np.where(inside, tiled_index(iy, ix, in_w, patch_shape), 0)
    word = src + (q >> pack) * pitch + c[None, :] // cols
    lane = (q & ((1 << pack) - 1)) * (cols >> pack) + c[None, :] % cols
    pad = np.int8(pad_value - 256 if pad_value >= 128 else pad_value)
    values = np.where(inside, out[word, lane], pad)
    if pool:
        values = values.reshape(m_blocks * rows, kh * kw, channels).max(axis=1)
    k = channels if pool else kh * kw * channels
    return np.ascontiguousarray(
        values.reshape(m_blocks, rows, k).transpose(0, 2, 1).reshape(m_blocks * k, rows))


# -- PASS patch-skip (section 7) ---------------------------------------------------------------

def patch_skip(new: np.ndarray, ref: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Compare tiles with their references: ``(changed, new_ref)``.

    ``new`` and ``ref`` are int8 ``(blocks, k, lanes)``; ``changed[b]`` is ``max |new - ref| >
    threshold`` over block ``b``; ``new_ref`` is ``ref`` with the changed blocks replaced by
    ``new``.
    """
    new = _check_int8("patch_skip new", new)
    ref = _check_int8("patch_skip ref", ref)
    if new.shape != ref.shape or new.ndim != 3:
        raise ShapeError(f"patch_skip needs two (blocks, k, rows) arrays, got {new.shape} and "
                         f"{ref.shape}")
    threshold = int(threshold)
    if threshold < 0:
        raise FieldError(f"threshold={threshold} must be >= 0")
    diff = np.abs(new.astype(np.int16) - ref.astype(np.int16))
    d = diff.reshape(new.shape[0], -1).max(axis=1, initial=0)
    changed = d > threshold
    return changed, np.where(changed[:, None, None], new, ref)


def dilate_mask(bits: np.ndarray, *, out_h: int, out_w: int, kh: int, kw: int, stride_y: int,
                stride_x: int, pad_top: int, pad_left: int) -> np.ndarray:
    """DILATE: bool ``(out_h, out_w)``, bit ``(y, x)`` the OR of ``bits[y*stride_y - pad_top +
    ky, x*stride_x - pad_left + kx]`` over ``ky < kh, kx < kw`` (outside ``bits``: 0)."""
    bits = np.asarray(bits, bool)
    in_h, in_w = bits.shape
    padded = np.zeros((pad_top + max(in_h, out_h * stride_y) + kh,
                       pad_left + max(in_w, out_w * stride_x) + kw), bool)
    padded[pad_top:pad_top + in_h, pad_left:pad_left + in_w] = bits
    result = np.zeros((out_h, out_w), bool)
    for ky in range(kh):
        for kx in range(kw):
            result |= padded[ky:ky + out_h * stride_y:stride_y,
                             kx:kx + out_w * stride_x:stride_x][:out_h, :out_w]
    return result


# -- SGQ stripe encoder (section 8) ------------------------------------------------------------

_MODE_BITS = SgqMode.as_shape().width
_HEADER = {info.name: info for info in field_table(SgqStripeHeader)}
_HEADER_BITS = data.Layout.cast(SgqStripeHeader).size
_OFFSET_BITS = _HEADER["offset"].width
_SHIFT_BITS = _HEADER["shift"].width
_VALUE_BITS = 8  # one INT8 OUT value: the group base
#: Coded modes from narrowest to widest.
_CODED = sorted(SGQ_MODE_BITS, key=SGQ_MODE_BITS.get)


def _sgq_args(values, stripe_len: int, max_shift: int) -> tuple[np.ndarray, int, int]:
    values = _check_int8("SGQ values", values)
    if values.ndim != 2:
        raise ShapeError(f"SGQ values must be (count, cols), got shape {values.shape}")
    stripe_len, max_shift = int(stripe_len), int(max_shift)
    if stripe_len < 1:
        raise FieldError(f"SGQ: stripe_len={stripe_len} must be >= 1")
    if values.shape[0] % stripe_len:
        raise ShapeError(f"SGQ: count={values.shape[0]} is not a multiple of "
                         f"stripe_len={stripe_len}")
    if not 0 <= max_shift < 1 << _SHIFT_BITS:
        raise FieldError(f"SGQ: max_shift={max_shift} is outside 0..{(1 << _SHIFT_BITS) - 1}")
    return values, stripe_len, max_shift


def sgq_stripe_modes(values: np.ndarray, stripe_len: int, max_shift: int):
    """The encoder's per-stripe decisions: ``(base, mode, lo, shift)``.

    ``base`` is the group minimum (int), ``mode`` an int array of :class:`SgqMode` values,
    ``lo`` the stripe minima, ``shift`` the chosen shifts (0 for BASE stripes).
    """
    values, stripe_len, max_shift = _sgq_args(values, stripe_len, max_shift)
    stripes = values.reshape(-1, stripe_len * values.shape[1]).astype(np.int32)
    if stripes.shape[0] == 0:
        empty = np.zeros(0, np.int32)
        return 0, empty, empty, empty
    base = int(stripes.min())
    lo, hi = stripes.min(axis=1), stripes.max(axis=1)
    span = (hi - lo)[:, None]
    s = np.arange(1 << _SHIFT_BITS)
    half = (1 << s) >> 1
    mode = np.full(len(lo), SgqMode.BASE.value, np.int32)
    shift = np.zeros(len(lo), np.int32)
    todo = hi != base
    for m in _CODED:  # narrowest first
        fits = ((span + half) >> s) <= (1 << SGQ_MODE_BITS[m]) - 1  # (stripes, shifts)
        smallest = np.argmax(fits, axis=1)  # monotone in s: first True is the smallest shift
        ok = todo & fits.any(axis=1) & (smallest <= max_shift)
        mode[ok] = m.value
        shift[ok] = smallest[ok]
        todo &= ~ok
    assert not todo.any()  # 8-bit codes with shift 0 always fit
    return base, mode, lo, shift


def _code_bits(mode: np.ndarray) -> np.ndarray:
    lut = np.zeros(1 << _MODE_BITS, np.int64)
    for m, bits in SGQ_MODE_BITS.items():
        lut[m.value] = bits
    return lut[mode]


def sgq_payload_bytes(values: np.ndarray, stripe_len: int, max_shift: int) -> int:
    """Length of the SGQ payload of ``values`` (section 8 formula; 0 for an empty group)."""
    values, stripe_len, max_shift = _sgq_args(values, stripe_len, max_shift)
    if values.shape[0] == 0:
        return 0
    _, mode, _, _ = sgq_stripe_modes(values, stripe_len, max_shift)
    length = stripe_len * values.shape[1]
    coded = mode != SgqMode.BASE.value
    bits = _VALUE_BITS + len(mode) * _MODE_BITS + int(
        (coded * (_HEADER_BITS + length * _code_bits(mode))).sum())
    return -(-bits // 8)


def sgq_encode(values: np.ndarray, stripe_len: int, max_shift: int) -> bytes:
    """SGQ-encode one channel group ``int8 (count, cols)`` into its wire payload (section 8).

    An empty group (``count = 0``) encodes to an empty payload.

    Raises
    ------
    FieldError
        For ``stripe_len < 1`` or ``max_shift`` outside the 3-bit field.
    ShapeError
        When ``count`` is not a multiple of ``stripe_len``.
    """
    values, stripe_len, max_shift = _sgq_args(values, stripe_len, max_shift)
    if values.shape[0] == 0:
        return b""
    base, mode, lo, shift = sgq_stripe_modes(values, stripe_len, max_shift)
    stripes = values.reshape(len(mode), -1).astype(np.int64)
    length = stripes.shape[1]
    coded = (mode != SgqMode.BASE.value).astype(np.int64)
    b = _code_bits(mode) * coded
    half = (np.int64(1) << shift) >> 1
    codes = (stripes - lo[:, None] + half[:, None]) >> shift[:, None]
    # One row of fields per stripe: mode, offset, shift, codes; width 0 drops a field.
    vals = np.concatenate([mode[:, None], (lo - base)[:, None], shift[:, None], codes], axis=1)
    widths = np.concatenate([np.full((len(mode), 1), _MODE_BITS), coded[:, None] * _OFFSET_BITS,
                             coded[:, None] * _SHIFT_BITS,
                             np.broadcast_to(b[:, None], (len(mode), length))], axis=1)
    vals = np.concatenate([[base & 0xFF], vals.ravel()]).astype(np.int64)
    widths = np.concatenate([[_VALUE_BITS], widths.ravel()])
    bit = np.arange(max(_VALUE_BITS, _OFFSET_BITS, max(SGQ_MODE_BITS.values())))
    bits = ((vals[:, None] >> bit) & 1)[bit < widths[:, None]]  # LSB first, field order
    return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def sgq_max_error(max_shift: int) -> int:
    """Largest ``|decoded - value|`` SGQ allows: ``h(max_shift) = 2^max_shift >> 1``."""
    return (1 << int(max_shift)) >> 1

