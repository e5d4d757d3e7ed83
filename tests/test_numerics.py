"""Golden numerics against independent references: PyTorch float64, scalar gemmlowp, hand bits."""

import re
import zlib

import numpy as np
import pytest
import torch
from torch.nn import functional

from tinyaccel.errors import DTypeError, FieldError, IntegrityError, ProtocolError, ShapeError
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import CRC, SGQ_MODE_BITS, Buffer, SgqMode
from tinyaccel.protocol import sgq_frame, sgq_response_length, sgq_unframe
from tinyaccel.sim.numerics import (
    GemmWorkspace,
    exact_gemm,
    patch_skip,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    sgq_encode,
    sgq_payload_bytes,
)
from tinyaccel.sim.randprog import random_channel_params, seed_from_env
from tinyaccel.sw.im2col import im2col
from tinyaccel.sw.sgq import decode_payload

I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1


@pytest.fixture
def rng():
    return np.random.default_rng(seed_from_env())


def int8(rng, shape, extremes=0.1):
    x = rng.integers(-128, 128, shape)
    pick = rng.random(shape)
    x[pick < extremes / 2] = -128
    x[(pick >= extremes / 2) & (pick < extremes)] = 127
    return x.astype(np.int8)


# -- GEMM --------------------------------------------------------------------------------------

def conv_by_gemm(x, w, stride, padding, dilation, groups):
    """Grouped conv2d lowered to exact_gemm through im2col (NCHW, PyTorch weight layout)."""
    n, c = x.shape[:2]
    cout, cg, kh, kw = w.shape
    og = cout // groups
    outs = []
    for g in range(groups):
        cols = im2col(x[:, g * cg:(g + 1) * cg], (kh, kw), stride, padding, dilation)
        wg = np.ascontiguousarray(w[g * og:(g + 1) * og].reshape(og, -1).T)
        outs.append(exact_gemm(cols, wg))
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return np.concatenate(outs, axis=1).reshape(n, ho, wo, cout).transpose(0, 3, 1, 2)


@pytest.fixture
def torch_one_thread():
    """Tiny convolutions: one thread avoids stalls on a shared or oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_exact_gemm_equals_torch_conv2d(rng, torch_one_thread):
    for trial in range(25):
        groups = int(rng.choice([1, 2, 3]))
        cg, og = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        stride = tuple(int(s) for s in rng.integers(1, 3, 2))
        padding = tuple(int(p) for p in rng.integers(0, 3, 2))
        dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
        h = int(rng.integers(dilation[0] * (kh - 1) + 1, 12))
        w_ = int(rng.integers(dilation[1] * (kw - 1) + 1, 12))
        x = int8(rng, (int(rng.integers(1, 3)), groups * cg, h, w_))
        w = int8(rng, (groups * og, cg, kh, kw))
        expect = functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                          stride=stride, padding=padding, dilation=dilation, groups=groups)
        got = conv_by_gemm(x, w, stride, padding, dilation, groups)
        assert got.dtype == np.int32
        assert np.array_equal(got, expect.numpy().astype(np.int64)), f"trial {trial}"


def test_exact_gemm_equals_torch_linear(rng, torch_one_thread):
    for m, k, n in [(1, 1, 1), (7, 33, 5), (64, 1023, 17), (3, 1024, 2), (5, 3000, 4)]:
        a, w = int8(rng, (m, k), 0.5), int8(rng, (n, k), 0.5)
        expect = functional.linear(torch.from_numpy(a).double(), torch.from_numpy(w).double())
        assert np.array_equal(exact_gemm(a, np.ascontiguousarray(w.T)), expect.numpy()), (m, k, n)


def test_large_k_takes_the_exact_float64_path(rng):
    # Sums beyond 2^24 that float32 cannot hold: the float64 path must be taken and be exact.
    k = 4000
    a = np.full((4, k), -128, np.int8)
    a[:, ::7] = 127
    b = np.full((k, 3), -128, np.int8)
    b[::5, 1] = 1
    expect = a.astype(np.int64) @ b.astype(np.int64)
    assert np.abs(expect).max() > 2 ** 24
    f32 = (a.astype(np.float32) @ b.astype(np.float32)).astype(np.int64)
    assert not np.array_equal(f32, expect), "this case must be inexact in float32"
    assert np.array_equal(exact_gemm(a, b), expect)
    ws = GemmWorkspace()
    for _ in range(2):  # reused buffers give the same answer
        assert np.array_equal(exact_gemm(a, b, ws), expect)
    small = int8(rng, (3, 5)), int8(rng, (5, 2))
    assert np.array_equal(exact_gemm(*small, ws), small[0].astype(int) @ small[1].astype(int))


def test_exact_gemm_checks_arguments():
    with pytest.raises(DTypeError, match="int16"):
        exact_gemm(np.zeros((2, 2), np.int16), np.zeros((2, 2), np.int8))
    with pytest.raises(ShapeError, match=r"\(2, 3\) @ \(2, 2\)"):
        exact_gemm(np.zeros((2, 3), np.int8), np.zeros((2, 2), np.int8))


def test_im2col_padding_value():
    x = np.arange(4, dtype=np.int8).reshape(1, 1, 2, 2)
    cols = im2col(x, 3, padding=1, pad_value=-7)
    assert cols.shape == (4, 9)
    assert cols[0].tolist() == [-7, -7, -7, -7, 0, 1, -7, 2, 3]
    with pytest.raises(ShapeError, match="does not fit"):
        im2col(x, 5)


# -- requantization: straight scalar transcription of section 6 (Python ints) ------------------

def sat32(v):
    return max(I32_MIN, min(I32_MAX, v))


def srdhm_ref(a, b):
    if a == b == I32_MIN:
        return I32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    s = ab + nudge
    q = abs(s) // (1 << 31)  # C++ division truncates toward zero
    return q if s >= 0 else -q


def rdbpot_ref(x, e):
    mask = (1 << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


def requant_ref(acc, bias, multiplier, shift, zero_point, clamp_min, clamp_max):
    shift = max(-31, min(31, shift))
    x = sat32(acc + bias)
    x = sat32(x * 2 ** max(shift, 0))
    y = srdhm_ref(x, multiplier)
    y = rdbpot_ref(y, max(-shift, 0))
    return min(max(y + zero_point, clamp_min), clamp_max)


def random_int32(rng, n):
    x = np.concatenate([rng.integers(I32_MIN, I32_MAX, n, endpoint=True),
                        rng.integers(-(1 << 16), 1 << 16, n),
                        [I32_MIN, I32_MAX, I32_MIN + 1, I32_MAX - 1, 0, 1, -1]])
    return rng.permutation(x)[:n].astype(np.int64)


def test_srdhm_matches_scalar_reference(rng):
    a, b = random_int32(rng, 3000), random_int32(rng, 3000)
    # Ties: a = 2^30 makes a*b / 2^31 = b / 2, exactly .5 for odd b of either sign.
    a[:400] = 1 << 30
    b[:400] |= 1
    a[400], b[400] = I32_MIN, I32_MIN
    a[401], b[401] = I32_MIN, I32_MAX
    got = saturating_rounding_doubling_high_mul(a, b)
    assert got.dtype == np.int32
    expect = [srdhm_ref(int(x), int(y)) for x, y in zip(a, b, strict=True)]
    assert got.tolist() == expect
    assert got[400] == I32_MAX


def test_rdbpot_matches_reference_and_rounds_ties_away_from_zero(rng):
    x = random_int32(rng, 2000)
    e = rng.integers(0, 32, 2000)
    got = rounding_divide_by_pot(x, e)
    assert got.tolist() == [rdbpot_ref(int(v), int(s)) for v, s in zip(x, e, strict=True)]
    # Exact ties: x = +-(2m + 1) * 2^(e-1) is +-(m + 0.5) * 2^e -> +-(m + 1).
    for e in range(1, 32):
        m = rng.integers(0, max(1, (1 << (31 - e)) - 1), 50)
        tie = (2 * m + 1) << (e - 1)
        assert rounding_divide_by_pot(tie, e).tolist() == (m + 1).tolist()
        assert rounding_divide_by_pot(-tie, e).tolist() == (-(m + 1)).tolist()
    with pytest.raises(FieldError, match="e=32"):
        rounding_divide_by_pot(5, 32)
    with pytest.raises(FieldError, match="x=2147483648"):
        rounding_divide_by_pot(2 ** 31, 0)


def check_requant(acc, p):
    got = requantize(acc, p["bias"], p["multiplier"], p["shift"], p["zero_point"],
                     p["clamp_min"], p["clamp_max"])
    assert got.dtype == np.int8 and got.shape == acc.shape
    flat = np.broadcast_arrays(acc, *(p[n] for n in p.dtype.names))
    expect = [requant_ref(*(int(f.flat[i]) for f in flat)) for i in range(acc.size)]
    assert got.ravel().tolist() == expect


def test_requantize_matches_scalar_reference(rng):
    acc = random_int32(rng, 96 * 16).reshape(96, 16).astype(np.int32)
    check_requant(acc, random_channel_params(rng, (16,)))  # per channel along the last axis


def test_requantize_every_shift_and_ties(rng):
    shifts = np.arange(-128, 128)  # every int8 shift: in range and clamped
    acc = random_int32(rng, 8 * len(shifts)).reshape(8, -1).astype(np.int32)
    p = random_channel_params(rng, (len(shifts),))
    p["shift"] = shifts
    check_requant(acc, p)
    # Ties of the final rounding: multiplier 2^30 (x 0.5) and shift -e give acc / 2^(e+1).
    p = np.zeros(31, p.dtype)
    p["multiplier"], p["shift"] = 1 << 30, -np.arange(31)
    p["clamp_min"], p["clamp_max"] = -128, 127
    odd = (2 * rng.integers(0, 100, (6, 31)) + 1) << np.arange(31)
    acc = np.concatenate([odd, -odd]).clip(I32_MIN, I32_MAX).astype(np.int32)
    check_requant(acc, p)


def test_requantize_saturations():
    acc = np.array([I32_MIN, I32_MAX, I32_MIN, 5, -5, 100, 100], np.int32)
    p = {"bias": [-1, 1, 0, 0, 0, 0, 0], "multiplier": [I32_MAX, I32_MAX, I32_MIN, 1 << 30,
                                                        1 << 30, 1 << 30, 1 << 30],
         "shift": [0, 0, 0, 31, 31, 0, 0], "zero_point": [0, 0, 0, 0, 0, 100, -100],
         "clamp_min": [-128] * 6 + [10], "clamp_max": [127] * 6 + [-10]}
    got = requantize(acc, *p.values()).tolist()
    assert got == [-128, 127, 127, 127, -128, 127, -10]
    flat = [requant_ref(int(acc[i]), *(v[i] for v in p.values())) for i in range(len(acc))]
    assert got == flat


def test_requantize_checks_arguments():
    with pytest.raises(DTypeError, match="int64"):
        requantize(np.zeros(2, np.int64), 0, 0, 0, 0, -128, 127)
    with pytest.raises(FieldError, match="shift=128"):
        requantize(np.zeros(2, np.int32), 0, 0, 128, 0, -128, 127)
    with pytest.raises(FieldError, match="zero_point=-129"):
        requantize(np.zeros(2, np.int32), 0, 0, 0, -129, -128, 127)


# -- PASS patch-skip (section 7) ---------------------------------------------------------------

def block_gemm(tiles, w):
    """Per block b: A_b = tiles[b].T (rows, k) times w (k, cols), in int64."""
    return np.einsum("bkr,kc->brc", tiles.astype(np.int64), w.astype(np.int64))


def test_patch_skip_threshold_zero_is_dense(rng):
    blocks, k, rows, cols = 6, 9, 4, 5
    w = int8(rng, (k, cols))
    ref = int8(rng, (blocks, k, rows))
    new = ref.copy()
    new[::2] = int8(rng, (3, k, rows))
    new[1, 3, 2] = ref[1, 3, 2] ^ 1  # one element differs by the smallest amount
    changed, new_ref = patch_skip(new, ref, 0)
    assert changed.tolist() == [True, True, True, False, True, False]
    assert np.array_equal(new_ref, new)
    assert np.array_equal(block_gemm(new_ref, w), block_gemm(new, w))


def test_patch_skip_error_bound_holds_on_a_video_without_drift(rng):
    blocks, k, rows, cols, frames = 12, 8, 4, 6, 60
    threshold = 6
    w = int8(rng, (k, cols))
    bound = threshold * np.abs(w.astype(np.int64)).sum(axis=0)  # per output column
    frame = int8(rng, (blocks, k, rows), 0.0).astype(np.int64).clip(-100, 100)
    ref = frame.astype(np.int8)
    acc = block_gemm(ref, w)
    speed = rng.integers(0, 3, blocks)  # per-block drift: static, slow and faster tiles
    worst, skipped = [], 0
    for _ in range(frames):
        step = rng.integers(-1, 2, frame.shape) * speed[:, None, None]
        frame = np.clip(frame + step, -128, 127)
        new = frame.astype(np.int8)
        changed, ref = patch_skip(new, ref, threshold)
        acc[changed] = block_gemm(ref[changed], w)
        skipped += int((~changed).sum())
        # Every reference element stays within the threshold of the current input ...
        assert np.abs(ref.astype(np.int64) - new).max() <= threshold
        # ... ACC is exactly the GEMM of the current references ...
        assert np.array_equal(acc, block_gemm(ref, w))
        # ... so the error against dense compute is bounded per column, every frame.
        err = np.abs(acc - block_gemm(new, w))
        assert (err <= bound).all()
        worst.append(int(err.max()))
    assert skipped > 0 and max(worst) > 0, "the video must exercise skipping"
    assert max(worst[frames // 2:]) <= bound.max()  # late frames: same bound, no drift


def test_patch_skip_checks_arguments():
    a = np.zeros((1, 2, 2), np.int8)
    with pytest.raises(DTypeError, match="int16"):
        patch_skip(a.astype(np.int16), a, 0)
    with pytest.raises(ShapeError):
        patch_skip(a, a[:, :1], 0)


# -- SGQ (section 8) ---------------------------------------------------------------------------

#: The section-8 wire format, restated: a 3-bit mode per stripe (codes 1..4: 1-, 2-, 4- and
#: 8-bit codes; 5..7 reserved), an 8-bit offset and a 3-bit shift per coded stripe.
MODE_FIELD_BITS = 3
WIDTHS = (1, 2, 4, 8)


def sgq_plan(values, stripe_len, max_shift):
    """The test's own stripe analysis: (base, [(mode bits or 0, lo, shift)]) and total bits."""
    flat = [[int(v) for v in values[i:i + stripe_len].ravel()]
            for i in range(0, len(values), stripe_len)]
    base = min(min(s) for s in flat)
    plan, bits = [], 8
    for s in flat:
        lo, hi = min(s), max(s)
        if hi == base:
            plan.append((0, lo, 0))
            bits += MODE_FIELD_BITS
            continue
        for b in WIDTHS:
            shift = next((t for t in range(8) if (hi - lo + ((1 << t) >> 1)) >> t <= 2 ** b - 1),
                         8)  # 8: no 3-bit shift fits
            if shift <= max_shift:
                break
        plan.append((b, lo, shift))
        bits += MODE_FIELD_BITS + 8 + 3 + len(s) * b
    return base, plan, bits


def read_sgq(payload, count, cols, stripe_len):
    """An independent bit reader for the wire format (LSB first, bytes from bit 0)."""
    stream, pos = int.from_bytes(payload, "little"), 0

    def take(n):
        nonlocal pos
        v = (stream >> pos) & ((1 << n) - 1)
        pos += n
        return v

    base = take(8)
    base -= 256 * (base >= 128)
    width = dict(enumerate(WIDTHS, start=1))
    out, modes = [], []
    for _ in range(count // stripe_len):
        mode = take(MODE_FIELD_BITS)
        modes.append(mode)
        if mode == 0:
            out += [base] * (stripe_len * cols)
            continue
        offset, shift = take(8), take(3)
        out += [max(-128, min(127, base + offset + (take(width[mode]) << shift)))
                for _ in range(stripe_len * cols)]
    assert -(-pos // 8) == len(payload)
    return np.array(out).reshape(count, cols), modes


def test_sgq_modes_are_the_contract():
    # the numbering the tests above restate: BASE 0, then the widths in increasing order
    assert SgqMode.as_shape().width == MODE_FIELD_BITS
    assert {m.value: SGQ_MODE_BITS.get(m, 0) for m in SgqMode} == {0: 0, 1: 1, 2: 2, 3: 4, 4: 8}


@pytest.mark.parametrize("values,stripe_len,max_shift,payload,decoded", [
    # base 0; stripe 0 all base (mode 000); stripe 1 = [3]: span 0, 1-bit mode 001, offset 3,
    # shift 0, q 0: bits 8-10 000, 11-13 100, 14-21 offset 11000000, 22-24 shift 000, 25 q 0
    ([[0], [3]], 1, 0, [0x00, 0xC8, 0x00, 0x00], [[0], [3]]),
    # base -5 (0xFB); stripe 0 BASE; stripe 1 = [10, 11]: span 1 -> 1-bit codes at shift 0,
    # offset 15, codes 0, 1 at bits 25, 26
    ([[-5, -5], [10, 11]], 1, 0, [0xFB, 0xC8, 0x03, 0x04], [[-5, -5], [10, 11]]),
    # one stripe [0, 3], max_shift 2: 1-bit codes fit at s = 2 ((3 + 2) >> 2 = 1), narrower
    # than 2-bit codes at s = 0; bits 8-10 mode 100, 11-18 offset 0, 19-21 shift 010, codes
    # (0 + 2) >> 2 = 0 and (3 + 2) >> 2 = 1 at bits 22, 23; decodes to 0 and 0 + 1 * 4
    ([[0, 3]], 1, 2, [0x00, 0x01, 0x90], [[0, 4]]),
    # the same with max_shift 1: 1-bit codes need s = 2 > 1, so 2-bit codes (mode 010) at s = 0,
    # codes 0 and 3 at bits 22-25
    ([[0, 3]], 1, 1, [0x00, 0x02, 0x00, 0x03], [[0, 3]]),
])
def test_sgq_hand_encoded_bits(values, stripe_len, max_shift, payload, decoded):
    values = np.array(values, np.int8)
    assert sgq_encode(values, stripe_len, max_shift) == bytes(payload)
    assert sgq_payload_bytes(values, stripe_len, max_shift) == len(payload)
    count, cols = values.shape
    assert decode_payload(bytes(payload), count, cols, stripe_len).tolist() == decoded


@pytest.mark.parametrize("max_shift", range(8))
def test_sgq_round_trip_and_size(rng, max_shift):
    seen = set()
    for i in range(8):
        cols, stripe_len = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        count = stripe_len * int(rng.integers(2, 9))
        values = int8(rng, (count, cols), 0.2)
        kind = i % 4
        if kind == 0:  # narrow ranges: the 2- and 4-bit modes
            values = (values // 40).astype(np.int8)
        elif kind == 1:  # two neighbouring levels: the 1-bit mode (and BASE)
            values = (values > 0).astype(np.int8) + np.int8(rng.integers(-128, 127))
            values[0, 0], values[-1, -1] = values.min(), values.min() + 1
        elif kind == 2:  # ReLU-like: many all-base stripes
            values[rng.random(count) < 0.6] = values.min()
        payload = sgq_encode(values, stripe_len, max_shift)
        decoded = decode_payload(payload, count, cols, stripe_len)
        err = np.abs(decoded.astype(int) - values)
        assert err.max() <= ((1 << max_shift) >> 1)  # half a step; exact for max_shift 0
        base, plan, bits = sgq_plan(values, stripe_len, max_shift)
        assert len(payload) == -(-bits // 8) == sgq_payload_bytes(values, stripe_len, max_shift)
        independent, modes = read_sgq(payload, count, cols, stripe_len)
        assert np.array_equal(independent, decoded)
        width = dict(enumerate(WIDTHS, start=1)) | {0: 0}
        assert [width[m] for m in modes] == [b for b, _, _ in plan]  # narrowest width chosen
        seen |= {b for b, _, _ in plan}
    print(f"max_shift={max_shift}: widths seen {sorted(seen)}")
    assert 1 in seen  # the 1-bit mode is exercised at every max_shift


def test_sgq_base_stripes_cost_their_mode_field(rng):
    stripe_len, cols, stripes = 3, 4, 9
    values = np.full((stripe_len * stripes, cols), -7, np.int8)
    assert len(sgq_encode(values, stripe_len, 0)) == -(-(8 + MODE_FIELD_BITS * stripes) // 8)
    values[stripe_len:2 * stripe_len] = int8(rng, (stripe_len, cols)).clip(-6, 127)
    _, plan, _ = sgq_plan(values, stripe_len, 0)
    b = plan[1][0]
    bits = 8 + MODE_FIELD_BITS * stripes + 8 + 3 + stripe_len * cols * b
    assert len(sgq_encode(values, stripe_len, 0)) == -(-bits // 8)


def test_sgq_errors():
    v = np.zeros((4, 2), np.int8)
    with pytest.raises(FieldError, match="stripe_len=0"):
        sgq_encode(v, 0, 0)
    with pytest.raises(ShapeError, match="count=4.*stripe_len=3"):
        sgq_encode(v, 3, 0)
    with pytest.raises(FieldError, match="max_shift=8"):
        sgq_encode(v, 1, 8)
    with pytest.raises(DTypeError):
        sgq_encode(v.astype(np.int32), 1, 0)
    payload = sgq_encode(np.arange(8, dtype=np.int8).reshape(4, 2), 1, 0)
    with pytest.raises(ProtocolError):
        decode_payload(payload[:-1], 4, 2, 1)
    with pytest.raises(ProtocolError):
        decode_payload(payload + b"\x00", 4, 2, 1)
    assert sgq_encode(np.zeros((0, 2), np.int8), 1, 0) == b""
    assert decode_payload(b"", 0, 2, 1).shape == (0, 2)


@pytest.mark.parametrize("reserved", [5, 6, 7])
def test_sgq_decode_rejects_reserved_modes(reserved):
    # [[0], [3]]: stripe 0 BASE at bits 8-10, stripe 1's mode field at bits 11-13 (see above)
    payload = int.from_bytes(bytes([0x00, 0xC8, 0x00, 0x00]), "little")
    bad = (payload & ~(0b111 << 11) | reserved << 11).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match=rf"stripe 1 .*mode field {reserved} is reserved"):
        decode_payload(bad, 2, 1, 1)
    # and in stripe 0 (bits 8-10), before any payload length is known
    bad = (payload | reserved << 8).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match=rf"stripe 0 .*mode field {reserved} is reserved"):
        decode_payload(bad, 2, 1, 1)


# -- SGQ response integrity (the CRC-32 trailer, section 8) -----------------------------------

def _frame(rng, config):
    values = int8(rng, (12, config.cols), 0.2)
    values[:4] = values.min()  # some BASE stripes
    payload = sgq_encode(values, 2, 2)
    return payload, sgq_frame(config, payload)


@pytest.mark.parametrize("name", ["ice40", "ecp5"])
def test_sgq_frame_crc_detects_a_flipped_payload_bit(rng, name):
    config = PRESETS[name]
    payload, frame = _frame(rng, config)
    assert sgq_unframe(config, frame, 3) == payload
    for bit in range(8 * len(payload)):  # every payload bit in turn
        bad = bytearray(frame)
        bad[4 + bit // 8] ^= 1 << bit % 8
        with pytest.raises(IntegrityError) as err:
            sgq_unframe(config, bytes(bad), 3)
    # the message names the instruction, the expected and the received CRC
    body = len(frame) - -(-4 // config.beat_bytes) * config.beat_bytes
    received = int.from_bytes(frame[body:body + 4], "little")
    expected = zlib.crc32(bytes(bad[:body]))  # the standard CRC-32 of the corrupted bytes
    assert expected != received
    assert re.search(rf"instruction 3.*expected 0x{expected:08x}.*received 0x{received:08x}",
                     str(err.value)), str(err.value)


@pytest.mark.parametrize("name", ["ice40", "ecp5"])
def test_sgq_frame_errors_and_truncation(rng, name):
    config = PRESETS[name]
    payload, frame = _frame(rng, config)
    # any single flipped bit anywhere (length, payload, padding, CRC) is caught
    for bit in range(8 * len(frame)):
        bad = bytearray(frame)
        bad[bit // 8] ^= 1 << bit % 8
        with pytest.raises(ProtocolError):
            sgq_unframe(config, bytes(bad))
    # a truncated trailer (or frame) is caught by the length check, not mistaken for corruption
    for cut in range(1, 4 + config.beat_bytes + 1):
        with pytest.raises(ProtocolError, match="length header") as err:
            sgq_unframe(config, frame[:-cut])
        assert type(err.value) is ProtocolError
    # a non-zero padding byte after the CRC is not part of the CRC: checked on its own
    if config.beat_bytes > 4:
        bad = bytearray(frame)
        bad[-1] = 0x80
        with pytest.raises(IntegrityError, match="padding byte"):
            sgq_unframe(config, bytes(bad))
    # an empty group still has its CRC trailer
    empty = sgq_frame(config, b"")
    assert sgq_unframe(config, empty) == b"" and any(empty)


def _crc_detects(frame: bytes, body: int, flips) -> bool:
    bad = bytearray(frame)
    for bit in flips:
        bad[bit // 8] ^= 1 << bit % 8
    return zlib.crc32(bytes(bad[:body])) != int.from_bytes(bad[body:body + 4], "little")


def test_sgq_crc_detection_claims(rng):
    """What docs/architecture.md section 8 says the CRC detects: every burst of up to 32 bits
    (tried at random places and patterns), every 2-bit error in the largest SGQ response of any
    preset (x^d != 1 modulo the generator for every distance d it spans); and what it does not
    claim: an odd number of bit errors in the generator's own pattern passes."""
    config = PRESETS["ice40"]
    _, frame = _frame(rng, config)
    body = len(frame) - -(-4 // config.beat_bytes) * config.beat_bytes
    n = 8 * (body + 4)
    for _ in range(2000):
        length = int(rng.integers(1, 33))
        start = int(rng.integers(0, n - length + 1))
        inner = [start + i for i in range(1, length - 1) if rng.random() < 0.5]
        flips = sorted({start, start + length - 1, *inner})
        assert _crc_detects(frame, body, flips), flips
    # 2-bit errors: x^i + x^j = x^i (x^(j-i) + 1) is a multiple of G iff x^(j-i) = 1 mod G
    poly = CRC.polynomial  # G without its x^32 term, MSB first
    largest = max(sgq_response_length(c, _largest_payload(c)) for c in PRESETS.values())
    r = 1  # x^d mod G
    for d in range(1, 8 * largest):
        r <<= 1
        if r >> 32:
            r = (r ^ poly) & 0xFFFFFFFF
        assert r != 1, f"x^{d} = 1 mod G: a 2-bit error {d} bits apart would pass"
    # G has 15 terms (an odd weight): the error pattern G itself passes unnoticed
    terms = [i for i in range(32) if poly >> i & 1] + [32]
    assert len(terms) % 2 == 1
    # reflected wire order: the coefficient of x^k sits at bit position (32 - k) from the start
    pattern = [8 * 8 + (32 - k) for k in terms]
    assert not _crc_detects(frame, body, pattern)


def _largest_payload(config):
    depth, cols = config.depth(Buffer.OUT), config.cols
    return -(-(8 + depth * (MODE_FIELD_BITS + 11 + cols * 8)) // 8)
