"""The IM2COL unit (hw/im2col.py), both designs, against ``sim.numerics.window_gather``; and the
whole accelerator running IM2COL programs and a resident inference against the golden model."""

from dataclasses import replace

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import COMPACT, FULL, check_against_golden, small_config

from tinyaccel.hw.decode_rules import gate_span
from tinyaccel.hw.im2col import Im2colSerial, Im2colTiled
from tinyaccel.hw.isa import Buffer, Counter, Im2colOperands, Instruction, Opcode, Status
from tinyaccel.hw.scratchpads import geometry
from tinyaccel.protocol import Program, pack_words, unpack_words
from tinyaccel.sim.golden import check_instruction
from tinyaccel.sim.numerics import window_gather
from tinyaccel.sim.randprog import (
    random_channel_params,
    random_im2col,
    random_program,
    random_words,
    seed_from_env,
)

DESIGNS = {"tiled": Im2colTiled, "serial": Im2colSerial}
#: Configurations of the unit test: the presets' array shapes (small buffers: faster to fill).
CONFIGS = {
    "ice40": small_config(rows=2, cols=4, inp_depth=256, out_depth=128),
    "ecp5": small_config(rows=8, cols=16, host_width=64, inp_depth=1024, out_depth=256,
                         requant_lanes=2, impl=FULL),
    "rows4": small_config(rows=4, cols=8, host_width=32, inp_depth=256, out_depth=128,
                          requant_lanes=2),
}


def mask_words(config, bits):
    """The physical MASK words (ints) holding the bools ``bits`` (``mask_bit``'s layout: bit
    ``i`` is bit ``i % width`` of word ``i // width``)."""
    width = geometry(config, Buffer.MASK).width
    bits = np.asarray(bits, bool)
    return [sum(int(b) << n for n, b in enumerate(bits[w:w + width]))
            for w in range(0, len(bits), width)]


def unit_config(design, config):
    """``config`` for ``design``: the serial design never has the PASS unit (the compact
    profile's; :class:`~tinyaccel.hw.config.Implementation` keeps it with the tiled one)."""
    if design == "serial" and config.impl.pass_unit:
        return replace(config, impl=replace(config.impl, pass_unit=False))
    return config


def run_unit(design, config, cases, out_words, *, held_cmd=False, mask=None):
    """Run each IM2COL in ``cases`` (operand dicts, ``pad_value`` as a field code) on the unit
    over the OUT contents ``out_words`` (int words) and the MASK bits ``mask`` (bools, default
    all 0): the INP contents after each and its cycles from start to idle. The testbench models
    the scratchpad ports as section 3 defines them: read data a cycle after the enable, held
    while it is low."""
    unit = design(config, held_cmd=held_cmd)
    depth = config.inp_depth
    gated = hasattr(unit, "rd_mask")
    assert gated == config.impl.pass_unit
    masks = mask_words(config, np.zeros(config.mask_bits, bool) if mask is None else mask)
    results = []

    async def bench(ctx):
        for f in cases:
            inp = [None] * depth  # None: never written
            ctx.set(unit.ctrl.cmd, Im2colOperands.const(f))
            ctx.set(unit.ctrl.start, 1)
            await ctx.tick()
            ctx.set(unit.ctrl.start, 0)
            cycles = 0
            data = mdata = 0
            while True:
                en, addr = ctx.get(unit.rd_out.en), ctx.get(unit.rd_out.addr)
                men = ctx.get(unit.rd_mask.en) if gated else 0
                maddr = ctx.get(unit.rd_mask.addr) if gated else 0
                wen = ctx.get(unit.wr_inp.en)
                waddr, wdata = ctx.get(unit.wr_inp.addr), ctx.get(unit.wr_inp.data)
                busy = ctx.get(unit.ctrl.busy)
                if cycles and not busy:
                    assert not en and not wen and not men, "a port used while not busy"
                    break
                if men:
                    assert f.get("gate"), "MASK read without gate"
                    mdata = masks[maddr]
                if wen:
                    assert wen == (1 << len(unit.wr_inp.en)) - 1, "partial INP write"
                    assert inp[waddr] is None, f"INP word {waddr} written twice"
                    inp[waddr] = wdata
                if en:
                    data = out_words[addr]
                await ctx.tick()
                ctx.set(unit.rd_out.data, data)
                if gated:
                    ctx.set(unit.rd_mask.data, mdata)
                cycles += 1
                assert cycles < 200_000, "IM2COL does not finish"
            results.append((inp, cycles))
            if not held_cmd:  # the unit keeps its own copy: the command may change at once
                ctx.set(unit.ctrl.cmd, 0)
            await ctx.tick()

    sim = Simulator(unit)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return results


def expected(config, out, f):
    """INP words (int8 rows) of IM2COL ``f`` by the golden window gather (every block, gated or
    not)."""
    return window_gather(out, config.rows, **f,
                         patch_shape=config.patch_shape if f.get("tiled") else None)


def live_blocks(config, f, mask):
    """Per block of IM2COL ``f``: whether it is computed (the golden gate: MASK bit
    ``mask_word*64 + oy0*out_w/rows + i``; every block without ``gate``)."""
    if not f.get("gate"):
        return np.ones(f["m_blocks"], bool)
    first, n = gate_span(config, Opcode.IM2COL, f)
    mask = np.zeros(config.mask_bits, bool) if mask is None else np.asarray(mask, bool)
    return mask[first:first + n]


def random_cases(config, rng, n):
    cases = []
    while len(cases) < n:
        f = random_im2col(config, rng)
        f["pad_value"] &= 0xFF
        assert check_instruction(config, Instruction(Opcode.IM2COL, **f)) is None
        cases.append(f)
    return cases


def check(config, out, f, inp, cycles, mask=None):
    """INP after IM2COL ``f`` (``inp``: words, None where unwritten) against the golden model:
    exactly the words of the live blocks written, each equal to the window gather's."""
    want = expected(config, out, f)
    k = f["channels"] if f.get("pool") else f["kh"] * f["kw"] * f["channels"]
    n = f["m_blocks"] * k
    live = np.repeat(live_blocks(config, f, mask), k) if n else np.zeros(0, bool)
    written = [a for a, w in enumerate(inp) if w is not None]
    assert written == [f["dst"] + a for a in np.flatnonzero(live)], f"writes outside {f}"
    if written:
        size = config.word_bytes(Buffer.INP)
        got = unpack_words(config, Buffer.INP,
                           b"".join(inp[a].to_bytes(size, "little") for a in written))
        np.testing.assert_array_equal(got, want[live], err_msg=str(f))
    if not n:
        assert cycles <= 2, "m_blocks=0 must not raise busy"


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("design", DESIGNS)
def test_unit_against_window_gather(design, config_name):
    seed = seed_from_env()
    rng = np.random.default_rng(seed)
    config = unit_config(design, CONFIGS[config_name])
    out = random_words(config, Buffer.OUT, config.out_depth, rng)
    out_words = [int.from_bytes(b, "little") for b in _word_bytes(config, out)]
    n = 40 if design == "tiled" else 14
    cases = random_cases(config, rng, n)
    cases.append(dict(cases[0], m_blocks=0))
    # a tall tensor whose rows the walker steps past the last one (iy0 stops beyond it)
    pack = min(3, config.cols.bit_length() - 1)
    cases.append(dict(src=0, dst=0, pitch=1, channels=1, in_h=255, in_w=1, kh=3, kw=1, stride=7,
                      dilation=7, pad_top=3, pad_left=0, pad_value=0x80, oy0=30, out_w=1,
                      m_blocks=-(-12 // config.rows), pack=pack))
    cases.append(dict(cases[-1], stride=1, oy0=240, kh=15, dilation=2, in_w=2, out_w=2, kw=2,
                      m_blocks=2, pad_left=1))
    # and a wide one whose columns it steps past (ix0 stops beyond it)
    cases.append(dict(cases[-2], in_h=1, in_w=255, kh=1, kw=3, oy0=0, out_w=60, pad_left=5,
                      m_blocks=-(-60 // config.rows)))
    for f in cases[-3:]:
        assert check_instruction(config, Instruction(Opcode.IM2COL, **f)) is None, f
    held = design == "serial" and config.impl.held_cmd
    mask = rng.random(config.mask_bits) < 0.5
    for f, (inp, cycles) in zip(cases, run_unit(DESIGNS[design], config, cases, out_words,
                                                 held_cmd=held, mask=mask), strict=True):
        check(config, out, f, inp, cycles, mask)


def _word_bytes(config, words):
    data = pack_words(config, Buffer.OUT, words)
    size = config.word_bytes(Buffer.OUT)
    return [data[i:i + size] for i in range(0, len(data), size)]


def _dense_case(config, channels, kh=3, kw=3, m_blocks=4):
    """A layer-like IM2COL: 3x3 window, stride 1, pad 1, on an 8x8 tensor."""
    pitch = -(-channels // config.cols)
    return dict(src=0, dst=0, pitch=pitch, channels=channels, in_h=8, in_w=8, kh=kh, kw=kw,
                stride=1, dilation=1, pad_top=1, pad_left=1, pad_value=0, oy0=0, out_w=8,
                m_blocks=m_blocks, pack=0)


@pytest.mark.parametrize("design", DESIGNS)
def test_unit_cycles(design):
    """Cycles per INP word on a layer-like window (printed for docs/architecture.md); the
    results equal the window gather too. Tiled: about one INP word a cycle once a pixel's OUT
    word holds at least ``rows`` channels (``cols`` channels here); serial: a handful of cycles
    a value."""
    config = CONFIGS["ecp5"] if design == "tiled" else CONFIGS["ice40"]
    rng = np.random.default_rng(7)
    out = random_words(config, Buffer.OUT, config.out_depth, rng)
    out_words = [int.from_bytes(b, "little") for b in _word_bytes(config, out)]
    cases = [_dense_case(config, config.cols), _dense_case(config, config.cols, m_blocks=1)]
    for f in cases:
        assert check_instruction(config, Instruction(Opcode.IM2COL, **f)) is None
    (inp, cycles), (inp1, cycles1) = run_unit(DESIGNS[design], config, cases, out_words)
    for f, (i, c) in zip(cases, ((inp, cycles), (inp1, cycles1)), strict=True):
        check(config, out, f, i, c)
    words = cases[0]["m_blocks"] * 9 * config.cols
    per_word = (cycles - cycles1) / (words - words // 4)  # (three blocks more)
    print(f"{design}: {cycles} cycles for {words} INP words ({cycles / words:.2f} per word, "
          f"{per_word:.2f} per word after the first block, setup+first block {cycles1})")
    if design == "tiled":
        assert per_word < 1.1
    else:
        assert per_word / config.rows < 20  # cycles per value


def _pool_cases(config, rng, n):
    """``n`` random pooled IM2COLs (as :func:`random_cases` draws them), then the hand-picked
    ones: the compiler's 2x2 stride-2 and padded 3x3 stride-2 max pools (padding -128), a
    padding that wins (+127, and -1 over the negative values), a 1x1 window (a copy), channels in
    two OUT words (``pitch`` 2), packed pixels with dilation."""
    cases = []
    while len(cases) < n:
        f = random_cases(config, rng, 1)[0]
        if f["pool"]:
            cases.append(f)
    cols, rows = config.cols, config.rows
    base = dict(src=0, dst=3, pitch=1, channels=cols, in_h=6, in_w=6, kh=2, kw=2, stride=2,
                dilation=1, pad_top=0, pad_left=0, pad_value=0x80, oy0=0, out_w=3,
                m_blocks=-(-9 // rows), pack=0, pool=1)
    cases += [
        base,
        dict(base, kh=3, kw=3, pad_top=1, pad_left=1),
        dict(base, kh=3, kw=3, pad_top=1, pad_left=1, pad_value=127),
        dict(base, kh=3, kw=2, pad_top=2, pad_left=1, pad_value=0xFF, stride=1, out_w=6,
             m_blocks=-(-12 // rows), oy0=2),
        dict(base, kh=1, kw=1, stride=1, out_w=6, m_blocks=2),
        dict(base, channels=cols + 3, pitch=2, in_h=4, in_w=4, out_w=2, m_blocks=-(-4 // rows)),
        dict(base, channels=1, pack=min(3, cols.bit_length() - 1), dilation=2, stride=1,
             in_h=5, in_w=5, out_w=3, kh=2, kw=3),
    ]
    for f in cases:
        assert check_instruction(config, Instruction(Opcode.IM2COL, **f)) is None, f
    return cases


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("design", DESIGNS)
def test_unit_pool_against_window_gather(design, config_name):
    """``pool``: lane ``r`` of INP word ``dst + i*channels + c`` is the signed maximum of the
    window's ``kh*kw`` taps of channel ``c`` (padding taps read ``pad_value``), both designs,
    against the window gather; only ``m_blocks*channels`` words are written."""
    seed = seed_from_env()
    rng = np.random.default_rng(seed)
    config = unit_config(design, CONFIGS[config_name])
    out = random_words(config, Buffer.OUT, config.out_depth, rng)
    out_words = [int.from_bytes(b, "little") for b in _word_bytes(config, out)]
    cases = _pool_cases(config, rng, 20 if design == "tiled" else 6)
    held = design == "serial" and config.impl.held_cmd
    for f, (inp, cycles) in zip(cases, run_unit(DESIGNS[design], config, cases, out_words,
                                                 held_cmd=held), strict=True):
        check(config, out, f, inp, cycles)


@pytest.mark.parametrize("design", DESIGNS)
def test_unit_pool_cycles(design):
    """Cycles of a pooled window (printed for docs/architecture.md): tiled ``kh*kw*rows`` read
    cycles a tile (one OUT word of channels for a block), its drain overlapping the next tile;
    serial ``kh*kw`` taps of at most 20 cycles a value."""
    config = CONFIGS["ecp5"] if design == "tiled" else CONFIGS["ice40"]
    rng = np.random.default_rng(7)
    out = random_words(config, Buffer.OUT, config.out_depth, rng)
    out_words = [int.from_bytes(b, "little") for b in _word_bytes(config, out)]
    # the compiler's maxpool 2x2 stride 2 and a padded 3x3 stride 2 over 8x8 pixels, cols
    # channels; 4 rows of output pixels
    two = dict(_dense_case(config, config.cols), kh=2, kw=2, stride=2, pad_top=0, pad_left=0,
               pad_value=0x80, out_w=4, m_blocks=16 // config.rows, pool=1)
    three = dict(two, kh=3, kw=3, pad_top=1, pad_left=1)
    cases = [two, three]
    results = run_unit(DESIGNS[design], config, cases, out_words)
    for f, (inp, cycles) in zip(cases, results, strict=True):
        check(config, out, f, inp, cycles)
        taps = f["kh"] * f["kw"]
        words = f["m_blocks"] * f["channels"]
        print(f"{design} pool {f['kh']}x{f['kw']}: {cycles} cycles for {words} INP words "
              f"({cycles / words:.2f} per word, {cycles / (words * config.rows * taps):.2f} per "
              f"tap value)")
        if design == "tiled":  # one OUT word of channels: a tile per block
            assert cycles <= f["m_blocks"] * taps * config.rows + config.cols + 12
        else:
            assert cycles <= words * config.rows * taps * 20 + f["oy0"] + 4


# -- the whole accelerator ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [FULL, COMPACT], ids=["full", "compact"])
def test_top_random_im2col_programs(impl):
    """Random programs of IM2COL (legal and faulting), strided REQUANT, GEMM, LOAD, STORE on the
    whole accelerator (Amaranth simulation) equal the golden model byte for byte."""
    seed = seed_from_env()
    rng = np.random.default_rng(seed)
    cfg = small_config(impl=impl)
    ops = [Opcode.IM2COL, Opcode.IM2COL, Opcode.GEMM, Opcode.REQUANT, Opcode.STORE, Opcode.LOAD,
           Opcode.SGQ, Opcode.PATCH, Opcode.SYNC]
    for _ in range(2):
        program = random_program(cfg, rng, n_instr=20, opcodes=ops, illegal_rate=0.1, window=16,
                                 max_k=8)
        assert any(i.opcode == Opcode.IM2COL for i, _ in program)
        check_against_golden(cfg, program, seed=seed, gaps=0.3, backpressure=0.4)


@pytest.mark.parametrize("impl", [FULL, COMPACT], ids=["full", "compact"])
def test_top_conv_layer(impl):
    """A convolution as the resident model runs it: LOAD an activation tensor into OUT, IM2COL
    into INP, GEMM reading those words at once (a RAW hazard on INP), REQUANT back into OUT with
    ``out_gap`` (pixels of two words), a second IM2COL over that tensor with ``pitch`` 2, STORE."""
    seed = seed_from_env()
    rng = np.random.default_rng(seed)
    cfg = small_config(impl=impl, inp_depth=512, wgt_depth=64, acc_depth=16, out_depth=32)
    rows, cols = cfg.rows, cfg.cols
    h = w = 4
    p = Program(cfg)
    p.load(Buffer.OUT, 0, rng.integers(-128, 128, (h * w, cols), dtype=np.int8))
    p.load(Buffer.WGT, 0, rng.integers(-128, 128, (9 * cols, cols), dtype=np.int8))
    p.load(Buffer.PARAM, 0, random_channel_params(rng, (1, cols)))
    k = 9 * cols
    mb = h * w // rows
    p.im2col(0, 0, channels=cols, in_h=h, in_w=w, kh=3, kw=3, out_w=w, m_blocks=mb,
             pad_top=1, pad_left=1, pad_value=-3)
    p.gemm(0, 0, 0, k=k, m_blocks=2, n_blocks=1)  # the first two blocks: IM2COL still running
    p.requant(0, 16, 0, count=2 * rows, out_gap=1)  # pixels 0..3 of a 2-word-per-pixel tensor
    p.im2col(16, k * mb, channels=cols, pitch=2, in_h=1, in_w=2 * rows, kh=1, kw=2, out_w=3,
             stride=2, m_blocks=1, pad_value=5)
    p.store(Buffer.INP, 0, k * mb + 2 * cols)
    p.store(Buffer.OUT, 16, 4 * rows)
    p.sync(counters=True)
    items, _ = check_against_golden(cfg, p, seed=seed)
    assert items[-1].status == Status.OK


def test_top_im2col_overlaps_gemm():
    """Full profile: an IM2COL into one INP half runs while a GEMM reads the other (their access
    sets do not conflict), so the pair takes less than the two one after the other (the
    CYCLES counter between two SYNCs; printed)."""
    seed = seed_from_env()
    rng = np.random.default_rng(seed)
    cfg = small_config(rows=8, cols=16, host_width=64, requant_lanes=2, impl=FULL,
                       inp_depth=1024, wgt_depth=256, acc_depth=64, out_depth=64)
    k = 9 * cfg.cols
    im2col = dict(channels=cfg.cols, in_h=4, in_w=4, kh=3, kw=3, out_w=4, m_blocks=2,
                  pad_top=1, pad_left=1)

    def measure(work):
        p = Program(cfg)
        p.load(Buffer.OUT, 0, rng.integers(-128, 128, (16, cfg.cols), dtype=np.int8))
        p.load(Buffer.INP, 0, rng.integers(-128, 128, (2 * k, cfg.rows), dtype=np.int8))
        p.load(Buffer.WGT, 0, rng.integers(-128, 128, (k, cfg.cols), dtype=np.int8))
        p.sync(counters=True, clear=True)
        work(p)
        p.sync(counters=True)
        items, _ = check_against_golden(cfg, p, seed=seed, gaps=0.0, backpressure=0.0)
        assert items[-1].status == Status.OK
        return items[-1].counters[Counter.CYCLES]

    gemm = measure(lambda p: p.gemm(0, 0, 0, k=k, m_blocks=2, n_blocks=1))
    gather = measure(lambda p: p.im2col(0, 2 * k, **im2col))
    both = measure(lambda p: p.im2col(0, 2 * k, **im2col).gemm(0, 0, 0, k=k, m_blocks=2,
                                                               n_blocks=1))
    print(f"GEMM {gemm} cycles, IM2COL {gather}, both {both}")
    assert both < gemm + gather - gather // 2


# -- PASS: tiled and gate (full profile) ------------------------------------------------------

#: Full-profile configurations: the ecp5 and sim patches (2x4, 4x4) and a 2x2 one.
PASS_CONFIGS = {
    "ecp5": CONFIGS["ecp5"],
    "rows4": replace(CONFIGS["rows4"], impl=FULL),
    "sim": small_config(rows=16, cols=16, host_width=64, inp_depth=1024, out_depth=1024,
                        requant_lanes=2, mask_bits=256, impl=FULL),
}


def _tiled_cases(config, rng, n):
    """``n`` random tiled IM2COLs (half gated, as ``random_im2col`` draws them), then hand-picked
    ones, all gated: oy0 > 0 (a start inside the patch grid), packed pixels, pool (2x2 stride 2
    and a padded 3x3), a row of patches that wraps several times, a mask_word > 0."""
    ph, pw = config.patch_shape
    cases = []
    while len(cases) < n:
        f = random_cases(config, rng, 1)[0]
        if f.get("tiled"):
            cases.append(f)
    cols = config.cols
    base = dict(src=0, dst=1, pitch=1, channels=cols, in_h=2 * ph, in_w=2 * pw, kh=3, kw=3,
                stride=1, dilation=1, pad_top=1, pad_left=1, pad_value=0x05, oy0=ph,
                out_w=2 * pw, m_blocks=2, pack=0, tiled=1, gate=1, mask_word=0)
    cases += [
        base,
        dict(base, pack=min(3, cols.bit_length() - 1), channels=1, oy0=0, m_blocks=4,
             kh=2, kw=3, dilation=2),
        dict(base, pool=1, kh=2, kw=2, stride=2, pad_top=0, pad_left=0, pad_value=0x80,
             in_h=4 * ph, in_w=4 * pw, oy0=0, m_blocks=4),
        dict(base, pool=1, kh=3, kw=3, stride=2, pad_value=0x80, in_h=4 * ph, in_w=4 * pw,
             oy0=ph, m_blocks=2, channels=cols + 1, pitch=2),
        dict(base, in_h=ph, in_w=8 * pw, out_w=2 * pw, oy0=2 * ph, stride=2, m_blocks=6,
             channels=3, mask_word=1),
    ]
    for f in cases:
        assert check_instruction(config, Instruction(Opcode.IM2COL, **f)) is None, f
    return cases


@pytest.mark.parametrize("config_name", PASS_CONFIGS)
def test_unit_tiled_gate(config_name):
    """Tiled and gated IM2COLs on the tiled design against the window gather with
    ``patch_shape`` and the golden gate (a skipped block's INP words untouched), over random
    and alternating MASK bits of either polarity, all 0 and all 1."""
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    config = PASS_CONFIGS[config_name]
    out = random_words(config, Buffer.OUT, config.out_depth, rng)
    out_words = [int.from_bytes(b, "little") for b in _word_bytes(config, out)]
    n = config.mask_bits
    alternate = np.arange(n) % 2 == 0
    masks = {"random": rng.random(n) < 0.5, "live-first": alternate,
             "skipped-first": ~alternate, "none": np.zeros(n, bool), "all": np.ones(n, bool)}
    for name, mask in masks.items():
        cases = _tiled_cases(config, rng, 12 if name == "random" else 4)
        for f, (inp, cycles) in zip(cases, run_unit(Im2colTiled, config, cases, out_words,
                                                     mask=mask), strict=True):
            check(config, out, f, inp, cycles, mask)


def test_unit_gate_cycles():
    """Cycles of a gated layer-like IM2COL (3x3 window, pad 1, cols channels, 40 patches of the
    ecp5 2x4 shape) with 0 %, 10 % and 100 % live blocks, and ungated (printed for
    docs/architecture.md): a skipped block costs a cycle, a live one a cycle more than
    ungated; the results equal the golden model."""
    config = small_config(rows=8, cols=16, host_width=64, inp_depth=8192, out_depth=512,
                          requant_lanes=2, mask_bits=256, impl=FULL)
    rng = np.random.default_rng(11)
    print("seed=11")
    out = random_words(config, Buffer.OUT, config.out_depth, rng)
    out_words = [int.from_bytes(b, "little") for b in _word_bytes(config, out)]
    blocks = 40
    f = dict(_dense_case(config, config.cols, m_blocks=blocks), in_h=16, in_w=20, out_w=20,
             tiled=1, gate=1, mask_word=1)
    assert check_instruction(config, Instruction(Opcode.IM2COL, **f)) is None
    first = gate_span(config, Opcode.IM2COL, f)[0]
    cycles = {}
    for live in (0, 4, blocks):
        mask = np.zeros(config.mask_bits, bool)
        mask[first + np.linspace(0, blocks - 1, live).astype(int)] = True
        assert mask.sum() == live
        [(inp, c)] = run_unit(Im2colTiled, config, [f], out_words, mask=mask)
        check(config, out, f, inp, c, mask)
        cycles[live] = c
    [(inp, ungated)] = run_unit(Im2colTiled, config, [dict(f, gate=0)], out_words)
    check(config, out, dict(f, gate=0), inp, ungated)
    words = 9 * config.cols
    print(f"gated IM2COL, {blocks} blocks of {words} INP words: 0 % live {cycles[0]} cycles, "
          f"10 % {cycles[4]}, 100 % {cycles[blocks]}; ungated {ungated}")
    assert cycles[0] <= blocks + 12  # setup, a cycle a skipped block
    assert cycles[blocks] <= ungated + blocks + 2
    per_block = (ungated - cycles[0]) / blocks
    assert cycles[4] <= cycles[0] + 4 * (per_block + 2)
