"""IM2COL and REQUANT's out_gap in the golden model (section 5), against independent oracles.

The oracle of IM2COL is torch's ``F.unfold`` over a tensor placed in OUT element by element from
the layout written in :class:`~tinyaccel.hw.isa.Im2colOperands`; the decode rules are checked at
their boundaries against the arithmetic of their docstrings.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from tinyaccel.errors import AddressError, FieldError, ShapeError
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import Buffer, Instruction, Opcode, Status
from tinyaccel.protocol import PARAM_DTYPE, Program
from tinyaccel.sim.golden import GoldenMachine, check_instruction
from tinyaccel.sim.numerics import requantize
from tinyaccel.sim.randprog import random_channel_params, seed_from_env


@pytest.fixture
def rng():
    return np.random.default_rng(seed_from_env())


def place(machine, x, src, pitch, pack):
    """Write ``x`` (H, W, C) int8 into OUT with the IM2COL layout, one element at a time."""
    cols = machine.config.cols
    h, w, c = x.shape
    for q in range(h * w):
        for ch in range(c):
            word = src + (q >> pack) * pitch + ch // cols
            lane = (q % (1 << pack)) * (cols >> pack) + ch % cols
            machine.out[word, lane] = x[q // w, q % w, ch]


def unfold_rows(x, kh, kw, stride, dilation, pads, pad_value):
    """im2col rows (output pixel, (ky, kx, c)) by torch, padding with ``pad_value``."""
    t = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    top, left, bottom, right = pads
    t = F.pad(t, (left, right, top, bottom), value=float(pad_value))
    cols = F.unfold(t, (kh, kw), dilation=dilation, stride=stride)[0]
    c = x.shape[2]
    return cols.reshape(c, kh, kw, -1).permute(3, 1, 2, 0).reshape(-1, kh * kw * c).numpy()


def random_geometry(rng, cfg):
    while True:
        c = int(rng.integers(1, 3 * cfg.cols + 1))
        h, w = (int(v) for v in rng.integers(1, 11, 2))
        kh, kw = (int(v) for v in rng.integers(1, 5, 2))
        stride, dilation = (int(v) for v in rng.integers(1, 4, 2))
        pads = tuple(int(v) for v in rng.integers(0, 4, 4))
        oh = (h + pads[0] + pads[2] - dilation * (kh - 1) - 1) // stride + 1
        ow = (w + pads[1] + pads[3] - dilation * (kw - 1) - 1) // stride + 1
        if oh < 1 or ow < 1:
            continue
        pack = 0
        if c <= cfg.cols // 2 and rng.random() < 0.5:
            pack = int(rng.integers(1, int(np.log2(cfg.cols // c)) + 1))
        pitch = 1 if pack else -(-c // cfg.cols) + int(rng.integers(0, 2))
        return c, h, w, kh, kw, stride, dilation, pads, oh, ow, pack, pitch


@pytest.mark.parametrize("name", ["sim", "ecp5", "ice40"])
def test_im2col_equals_unfold(name, rng):
    machine = GoldenMachine(name)
    cfg = machine.config
    done = 0
    while done < 25:
        c, h, w, kh, kw, stride, dilation, pads, oh, ow, pack, pitch = random_geometry(rng, cfg)
        span = -(-h * w >> pack) * pitch
        src = int(rng.integers(0, 20))
        # a tile of whole output rows starting at row oy0, as a compiler tiles a layer
        oy0 = int(rng.integers(0, oh))
        m_blocks = -(-(oh - oy0) * ow // cfg.rows)
        k = kh * kw * c
        if src + span > cfg.out_depth or m_blocks * k > cfg.inp_depth:
            continue
        x = rng.integers(-128, 128, (h, w, c)).astype(np.int8)
        pad_value = int(rng.integers(-128, 128))
        machine.out[:] = rng.integers(-128, 128, machine.out.shape)  # garbage around the tensor
        place(machine, x, src, pitch, pack)
        prog = Program(cfg).im2col(
            src, 0, channels=c, in_h=h, in_w=w, kh=kh, kw=kw, out_w=ow, m_blocks=m_blocks,
            oy0=oy0, pitch=pitch, stride=stride, dilation=dilation, pad_top=pads[0],
            pad_left=pads[1], pad_value=pad_value, pack=pack)
        machine.run(prog.to_bytes(), strict=True)
        got = machine.inp[:m_blocks * k].reshape(m_blocks, k, cfg.rows).transpose(0, 2, 1)
        got = got.reshape(-1, k)
        want = unfold_rows(x, kh, kw, stride, dilation, pads, pad_value)[oy0 * ow:]
        np.testing.assert_array_equal(got[:len(want)], want)
        done += 1


@pytest.mark.parametrize("name", ["ecp5", "ice40"])
def test_im2col_pool_equals_max_pool2d(name, rng):
    """``pool``: the max over each window of every channel, padding -128 (never wins), against
    torch's ``max_pool2d`` (which pads with -inf) on the codes."""
    machine = GoldenMachine(name)
    cfg = machine.config
    done = 0
    while done < 20:
        c = int(rng.integers(1, 2 * cfg.cols + 1))
        h, w = (int(v) for v in rng.integers(2, 11, 2))
        k, stride, dilation = int(rng.integers(1, 4)), int(rng.integers(1, 4)), 1
        if rng.random() < 0.3:
            dilation = 2
        pad = int(rng.integers(0, k // 2 + 1))
        oh = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
        ow = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
        pitch = -(-c // cfg.cols)
        m_blocks = -(-oh * ow // cfg.rows)
        if oh < 1 or ow < 1 or h * w * pitch > cfg.out_depth or m_blocks * c > cfg.inp_depth:
            continue
        x = rng.integers(-128, 128, (h, w, c)).astype(np.int8)
        machine.out[:] = rng.integers(-128, 128, machine.out.shape)
        place(machine, x, 0, pitch, 0)
        prog = Program(cfg).im2col(
            0, 0, channels=c, in_h=h, in_w=w, kh=k, kw=k, out_w=ow, m_blocks=m_blocks,
            pitch=pitch, stride=stride, dilation=dilation, pad_top=pad, pad_left=pad,
            pad_value=-128, pool=True)
        machine.run(prog.to_bytes(), strict=True)
        got = machine.inp[:m_blocks * c].reshape(m_blocks, c, cfg.rows).transpose(0, 2, 1)
        t = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
        want = F.max_pool2d(t, k, stride, pad, dilation)[0].permute(1, 2, 0).reshape(-1, c)
        np.testing.assert_array_equal(got.reshape(-1, c)[:oh * ow], want.numpy())
        done += 1


def test_im2col_depthwise_reads_one_channel_word(rng):
    """Reading channel word j of a wider pixel (``src + j``, ``channels = cols``): the input of
    the j-th group block of a depthwise convolution."""
    machine = GoldenMachine("ecp5")
    cols = machine.config.cols
    x = rng.integers(-128, 128, (5, 6, 3 * cols)).astype(np.int8)
    place(machine, x, 7, 3, 0)
    j = 2
    prog = Program(machine.config).im2col(
        7 + j, 100, channels=cols, in_h=5, in_w=6, kh=3, kw=3, out_w=6, m_blocks=4, pitch=3,
        pad_top=1, pad_left=1, pad_value=-5)
    machine.run(prog.to_bytes(), strict=True)
    k = 9 * cols
    got = machine.inp[100:100 + 4 * k].reshape(4, k, 8).transpose(0, 2, 1).reshape(-1, k)
    want = unfold_rows(x[:, :, j * cols:(j + 1) * cols], 3, 3, 1, 1, (1, 1, 1, 1), -5)
    np.testing.assert_array_equal(got[:30], want)


def test_requant_out_gap_places_rows_a_pixel_apart(rng):
    cfg = PRESETS["sim"]
    machine = GoldenMachine(cfg)
    acc = rng.integers(-2 ** 20, 2 ** 20, (9, cfg.cols)).astype(np.int32)
    params = random_channel_params(rng, cfg.cols)
    before = rng.integers(-128, 128, (40, cfg.cols)).astype(np.int8)
    machine.load_buffer(Buffer.ACC, 3, acc)
    machine.load_buffer(Buffer.PARAM, 1, params[None])
    machine.load_buffer(Buffer.OUT, 0, before)
    machine.run(Program(cfg).requant(3, 5, 1, 9, out_gap=3).to_bytes(), strict=True)
    want = before.copy()
    want[5 + 4 * np.arange(9)] = requantize(acc, **{f: params[f] for f in PARAM_DTYPE.names})
    np.testing.assert_array_equal(machine.out[:40], want)


# -- decode rules at their boundaries -------------------------------------------------------

def im2col_word(**fields):
    base = dict(src=0, dst=0, pitch=1, channels=1, in_h=1, in_w=1, kh=1, kw=1, stride=1,
                dilation=1, out_w=1, m_blocks=1)
    return Instruction(Opcode.IM2COL, **{**base, **fields})


@pytest.mark.parametrize("name", ["ecp5", "ice40"])
def test_im2col_rules_at_the_boundaries(name):
    cfg = PRESETS[name]
    ok = dict(channels=cfg.cols + 1, pitch=2, in_h=3, in_w=5)
    assert check_instruction(cfg, im2col_word(**ok)) is None
    for field in ("in_h", "in_w", "channels", "kh", "kw", "out_w"):
        fault = check_instruction(cfg, im2col_word(**{**ok, field: 0}))
        assert (fault.status, fault.field) == (Status.BAD_SHAPE, field)
    for field in ("stride", "dilation", "pitch"):
        fault = check_instruction(cfg, im2col_word(**{**ok, field: 0}))
        assert (fault.status, fault.field) == (Status.BAD_FIELD, field)
    # a pixel of pitch words holds pitch*cols channels; 2**pack pixels share cols lanes
    assert check_instruction(cfg, im2col_word(channels=2 * cfg.cols, pitch=2)) is None
    fault = check_instruction(cfg, im2col_word(channels=2 * cfg.cols + 1, pitch=2))
    assert (fault.status, fault.field) == (Status.BAD_FIELD, "channels")
    assert check_instruction(cfg, im2col_word(channels=cfg.cols // 2, pack=1)) is None
    fault = check_instruction(cfg, im2col_word(channels=cfg.cols // 2 + 1, pack=1))
    assert (fault.status, fault.field) == (Status.BAD_FIELD, "channels")
    # dst + m_blocks*kh*kw*channels <= INP depth
    k = 3 * 2 * 5
    m = cfg.inp_depth // k
    edge = dict(kh=3, kw=2, channels=5, pitch=2, m_blocks=m)
    assert check_instruction(cfg, im2col_word(dst=cfg.inp_depth - m * k, **edge)) is None
    fault = check_instruction(cfg, im2col_word(dst=cfg.inp_depth - m * k + 1, **edge))
    assert (fault.status, fault.field) == (Status.ADDR_RANGE, "dst")
    # with pool: dst + m_blocks*channels <= INP depth (the window taps are reduced)
    c = 7
    m = min(255, cfg.inp_depth // c)
    edge = dict(kh=3, kw=2, channels=c, pitch=2, m_blocks=m, pool=1)
    dst = cfg.inp_depth - m * c
    assert check_instruction(cfg, im2col_word(dst=dst, **edge)) is None
    assert check_instruction(cfg, im2col_word(dst=dst, **{**edge, "pool": 0})) is not None
    fault = check_instruction(cfg, im2col_word(dst=dst + 1, **edge))
    assert (fault.status, fault.field) == (Status.ADDR_RANGE, "dst")
    # src + ceil(in_h*in_w / 2**pack)*pitch <= OUT depth (7*5 = 35 pixels, 4 per word: 9 words)
    tensor = dict(in_h=7, in_w=5, pack=2, channels=1, pitch=3)
    assert check_instruction(cfg, im2col_word(src=cfg.out_depth - 27, **tensor)) is None
    fault = check_instruction(cfg, im2col_word(src=cfg.out_depth - 26, **tensor))
    assert (fault.status, fault.field) == (Status.ADDR_RANGE, "src")
    with pytest.raises(AddressError, match="input tensor src"):
        GoldenMachine(cfg).execute(im2col_word(src=cfg.out_depth - 26, **tensor))
    with pytest.raises(ShapeError, match="kh=0"):
        GoldenMachine(cfg).execute(im2col_word(kh=0))
    with pytest.raises(FieldError, match="channels=3 do not fit"):
        GoldenMachine(cfg).execute(im2col_word(channels=3, pack=len(bin(cfg.cols)) - 4))


def test_requant_strided_range_rule():
    cfg = PRESETS["ecp5"]
    depth = cfg.out_depth

    def word(out_addr, count, out_gap):
        return Instruction(Opcode.REQUANT, out_addr=out_addr, count=count, out_gap=out_gap)

    # 5 rows 4 apart span 17 words
    assert check_instruction(cfg, word(depth - 17, 5, 3)) is None
    fault = check_instruction(cfg, word(depth - 16, 5, 3))
    assert (fault.status, fault.field) == (Status.ADDR_RANGE, "out_addr")
    assert check_instruction(cfg, word(depth, 0, 63)) is None  # no rows: nothing written
    fault = check_instruction(cfg, word(depth, 1, 0))
    assert (fault.status, fault.field) == (Status.ADDR_RANGE, "out_addr")
