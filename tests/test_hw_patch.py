"""The PASS units at unit level: PATCH (hw/patch_unit.py) against ``sim.numerics.patch_skip`` and
the golden PATCH semantics (merge, given), DILATE (hw/dilate.py) against
``sim.numerics.dilate_mask``; and their cycle counts."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import FULL, seed_from_env, small_config

from tinyaccel.hw.dilate import DilateUnit
from tinyaccel.hw.isa import DilateOperands, Instruction, Opcode, PatchOperands
from tinyaccel.hw.patch_unit import PatchSkipUnit
from tinyaccel.sim.golden import GoldenMachine, check_instruction
from tinyaccel.sim.numerics import patch_skip

#: The presets' array shapes with the PASS unit; MASK physical words of 64 and 16 bits.
CONFIGS = {
    "ecp5": small_config(rows=8, cols=16, host_width=64, out_depth=1024, mask_bits=1024,
                         requant_lanes=2, impl=FULL),
    "narrow": small_config(rows=2, cols=4, host_width=16, out_depth=256, mask_bits=256,
                           impl=FULL),
}


def run_unit(unit, cmd_layout, cases, mems, ports, max_cycles=100_000):
    """Run each command of ``cases`` on ``unit`` over the memories ``mems`` (``{name: list of
    int words}``, updated in place), with ``ports`` ``{name: (read client, write client)}``.
    The ports behave as section 3 defines: read data a cycle after the enable, held while it
    is low; a write lands at the end of its cycle. Checks that no word is read in the cycle it
    is written and that the ports are quiet while the unit is idle. Returns the cycles of each
    command from start to idle."""
    cycles_of = []

    async def bench(ctx):
        for f in cases:
            ctx.set(unit.ctrl.cmd, cmd_layout.const(f))
            ctx.set(unit.ctrl.start, 1)
            await ctx.tick()
            ctx.set(unit.ctrl.start, 0)
            ctx.set(unit.ctrl.cmd, 0)  # the unit keeps its own copy
            cycles = 0
            while True:
                busy = ctx.get(unit.ctrl.busy)
                reads, writes = {}, {}
                for name, (rd, wr) in ports.items():
                    if ctx.get(rd.en):
                        reads[name] = ctx.get(rd.addr)
                    wen = ctx.get(wr.en)
                    if wen:
                        assert wen == (1 << len(wr.en)) - 1, f"partial {name} write"
                        writes[name] = (ctx.get(wr.addr), ctx.get(wr.data))
                if cycles and not busy:
                    assert not reads and not writes, "a port used while not busy"
                    break
                for name, addr in reads.items():
                    assert writes.get(name, (None,))[0] != addr, f"{name} read during write"
                    reads[name] = mems[name][addr]
                for name, (addr, value) in writes.items():
                    mems[name][addr] = value
                await ctx.tick()
                for name, value in reads.items():
                    ctx.set(ports[name][0].data, value)
                cycles += 1
                assert cycles < max_cycles, "the unit does not finish"
            cycles_of.append(cycles)
            await ctx.tick()

    sim = Simulator(unit)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return cycles_of


# -- MASK and OUT as Python values ------------------------------------------------------------

def mask_words(bits, width):
    """Physical MASK words (ints of ``width`` bits) of a bool array."""
    words = []
    for i in range(0, len(bits), width):
        words.append(sum(int(b) << j for j, b in enumerate(bits[i:i + width])))
    return words


def mask_bits_of(words, width):
    return np.array([(w >> j) & 1 for w in words for j in range(width)], bool)


def out_words(rows):
    """OUT words (ints) of int8 rows."""
    return [int.from_bytes(r.astype(np.int8).tobytes(), "little") for r in rows]


def out_rows(words, cols):
    return np.array([np.frombuffer(w.to_bytes(cols, "little"), np.int8) for w in words])


# -- PATCH ------------------------------------------------------------------------------------

def golden_after(config, opcode, f, mask, out=None):
    """MASK bits and OUT rows after the golden model executes the instruction (copies)."""
    m = GoldenMachine(config)
    m.mask[...] = mask
    if out is not None:
        m.out[...] = out
    m.execute(Instruction(opcode, **f))
    return m.mask.copy(), m.out.copy()


def patch_case(config, rng, *, k, blocks, fraction, threshold=3, given=False, merge=None,
               mask_idx=None):
    """A legal PATCH and OUT/MASK contents in which about ``fraction`` of the tiles changed
    (by more than ``threshold``; the others by at most ``threshold``)."""
    cols, depth = config.cols, config.out_depth
    n = k * blocks
    lo = int(rng.integers(0, depth - 2 * n + 1))
    hi = int(rng.integers(lo + n, depth - n + 1))
    new_addr, ref_addr = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    out = rng.integers(-128, 128, (depth, cols)).astype(np.int8)
    ref = out[ref_addr:ref_addr + n].astype(np.int16)
    noise = rng.integers(-threshold, threshold + 1, ref.shape)
    new = np.clip(ref + noise, -128, 127).reshape(blocks, k, cols)
    changed = rng.random(blocks) < fraction
    for b in np.flatnonzero(changed):  # one lane of one word far away
        t, c = rng.integers(0, k), rng.integers(0, cols)
        v = int(new[b, t, c])
        new[b, t, c] = v - (threshold + 1 + rng.integers(0, 40)) if v >= 0 else \
            v + threshold + 1 + rng.integers(0, 40)
    out[new_addr:new_addr + n] = new.reshape(n, cols).astype(np.int8)
    if mask_idx is None:
        mask_idx = int(rng.integers(0, config.mask_bits - blocks + 1))
    mask = rng.random(config.mask_bits) < 0.5
    if given:
        mask[mask_idx:mask_idx + blocks] = changed
    f = dict(new_addr=new_addr, ref_addr=ref_addr, k=k, blocks=blocks, threshold=threshold,
             mask_idx=mask_idx, merge=int(rng.random() < 0.5) if merge is None else merge,
             given=int(given))
    assert check_instruction(config, Instruction(Opcode.PATCH, **f)) is None, f
    return f, out, mask


def run_patch(config, cases):
    """Each (fields, out, mask) case on a fresh PATCH unit run; (out, mask, cycles) after each."""
    results = []
    width = config.host_width
    for f, out, mask in cases:
        unit = PatchSkipUnit(config)
        mems = {"out": out_words(out), "mask": mask_words(mask, width)}
        ports = {"out": (unit.rd_out, unit.wr_out), "mask": (unit.rd_mask, unit.wr_mask)}
        (cycles,) = run_unit(unit, PatchOperands, [f], mems, ports)
        results.append((out_rows(mems["out"], config.cols), mask_bits_of(mems["mask"], width),
                        cycles))
    return results


@pytest.mark.parametrize("config_name", CONFIGS)
def test_patch_against_golden(config_name):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    config = CONFIGS[config_name]
    cases = []
    for i in range(14):
        k = int(rng.integers(1, 5))
        blocks = int(rng.integers(1, min(255, config.out_depth // (2 * k)) + 1))
        fraction = [0.0, 0.1, 0.5, 1.0][i % 4]
        cases.append(patch_case(config, rng, k=k, blocks=blocks, fraction=fraction,
                                threshold=int(rng.integers(0, 6)), given=i % 3 == 2))
    # a group ending exactly at a word boundary; one tile; threshold 0 with equal tiles
    w = config.host_width
    cases.append(patch_case(config, rng, k=1, blocks=w, fraction=0.3, mask_idx=w))
    cases.append(patch_case(config, rng, k=2, blocks=1, fraction=1.0, mask_idx=w - 1))
    cases.append(patch_case(config, rng, k=3, blocks=5, fraction=0.0, threshold=0))
    for (f, out, mask), (got_out, got_mask, _) in zip(cases, run_patch(config, cases),
                                                       strict=True):
        want_mask, want_out = golden_after(config, Opcode.PATCH, f, mask, out)
        np.testing.assert_array_equal(got_mask, want_mask, err_msg=str(f))
        np.testing.assert_array_equal(got_out, want_out, err_msg=str(f))


def test_patch_cycles():
    """Streaming: about 2 cycles per compared word, no per-tile pause; a copy 1 per word."""
    config = CONFIGS["ecp5"]
    rng = np.random.default_rng(5)
    blocks = 128
    rows = []
    for k in (1, 4):
        for given in (False, True):
            for fraction in (0.0, 0.1, 1.0):
                f, out, mask = patch_case(config, rng, k=k, blocks=blocks, fraction=fraction,
                                          given=given, mask_idx=0)
                (_, _, cycles), = run_patch(config, [(f, out, mask)])
                n_changed = int(mask[:blocks].sum()) if given else int(
                    patch_skip(out[f["new_addr"]:f["new_addr"] + blocks * k].reshape(blocks, k, -1),
                               out[f["ref_addr"]:f["ref_addr"] + blocks * k].reshape(blocks, k, -1),
                               f["threshold"])[0].sum())
                rows.append((k, given, fraction, n_changed, cycles))
                print(f"PATCH k={k} blocks={blocks} given={given} changed={n_changed}: "
                      f"{cycles} cycles ({cycles / blocks:.2f} per tile)")
                compare = 0 if given else 2 * k * blocks
                groups = -(-blocks // config.host_width)
                # the bound: compare; per changed tile its copy (k), the scan's step onto it and
                # at most 3 more for the unchanged run before it (runs of 8, 4, 2, 1), 1 per
                # 8 tiles of those runs; a few cycles per group
                bound = compare + (k + 4) * n_changed + blocks // 8 + 12 * groups + 4
                assert compare + k * n_changed <= cycles <= bound, (k, given, fraction)


# -- DILATE -----------------------------------------------------------------------------------

def dilate_case(config, rng, **fixed):
    """A legal DILATE (``fixed`` fields as given) and random MASK contents."""
    while True:
        f = dict(in_h=int(rng.integers(0, 12)), in_w=int(rng.integers(0, 12)),
                 kh=int(rng.integers(1, 8)), kw=int(rng.integers(1, 8)),
                 stride_y=int(rng.integers(1, 4)), stride_x=int(rng.integers(1, 4)),
                 pad_top=int(rng.integers(0, 4)), pad_left=int(rng.integers(0, 4)),
                 merge=int(rng.integers(0, 2)))
        f["out_h"] = int(rng.integers(0, 12))
        f["out_w"] = int(rng.integers(0, 12))
        f.update(fixed)
        n_in, n_out = f["in_h"] * f["in_w"], f["out_h"] * f["out_w"]
        if n_in + n_out > config.mask_bits:
            continue
        f.setdefault("src", int(rng.integers(0, config.mask_bits - n_in + 1)))
        f.setdefault("dst", int(rng.integers(0, config.mask_bits - n_out + 1)))
        if check_instruction(config, Instruction(Opcode.DILATE, **f)) is None:
            break
    return f, rng.random(config.mask_bits) < float(rng.choice([0.05, 0.3, 0.7]))


def run_dilate(config, f, mask):
    unit = DilateUnit(config)
    mems = {"mask": mask_words(mask, config.host_width)}
    (cycles,) = run_unit(unit, DilateOperands, [f], mems, {"mask": (unit.rd_mask, unit.wr_mask)})
    return mask_bits_of(mems["mask"], config.host_width), cycles


@pytest.mark.parametrize("config_name", CONFIGS)
def test_dilate_against_golden(config_name):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    config = CONFIGS[config_name]
    w = config.host_width
    cases = [dilate_case(config, rng) for _ in range(30)]
    # a layer's patch grid: 3x3 window, same padding; stride 2; rows straddling words
    cases.append(dilate_case(config, rng, in_h=8, in_w=8, out_h=8, out_w=8, kh=3, kw=3,
                             stride_y=1, stride_x=1, pad_top=1, pad_left=1, src=w - 3))
    cases.append(dilate_case(config, rng, in_h=8, in_w=10, out_h=4, out_w=5, kh=3, kw=3,
                             stride_y=2, stride_x=2, pad_top=1, pad_left=1))
    cases.append(dilate_case(config, rng, in_h=0, in_w=5, out_h=3, out_w=3, kh=2, kw=2))
    for f, mask in cases:
        got, _ = run_dilate(config, f, mask)
        want, _ = golden_after(config, Opcode.DILATE, f, mask)
        np.testing.assert_array_equal(got, want, err_msg=str(f))


def test_dilate_cycles():
    """About kh cycles per output bit (a window row is one read) and 2 per output word."""
    config = CONFIGS["ecp5"]
    rng = np.random.default_rng(3)
    for kh, kw, stride in ((3, 3, 1), (3, 3, 2), (1, 1, 1), (5, 5, 1)):
        out_hw = 16 // stride
        f, mask = dilate_case(config, rng, in_h=16, in_w=16, out_h=out_hw, out_w=out_hw, kh=kh,
                              kw=kw, stride_y=stride, stride_x=stride, pad_top=kh // 2,
                              pad_left=kw // 2, src=0, dst=512)
        got, cycles = run_dilate(config, f, mask)
        np.testing.assert_array_equal(got, golden_after(config, Opcode.DILATE, f, mask)[0])
        n_out = out_hw * out_hw
        words = -(-n_out // config.host_width)
        print(f"DILATE {kh}x{kw} stride {stride} {out_hw}x{out_hw}: {cycles} cycles "
              f"({cycles / n_out:.2f} per output bit)")
        # at most one straddle per window row: in_w=16 rows of a 64-bit word straddle never
        assert cycles <= kh * n_out + 2 * words + 4
