"""RequantPipeline and RequantSerial against tinyaccel.sim.numerics.requantize (section 6), lane by
lane; the strided REQUANT (out_gap) end to end against the golden model."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import COMPACT, FULL, check_against_golden, seed_from_env, small_config

from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.decode_rules import strided_span
from tinyaccel.hw.isa import Buffer, Status
from tinyaccel.hw.requant import RequantPipeline, RequantSerial
from tinyaccel.protocol import Program, channel_params
from tinyaccel.sim.numerics import requantize

I32 = np.iinfo(np.int32)
FIELDS = ("bias", "multiplier", "shift", "zero_point", "clamp_min", "clamp_max")


def corner_values(rng, n):
    """Random parameters with a heavy share of the values where section 6 saturates/rounds."""
    def pick(special, lo, hi):
        out = rng.integers(lo, hi + 1, n, dtype=np.int64)
        hit = rng.random(n) < 0.4
        out[hit] = rng.choice(np.array(special, np.int64), hit.sum())
        return out
    edges32 = [I32.min, I32.min + 1, -1, 0, 1, 1 << 30, -(1 << 30), I32.max, I32.max - 1]
    return {
        "acc": pick(edges32 + [1 << 20, -(1 << 20), 12345], I32.min, I32.max).astype(np.int32),
        "bias": pick(edges32, I32.min, I32.max),
        "multiplier": pick(edges32 + [(1 << 31) - 7], I32.min, I32.max),
        "shift": pick([-128, -32, -31, -30, -1, 0, 1, 30, 31, 32, 127], -40, 40),
        "zero_point": pick([-128, 0, 127], -128, 127),
        "clamp_min": pick([-128, 0, 127], -128, 127),
        "clamp_max": pick([-128, 0, 127], -128, 127),
    }


def boundary_values():
    """Vectors on the exact edges: the saturating left shift around the redundant sign bits of x
    (multiplier 1 keeps the sign and the 2^30 bit visible), RoundingDivideByPOT ties
    (multiplier INT32_MAX passes small x through SRDHM unchanged)."""
    rows = []
    full = dict(zero_point=0, clamp_min=-128, clamp_max=127)
    for j in range(32):
        for x in (2**j - 1, 2**j, -(2**j), -(2**j) - 1):
            x = int(np.clip(x, I32.min, I32.max))
            for shift in (31 - j - 1, 31 - j, 32 - j):
                for mult in (1, 2**30):
                    rows.append(dict(acc=x, bias=0, multiplier=mult,
                                     shift=int(np.clip(shift, 0, 31)), **full))
    for e in range(1, 32):
        for q in (-3, -1, 0, 2):
            for delta in (-1, 0, 1):
                x = q * 2**e + 2**(e - 1) + delta
                if I32.min < x < 2**30 and -(2**30) < x:
                    rows.append(dict(acc=x, bias=0, multiplier=I32.max, shift=-e, **full))
    return {f: np.array([r[f] for r in rows], np.int64 if f != "acc" else np.int32)
            for f in ("acc",) + FIELDS}


@pytest.mark.parametrize("engine", [RequantPipeline, RequantSerial])
@pytest.mark.parametrize("vectors", ["random", "boundary"])
def test_requant_engine(vectors, engine):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    lanes = 2
    dut = engine(lanes, tag_shape=16)
    interval = dut.interval
    if vectors == "random":
        n = 600 // interval + 40
        v = corner_values(rng, n * lanes)
    else:
        v = boundary_values()
        n = len(v["acc"]) // lanes
        v = {f: a[:n * lanes] for f, a in v.items()}
    want = requantize(v["acc"], **{f: v[f] for f in FIELDS}).reshape(n, lanes)
    acc = v["acc"].reshape(n, lanes)
    params = {f: v[f].reshape(n, lanes) for f in FIELDS}
    valid = rng.random(n) < 0.8
    got = {}

    async def driver(ctx):
        for s in range(n):
            for _ in range(interval - 1):  # a serial engine needs spaced inputs
                ctx.set(dut.i_stream.valid, 0)
                await ctx.tick()
            ctx.set(dut.i_stream.valid, int(valid[s]))
            ctx.set(dut.i_stream.payload, {
                "acc": [int(x) for x in acc[s]],
                "params": [{f: int(params[f][s, lane]) for f in FIELDS} for lane in range(lanes)],
                "tag": s})
            await ctx.tick()
        ctx.set(dut.i_stream.valid, 0)
        for _ in range(dut.latency + 2):
            await ctx.tick()

    async def monitor(ctx):
        cycle = 0
        async for _, _, out_valid, payload in ctx.tick().sample(dut.o_stream.valid,
                                                          dut.o_stream.payload):
            if out_valid:
                got[payload.tag] = ([payload.out[lane] for lane in range(lanes)], cycle)
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(driver)
    sim.add_testbench(monitor, background=True)
    sim.run()

    assert sorted(got) == [s for s in range(n) if valid[s]], f"seed {seed}"
    for s, (out, cycle) in got.items():
        assert cycle == s * interval + interval - 1 + dut.latency, \
            f"seed {seed}: latency of input {s}"
        assert out == list(want[s]), (
            f"seed {seed}, input {s}: acc={list(acc[s])} "
            f"params={[{f: int(params[f][s, lane]) for f in FIELDS} for lane in range(lanes)]}"
            f" -> {out}, expected {list(want[s])}")


@pytest.mark.parametrize("name,impl", [("ice40", None), ("tiny", FULL), ("tiny", COMPACT)],
                         ids=["ice40", "tiny-full", "tiny-compact"])
def test_requant_out_gap(name, impl):
    """Strided REQUANT (out_gap) end to end against the golden model: ACC row r lands in OUT word
    out_addr + r*(out_gap + 1) and the words between keep what a LOAD put there; a REQUANT whose
    last row is the last OUT word is legal, one word further is ADDR_RANGE."""
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    cfg = PRESETS["ice40"] if name == "ice40" else small_config()
    out_depth = cfg.depth(Buffer.OUT)
    acc_depth = cfg.depth(Buffer.ACC)
    n_params = 2
    p = Program(cfg)
    p.load(Buffer.ACC, 0, rng.integers(-(1 << 20), 1 << 20, (acc_depth, cfg.cols),
                                       dtype=np.int32))
    p.load(Buffer.PARAM, 0, channel_params({
        "bias": rng.integers(-5000, 5000, (n_params, cfg.cols)),
        "multiplier": rng.integers(1 << 29, 1 << 31, (n_params, cfg.cols)),
        "shift": rng.integers(-12, 2, (n_params, cfg.cols)),
        "zero_point": rng.integers(-10, 10, (n_params, cfg.cols)),
        "clamp_min": np.full((n_params, cfg.cols), -128),
        "clamp_max": np.full((n_params, cfg.cols), 127)}, (n_params, cfg.cols)))
    p.load(Buffer.OUT, 0, rng.integers(-128, 128, (out_depth, cfg.cols), dtype=np.int8))
    for count, gap in ((3, 0), (4, 1), (2, 5), (1, 63), (3, 2)):
        out_addr = int(rng.integers(out_depth - strided_span(count, gap) + 1))
        acc_addr = int(rng.integers(acc_depth - count + 1))
        p.requant(acc_addr, out_addr, int(rng.integers(n_params)), count, out_gap=gap)
        p.store(Buffer.OUT, 0, out_depth)
    count, gap = 3, 4
    p.requant(1, out_depth - strided_span(count, gap), 1, count, out_gap=gap)  # up to the end
    p.store(Buffer.OUT, 0, out_depth)
    p.requant(1, out_depth - strided_span(count, gap) + 1, 1, count, out_gap=gap)  # one past
    p.sync()
    items, _ = check_against_golden(cfg, p, seed=seed, impl=impl)
    assert items[-1].status == Status.ADDR_RANGE
