# amaranth: UnusedElaboratable=no
"""End-to-end Amaranth simulation of the Accelerator against the golden model.

Byte streams go in with random valid gaps and come out under random back-pressure; responses are
compared with ``GoldenMachine(config).run(stream)`` (timing counters only for plausibility).
The cocotb/Verilator harness runs the big random regressions; these are the fast smoke tests.
"""

import dataclasses

import numpy as np
import pytest
from hw_tb import COMPACT, FULL, check_against_golden, seed_from_env, small_config

from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import INSTR_BYTES, Buffer, Counter, Opcode, Status
from tinyaccel.protocol import Program, channel_params
from tinyaccel.sim.randprog import corner_programs, random_program

#: Opcodes the hardware executes (all of them: see docs/architecture.md section 11).
IMPLEMENTED = list(Opcode)


def layer_program(cfg, rng) -> Program:
    """One quantized layer: LOAD A, B, params; GEMM; REQUANT; STORE OUT and raw ACC."""
    k, mb, nb = 6, 2, 2
    p = Program(cfg)
    p.load(Buffer.INP, 0, rng.integers(-128, 128, (mb * k, cfg.rows), dtype=np.int8))
    p.load(Buffer.WGT, 0, rng.integers(-128, 128, (nb * k, cfg.cols), dtype=np.int8))
    params = channel_params({
        "bias": rng.integers(-5000, 5000, cfg.cols),
        "multiplier": rng.integers(1 << 29, 1 << 31, cfg.cols),
        "shift": rng.integers(-12, 2, cfg.cols),
        "zero_point": rng.integers(-10, 10, cfg.cols),
        "clamp_min": np.full(cfg.cols, -128), "clamp_max": np.full(cfg.cols, 127),
    }, (1, cfg.cols))
    p.load(Buffer.PARAM, 1, params)
    p.gemm(0, 0, 0, k=k, m_blocks=mb, n_blocks=nb)
    p.requant(0, 3, 1, count=mb * nb * cfg.rows)
    p.store(Buffer.OUT, 3, mb * nb * cfg.rows)
    p.store(Buffer.ACC, 0, mb * nb * cfg.rows)
    return p.sync(counters=True, clear=True).sync(counters=True)


@pytest.mark.parametrize("name,impl", [("ice40", None), ("tiny", FULL), ("tiny", COMPACT)])
def test_layer_program(name, impl):
    seed = seed_from_env()
    print(f"seed={seed}")
    cfg = PRESETS["ice40"] if name == "ice40" else small_config()
    program = layer_program(cfg, np.random.default_rng(seed))
    items, _ = check_against_golden(cfg, program, seed=seed, impl=impl)
    report = items[-2]
    assert report.status == Status.OK
    assert report.counters[Counter.MACS_ISSUED] == 4 * 6 * cfg.macs
    assert items[-1].counters[Counter.INSTRUCTIONS] == 1  # cleared by the first SYNC


@pytest.mark.parametrize("impl", [FULL, COMPACT], ids=["full", "compact"])
def test_random_programs(impl):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    cfg = small_config()
    program = random_program(cfg, rng, n_instr=24, opcodes=IMPLEMENTED, illegal_rate=0.1,
                             window=16, max_k=8)
    check_against_golden(cfg, program, seed=seed, impl=impl, gaps=0.4, backpressure=0.5)


def test_corner_programs():
    cfg = small_config()
    corners = {c.name: c for c in corner_programs(cfg, IMPLEMENTED)}
    for name in ("requant_saturation", "accumulate_saturation", "gemm_gated", "tile_1x1",
                 "error_addr_range_gemm", "error_bad_buffer_load"):
        items, _ = check_against_golden(cfg, corners[name].program, seed=7, impl=FULL)
        first_sync = next(i for i in items if hasattr(i, "status"))
        assert first_sync.status == corners[name].status, name


def test_unfolded_params_one_lane():
    """PARAM words that are not a whole number of beats per lane group stay unfolded."""
    seed = seed_from_env()
    cfg = small_config(rows=8, cols=8, host_width=64, requant_lanes=1, impl=FULL)
    program = layer_program(cfg, np.random.default_rng(seed))
    check_against_golden(cfg, program, seed=seed, gaps=0.1, backpressure=0.1)


#: A configuration with the PASS unit and 2x2 patches (rows = 4), room for two 4x8 frames.
PASS_CONFIG = small_config(rows=4, cols=4, host_width=16, inp_depth=512, wgt_depth=64,
                           acc_depth=64, out_depth=256, mask_bits=256, impl=FULL)


def pass_frame(p, cfg, new, *, threshold, given=False):
    """One PASS layer step on a 4x8 tiled frame of ``cols`` channels (8 patches of 2x2 pixels,
    one OUT word each): PATCH the new frame (OUT 32) against the reference (OUT 0) into MASK bits
    0..7, DILATE them by the 3x3 window into bits 64..71, then the gated tiled IM2COL (from the
    reference, now the current frame where it changed), GEMM and REQUANT (into OUT 96)."""
    rows = cfg.rows
    p.load(Buffer.OUT, 32, new)
    p.patch(32, 0, k=rows, blocks=8, threshold=threshold, mask_idx=0, given=given)
    p.dilate(0, 64, in_h=2, in_w=4, out_h=2, out_w=4, kh=3, kw=3, pad_top=1, pad_left=1)
    p.im2col(0, 0, channels=cfg.cols, in_h=4, in_w=8, kh=3, kw=3, out_w=8, m_blocks=8,
             pad_top=1, pad_left=1, tiled=True, gate=True, mask_word=1)
    p.gemm(0, 0, 0, k=9 * cfg.cols, m_blocks=8, n_blocks=1, gate=True, mask_idx=64)
    return p.requant(0, 96, 0, count=8 * rows, gate=True, mask_idx=64)


@pytest.mark.parametrize("overlap", [True, False], ids=["concurrent", "exclusive"])
def test_pass_layer(overlap):
    """PASS end to end: PATCH on OUT -> DILATE -> gated tiled IM2COL -> gated GEMM -> gated
    REQUANT, after a dense first frame, with a compared frame and a given-mask frame; every
    buffer compared with the golden model, and the skipped MACs counted by hand."""
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    cfg = dataclasses.replace(PASS_CONFIG, impl=dataclasses.replace(FULL, overlap=overlap))
    rows, cols = cfg.rows, cfg.cols
    frame0 = rng.integers(-100, 100, (8 * rows, cols), dtype=np.int8)
    p = Program(cfg)
    p.load(Buffer.OUT, 0, frame0)
    p.load(Buffer.WGT, 0, rng.integers(-128, 128, (9 * cols, cols), dtype=np.int8))
    params = channel_params({
        "bias": rng.integers(-500, 500, cols), "multiplier": rng.integers(1 << 29, 1 << 30, cols),
        "shift": rng.integers(-10, -6, cols), "zero_point": rng.integers(-5, 5, cols),
        "clamp_min": np.full(cols, -128), "clamp_max": np.full(cols, 127)}, (1, cols))
    p.load(Buffer.PARAM, 0, params)
    # the dense first frame
    p.im2col(0, 0, channels=cols, in_h=4, in_w=8, kh=3, kw=3, out_w=8, m_blocks=8,
             pad_top=1, pad_left=1, tiled=True)
    p.gemm(0, 0, 0, k=9 * cols, m_blocks=8, n_blocks=1).requant(0, 96, 0, count=8 * rows)
    p.sync(counters=True, clear=True)
    # frame 1: noise within the threshold everywhere, a real change in patch 0 (tiled: OUT words
    # 0..3) -> dilated: patches 0, 1, 4, 5 of the 2x4 grid live, 2, 3, 6, 7 skipped
    frame1 = np.clip(frame0.astype(np.int16) + rng.integers(-2, 3, frame0.shape), -128, 127)
    frame1[2, 1] = 120
    pass_frame(p, cfg, frame1.astype(np.int8), threshold=2)
    p.store(Buffer.MASK, 0, 2).store(Buffer.OUT, 0, 8 * rows).store(Buffer.OUT, 96, 8 * rows)
    p.store(Buffer.INP, 0, 8 * 9 * cols).store(Buffer.ACC, 0, 8 * rows).sync(counters=True,
                                                                             clear=True)
    # frame 2: a host-given mask (patch 7 only: bits 0..7 = 0b1000_0000), no compare
    mask = np.zeros((4, 64), bool)
    mask[0, 7] = True
    p.load(Buffer.MASK, 0, mask)
    frame2 = rng.integers(-100, 100, (8 * rows, cols), dtype=np.int8)
    pass_frame(p, cfg, frame2, threshold=0, given=True)
    p.store(Buffer.MASK, 0, 4).store(Buffer.OUT, 0, 8 * rows).store(Buffer.OUT, 96, 8 * rows)
    p.store(Buffer.ACC, 0, 8 * rows).sync(counters=True)
    items, _ = check_against_golden(cfg, p, seed=seed, impl=cfg.impl)
    reports = [i for i in items if hasattr(i, "status")]
    assert [r.status for r in reports] == [Status.OK] * 3
    block_macs = 9 * cols * cfg.macs
    assert reports[0].counters[Counter.MACS_SKIPPED] == 0
    assert reports[1].counters[Counter.MACS_SKIPPED] == 4 * block_macs
    # patch 7 (grid (1, 3)) dilated: patches 2, 3, 6, 7 live
    assert reports[2].counters[Counter.MACS_SKIPPED] == 4 * block_macs


def test_without_pass_unit_pass_instructions_fault():
    """A full configuration without the PASS unit builds without it and reports PATCH and DILATE
    as ILLEGAL_OPCODE, a gated REQUANT as BAD_FIELD (each after a SYNC cleared the last)."""
    cfg = dataclasses.replace(PASS_CONFIG, impl=dataclasses.replace(FULL, pass_unit=False))
    p = Program(cfg)
    p.patch(32, 0, k=4, blocks=2, threshold=0).sync()
    p.dilate(0, 64, in_h=2, in_w=4, out_h=2, out_w=4, kh=3, kw=3).sync()
    p.requant(0, 96, 0, count=4, gate=True).sync()
    items, _ = check_against_golden(cfg, p, seed=3)
    assert [i.status for i in items if hasattr(i, "status")] == [
        Status.ILLEGAL_OPCODE, Status.ILLEGAL_OPCODE, Status.BAD_FIELD]


@pytest.mark.parametrize("wide", [False, True])
def test_sgq_encoder(wide):
    """SGQ groups with zero (BASE) stripes, narrow and wide ranges, every max_shift."""
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    cfg = small_config(rows=8, cols=8, host_width=64, requant_lanes=1, impl=FULL) if wide else \
        small_config()
    n = 12
    out = rng.integers(-128, 128, (n, cfg.cols), dtype=np.int8)
    out[0:2] = 0  # a BASE stripe after ReLU
    out[2:4] = rng.integers(0, 3, (2, cfg.cols))  # fits 2 bits
    out[4:6] = rng.integers(-20, -9, (2, cfg.cols))  # 4 bits, offset from base
    out[6:8] = -128
    p = Program(cfg).load(Buffer.OUT, 0, out)
    p.sgq(0, 8, 2, 0).sgq(0, 12, 2, 3).sgq(2, 10, 5, 7).sgq(0, 12, 12, 1).sgq(4, 0, 3, 2)
    p.sgq(0, 1, 1, 5).sgq(0, 4, 2, 0)  # the last: base 0, first stripe BASE
    check_against_golden(cfg, p.sync(counters=True), seed=seed)


def test_reset_clears_scratchpads():
    """Section 5: buffers are zero after reset, also after a reset pulse (block RAM is not)."""
    from amaranth.hdl import ClockDomain, Module
    from amaranth.sim import Simulator

    from tinyaccel.hw.top import Accelerator

    cfg = small_config()
    dut = Accelerator(cfg)
    top = Module()
    top.domains.sync = cd = ClockDomain()
    top.submodules.dut = dut
    words = np.full((4, cfg.rows), 7, np.int8)
    programs = [Program(cfg).load(Buffer.INP, 0, words).store(Buffer.INP, 0, 4),
                Program(cfg).store(Buffer.INP, 0, 4)]
    responses = []

    async def tb(ctx):
        ctx.set(dut.o_stream.ready, 1)
        for n, program in enumerate(programs):
            if n:
                ctx.set(cd.rst, 1)
                await ctx.tick()
                ctx.set(cd.rst, 0)
            stream = program.to_bytes()
            bb = cfg.beat_bytes
            beats = [int.from_bytes(stream[i:i + bb], "little") for i in range(0, len(stream), bb)]
            got = bytearray()
            i = 0
            for _ in range(300):
                ctx.set(dut.i_stream.valid, i < len(beats))
                ctx.set(dut.i_stream.payload, beats[i] if i < len(beats) else 0)
                took = ctx.get(dut.i_stream.valid) and ctx.get(dut.i_stream.ready)
                if ctx.get(dut.o_stream.valid):
                    got += ctx.get(dut.o_stream.payload).to_bytes(bb, "little")
                await ctx.tick()
                i += took
            responses.append(bytes(got))

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert responses == [words.tobytes(), bytes(words.size)]


def boundary_program(cfg) -> Program:
    """LOADs that take data (executed, out of range, discarded after an error), LOADs that take
    none (count 0, an undefined buffer), and instructions without data, SYNCs among them."""
    from tinyaccel.protocol import encode_fields
    words = np.arange(3 * cfg.rows, dtype=np.int8).reshape(3, cfg.rows)
    p = Program(cfg).load(Buffer.INP, 0, words).nop().sync()
    p.append(encode_fields(Opcode.LOAD, buf=Buffer.INP, addr=cfg.inp_depth - 1, count=2),
             bytes(2 * cfg.word_bytes(Buffer.INP)))  # ADDR_RANGE: the data is still taken
    p.append(encode_fields(Opcode.LOAD, buf=Buffer.WGT, addr=0, count=0))
    p.raw(encode_fields(Opcode.LOAD, buf=7, addr=0, count=3))  # BAD_BUFFER: no data follows
    p.load(Buffer.WGT, 1, np.ones((2, cfg.cols), np.int8))  # discarded (error state)
    return p.store(Buffer.INP, 0, 3).sync(counters=True).load(Buffer.OUT, 2, words[:1, :1]
                                                              .repeat(cfg.cols, 1)).sync()


@pytest.mark.parametrize("impl", [FULL, COMPACT], ids=["parallel", "serial"])
def test_in_boundary(impl):
    """``in_boundary`` is 1 exactly when the bytes taken so far end at an instruction boundary
    (after each whole instruction and its LOAD data): 0 inside a word and while LOAD data is
    due, discarded data included; 1 after reset. Checked every cycle, with input gaps."""
    import random

    from amaranth.sim import Simulator

    from tinyaccel.hw.top import Accelerator
    from tinyaccel.protocol import iter_stream

    cfg = small_config(impl=impl)
    assert cfg.impl.serial_decode == (impl is COMPACT)  # both decoder designs
    program = boundary_program(cfg)
    stream = program.to_bytes()
    boundaries, pos = {0}, 0
    for _word, payload in iter_stream(cfg, stream):
        pos += INSTR_BYTES + len(payload)
        boundaries.add(pos)
    bb = cfg.beat_bytes
    beats = [int.from_bytes(stream[i:i + bb], "little") for i in range(0, len(stream), bb)]
    dut = Accelerator(cfg)
    rng = random.Random(3)
    seen = {0: 0, 1: 0}

    async def tb(ctx):
        ctx.set(dut.o_stream.ready, 1)
        i = 0
        for _ in range(20_000):
            at = i * bb
            assert ctx.get(dut.in_boundary) == (at in boundaries), (
                f"in_boundary={ctx.get(dut.in_boundary)} after {at} bytes taken")
            seen[at in boundaries] += 1
            ctx.set(dut.i_stream.valid, i < len(beats) and rng.random() < 0.7)
            ctx.set(dut.i_stream.payload, beats[i] if i < len(beats) else 0)
            took = ctx.get(dut.i_stream.valid) and ctx.get(dut.i_stream.ready)
            await ctx.tick()
            i += took
            if i == len(beats) and not ctx.get(dut.busy) and not ctx.get(dut.o_stream.valid):
                break
        assert i == len(beats), f"{i} of {len(beats)} beats taken"
        assert ctx.get(dut.in_boundary) == 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert seen[0] > 0 and seen[1] > 0


def test_generate_verilog_ports():
    """The port contract the harness and the boards build on (ice40: the fastest to convert)."""
    import re

    from tinyaccel.hw.top import generate_verilog

    text = generate_verilog(PRESETS["ice40"])
    header = re.search(r"module tinyaccel_top\((.*?)\);", text, re.S)
    assert header, "top module tinyaccel_top"
    ports = {p.strip() for p in header.group(1).split(",")}
    assert ports == {"clk", "rst", "i_stream__payload", "i_stream__valid", "i_stream__ready",
                     "o_stream__payload", "o_stream__valid", "o_stream__ready", "busy", "error",
                     "in_boundary"}
    assert "input [15:0] i_stream__payload" in text
    assert "output [15:0] o_stream__payload" in text


def test_accelerator_takes_a_preset_name():
    from tinyaccel.errors import ConfigError
    from tinyaccel.hw.config import Implementation
    from tinyaccel.hw.top import Accelerator
    accel = Accelerator("ice40")
    assert accel.config is PRESETS["ice40"]
    assert accel.impl == Implementation.compact()
    with pytest.raises(ConfigError, match="'nope'"):
        Accelerator("nope")
