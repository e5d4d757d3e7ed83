"""MacArray against exact_gemm: random blocks of random depth, back to back."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import seed_from_env

from tinyaccel.hw.mac_array import MacArray
from tinyaccel.sim.numerics import exact_gemm


def run_blocks(rows, cols, blocks, rng, shadow=True, group=1):
    """Feed blocks (A (rows, k), B (k, cols)) back to back, spacing `last` steps (with the shadow
    bank) or a `last` and the next `first` step (without) by >= `spacing` cycles as the contract
    asks; return the rows that come out, per block."""
    dut = MacArray(rows, cols, tag_shape=8, shadow=shadow, group=group)
    results = []

    async def producer(ctx):
        since_last = dut.spacing
        for n, (a, b) in enumerate(blocks):
            k = a.shape[1]
            for t in range(k):
                # random bubbles, and wait before a `last` step if the shadow bank is busy
                waits = (t == k - 1) if shadow else (t == 0)
                while rng.random() < 0.2 or (waits and since_last < dut.spacing):
                    ctx.set(dut.i_stream.valid, 0)
                    await ctx.tick()
                    since_last += 1
                ctx.set(dut.i_stream.valid, 1)
                ctx.set(dut.i_stream.payload, {
                    "inp": [int(v) for v in a[:, t]], "wgt": [int(v) for v in b[t]],
                    "first": t == 0, "last": t == k - 1, "tag": n})
                await ctx.tick()
                since_last = 1 if t == k - 1 else since_last + 1  # cycles since the last `last`
        ctx.set(dut.i_stream.valid, 0)
        for _ in range(dut.spacing + 8):
            await ctx.tick()

    async def consumer(ctx):
        current = None
        async for _, _, valid, p in ctx.tick().sample(dut.o_stream.valid, dut.o_stream.payload):
            if not valid:
                continue
            if shadow:  # a row per cycle
                values, row, start = [p.row[c] for c in range(cols)], p.index, 0
            else:  # `group` accumulators of a row per cycle, row by row
                values, row, start = [p.value[i] for i in range(group)], p.row, p.group * group
            if row == 0 and start == 0:
                current = (p.tag, [])
                results.append(current)
            if start == 0:
                assert row == len(current[1])
                current[1].append([])
            assert start == len(current[1][-1])
            current[1][-1].extend(values)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(producer)
    sim.add_testbench(consumer, background=True)
    sim.run()
    return results


@pytest.mark.parametrize("shadow,group", [(True, 1), (False, 1), (False, 2), (False, 0)])
def test_mac_array_random_blocks(shadow, group):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    for rows, cols in ((2, 4), (3, 2), (4, 4)):
        blocks = []
        for _ in range(8):
            k = int(rng.choice([1, 2, 3, 7, 20]))
            a = rng.integers(-128, 128, (rows, k), dtype=np.int8)
            b = rng.integers(-128, 128, (k, cols), dtype=np.int8)
            blocks.append((a, b))
        # one extreme block: every product is (-128) * (-128)
        k = 300
        blocks.append((np.full((rows, k), -128, np.int8), np.full((k, cols), -128, np.int8)))
        results = run_blocks(rows, cols, blocks, rng, shadow, group or cols)
        assert [tag for tag, _ in results] == list(range(len(blocks))), f"seed {seed}"
        for (a, b), (tag, got) in zip(blocks, results, strict=True):
            want = exact_gemm(a, b)
            assert np.array_equal(np.array(got), want), f"seed {seed}, {rows}x{cols} block {tag}"
