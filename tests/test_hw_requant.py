"""RequantPipeline and RequantSerial against tinyaccel.sim.numerics.requantize (section 6), lane by
lane; the strided REQUANT (out_gap) end to end against the golden model."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import COMPACT, FULL, check_against_golden, seed_from_env, small_config
from test_hw_im2col import mask_words

from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.decode_rules import strided_span
from tinyaccel.hw.isa import Buffer, RequantOperands, Status
from tinyaccel.hw.requant import RequantPipeline, RequantSerial, RequantUnit
from tinyaccel.hw.scratchpads import geometry
from tinyaccel.protocol import Program, channel_params, pack_words, unpack_words
from tinyaccel.sim.numerics import requantize
from tinyaccel.sim.randprog import random_words

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


# -- the requant unit: the gate (PASS) ----------------------------------------------------------

def physical_words(config, buf, words):
    """The physical words (ints) of scratchpad ``buf`` holding ``words`` (the ``pack_words``
    form): each architectural word's bytes cut into ``fold`` physical words, in order."""
    size = geometry(config, buf).width // 8
    data = pack_words(config, buf, words)
    return [int.from_bytes(data[i:i + size], "little") for i in range(0, len(data), size)]


def run_requant_unit(config, cases, acc, param, out, mask, *, serial=False):
    """Run the REQUANTs ``cases`` (operand dicts) one after another on a :class:`RequantUnit`
    over ACC ``acc``, PARAM ``param``, OUT ``out`` (``pack_words`` forms) and MASK bits
    ``mask``; the ports behave as section 3 defines them (read data a cycle after the enable,
    held while it is low). Returns per case the OUT words (int8 rows) after it, the addresses
    written and its cycles from start to idle."""
    unit = RequantUnit(config, serial=serial)
    acc_w = physical_words(config, Buffer.ACC, acc)
    param_w = physical_words(config, Buffer.PARAM, param)
    mask_w = mask_words(config, mask)
    out_w = physical_words(config, Buffer.OUT, out)
    hw = config.host_width
    results = []

    async def bench(ctx):
        for f in cases:
            ctx.set(unit.ctrl.cmd, RequantOperands.const(f))
            ctx.set(unit.ctrl.start, 1)
            await ctx.tick()
            ctx.set(unit.ctrl.start, 0)
            ctx.set(unit.ctrl.cmd, 0)  # the unit keeps what it needs
            cycles, written = 0, set()
            reads = {}
            while True:
                busy = ctx.get(unit.ctrl.busy)
                ports = {name: (ctx.get(port.en), ctx.get(port.addr)) for name, port, _ in (
                    ("acc", unit.rd_acc, acc_w), ("param", unit.rd_param, param_w),
                    ("mask", unit.rd_mask, mask_w))}
                wen = ctx.get(unit.wr_out.en)
                if cycles and not busy:
                    assert not wen and not any(en for en, _ in ports.values()), \
                        "a port used while not busy"
                    break
                if ports["mask"][0]:
                    assert f["gate"], "MASK read without gate"
                for name, words in (("acc", acc_w), ("param", param_w), ("mask", mask_w)):
                    en, addr = ports[name]
                    if en:  # (a look-ahead read may pass the last MASK word: any value)
                        reads[name] = words[addr] if addr < len(words) else 0
                if wen:
                    addr, wdata = ctx.get(unit.wr_out.addr), ctx.get(unit.wr_out.data)
                    written.add(addr)
                    for beat in range(len(unit.wr_out.en)):
                        if wen >> beat & 1:
                            keep = out_w[addr] & ~(((1 << hw) - 1) << beat * hw)
                            out_w[addr] = keep | (wdata & ((1 << hw) - 1) << beat * hw)
                await ctx.tick()
                for name, port in (("acc", unit.rd_acc), ("param", unit.rd_param),
                                   ("mask", unit.rd_mask)):
                    if name in reads:
                        ctx.set(port.data, reads[name])
                cycles += 1
                assert cycles < 100_000, "REQUANT does not finish"
            size = config.word_bytes(Buffer.OUT)
            now = unpack_words(config, Buffer.OUT, b"".join(
                w.to_bytes(size, "little") for w in out_w))
            results.append((now, sorted(written), cycles))
            await ctx.tick()

    sim = Simulator(unit)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return results


def golden_requant(config, f, acc, param, out, mask):
    """OUT (int8 rows) after REQUANT ``f`` by the golden semantics: row ``n`` of the ACC words
    requantized into OUT word ``out_addr + n*(out_gap + 1)`` unless ``gate`` and MASK bit
    ``mask_idx + n // rows`` is 0; and the OUT addresses written."""
    out = out.copy()
    n = f["count"]
    p = param[f["param_addr"]]
    values = requantize(acc[f["acc_addr"]:f["acc_addr"] + n], **{name: p[name]
                                                                 for name in FIELDS})
    keep = np.ones(n, bool)
    if f.get("gate"):
        keep = np.repeat(mask[f["mask_idx"]:f["mask_idx"] + -(-n // config.rows)],
                         config.rows)[:n]
    addrs = f["out_addr"] + np.arange(n) * (f["out_gap"] + 1)
    out[addrs[keep]] = values[keep]
    return out, [int(a) for a in addrs[keep]]


REQUANT_CONFIGS = {
    "ecp5": small_config(rows=8, cols=16, host_width=64, acc_depth=128, out_depth=256,
                         param_depth=4, mask_bits=512, requant_lanes=2, impl=FULL),
    "tiny": small_config(impl=FULL),
    "rows4": small_config(rows=4, cols=8, host_width=32, acc_depth=64, out_depth=128,
                          mask_bits=256, requant_lanes=4, impl=FULL),
}


def random_requant(config, rng, *, gate=None):
    """Legal REQUANT operands (``gate`` half the time unless given)."""
    acc_depth, out_depth = config.depth(Buffer.ACC), config.depth(Buffer.OUT)
    count = int(rng.integers(1, min(acc_depth, 6 * config.rows) + 1))
    gap = int(rng.integers(0, 3)) if rng.random() < 0.7 else int(rng.integers(0, 64))
    while strided_span(count, gap) > out_depth:
        gap //= 2
    gate = bool(rng.random() < 0.5) if gate is None else gate
    blocks = -(-count // config.rows)
    return dict(acc_addr=int(rng.integers(acc_depth - count + 1)),
                out_addr=int(rng.integers(out_depth - strided_span(count, gap) + 1)),
                param_addr=int(rng.integers(config.depth(Buffer.PARAM))), count=count,
                out_gap=gap, gate=int(gate),
                mask_idx=int(rng.integers(config.mask_bits - blocks + 1)))


def requant_data(config, rng):
    return (random_words(config, Buffer.ACC, config.depth(Buffer.ACC), rng),
            random_words(config, Buffer.PARAM, config.depth(Buffer.PARAM), rng),
            random_words(config, Buffer.OUT, config.depth(Buffer.OUT), rng))


def mask_patterns(config, rng):
    """MASK bit patterns: random, and both polarities of alternating bits (live first, skipped
    first), all 0 and all 1."""
    n = config.mask_bits
    alternate = np.arange(n) % 2 == 0
    return {"random": rng.random(n) < 0.5, "live-first": alternate, "skipped-first": ~alternate,
            "none": np.zeros(n, bool), "all": np.ones(n, bool)}


@pytest.mark.parametrize("serial", [False, True], ids=["pipeline", "serial"])
@pytest.mark.parametrize("config_name", REQUANT_CONFIGS)
def test_requant_unit_gate(config_name, serial):
    """RequantUnit with the PASS unit against the golden REQUANT: random operands, gated or not,
    over random and alternating MASK patterns of either polarity; a skipped block's OUT words
    are never written."""
    if serial and config_name != "tiny":
        pytest.skip("the serial engine: one small configuration (141 cycles per channel)")
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    config = REQUANT_CONFIGS[config_name]
    acc, param, out = requant_data(config, rng)
    for name, mask in mask_patterns(config, rng).items():
        n = 3 if serial else 8
        cases = [random_requant(config, rng, gate=k > 0) for k in range(n)]
        # a partial last block, from a block start and right after it
        cases.append(dict(cases[-1], count=2 * config.rows + 1, acc_addr=0, out_addr=0,
                          out_gap=0, mask_idx=0))
        cases.append(dict(cases[-1], mask_idx=1, count=config.rows - 1 or 1))
        state = out
        for f, (got, written, _) in zip(cases, run_requant_unit(
                config, cases, acc, param, out, mask, serial=serial), strict=True):
            want, want_written = golden_requant(config, f, acc, param, state, mask)
            assert written == sorted(want_written), f"seed {seed}, mask {name}: {f}"
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, mask {name}: {f}")
            state = want


def test_requant_unit_gate_cycles():
    """Cycles of a gated REQUANT of 40 blocks (ecp5 shape: 8 rows, 8 lane groups a word) with
    0 %, 10 % and 100 % live blocks, and ungated (printed for docs/architecture.md): a skipped
    block costs 2 cycles, a live one nothing more than ungated."""
    config = small_config(rows=8, cols=16, host_width=64, acc_depth=512, out_depth=512,
                          param_depth=4, mask_bits=256, requant_lanes=2, impl=FULL)
    rng = np.random.default_rng(12)
    print("seed=12")
    acc, param, out = requant_data(config, rng)
    blocks = 40
    f = dict(acc_addr=0, out_addr=0, param_addr=1, count=blocks * config.rows, out_gap=0,
             gate=1, mask_idx=70)
    cycles = {}
    for live in (0, 4, blocks):
        mask = np.zeros(config.mask_bits, bool)
        mask[f["mask_idx"] + np.linspace(0, blocks - 1, live).astype(int)] = True
        assert mask.sum() == live
        [(got, _, c)] = run_requant_unit(config, [f], acc, param, out, mask)
        np.testing.assert_array_equal(got, golden_requant(config, f, acc, param, out, mask)[0])
        cycles[live] = c
    [(got, _, ungated)] = run_requant_unit(config, [dict(f, gate=0)], acc, param, out,
                                           np.zeros(config.mask_bits, bool))
    np.testing.assert_array_equal(got, golden_requant(config, dict(f, gate=0), acc, param, out,
                                                      None)[0])
    print(f"gated REQUANT, {blocks} blocks of {config.rows} rows: 0 % live {cycles[0]} cycles, "
          f"10 % {cycles[4]}, 100 % {cycles[blocks]}; ungated {ungated}")
    assert cycles[0] <= 2 * blocks + 4
    assert cycles[blocks] <= ungated + 4
    per_block = (ungated - 20) / blocks
    assert cycles[4] <= cycles[0] + 4 * per_block + 20
