"""MacArray against exact_gemm: random blocks of random depth, back to back."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import seed_from_env

from tinyaccel.hw.mac_array import MacArray
from tinyaccel.sim.numerics import exact_gemm


def run_blocks(rows, cols, blocks, rng, shadow=True):
    """Feed blocks (A (rows, k), B (k, cols)) back to back, spacing `last` steps (with the shadow
    bank) or a `last` and the next `first` step (without) by >= `spacing` cycles as the contract
    asks; return the rows that come out, per block."""
    dut = MacArray(rows, cols, tag_shape=8, shadow=shadow)
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
        for _ in range(rows + 8):
            await ctx.tick()

    async def consumer(ctx):
        current = None
        async for _, _, valid, payload in ctx.tick().sample(dut.o_stream.valid,
                                                      dut.o_stream.payload):
            if not valid:
                continue
            if payload.index == 0:
                current = (payload.tag, [])
                results.append(current)
            assert payload.index == len(current[1])
            current[1].append([payload.row[c] for c in range(cols)])

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(producer)
    sim.add_testbench(consumer, background=True)
    sim.run()
    return results


@pytest.mark.parametrize("shadow", [True, False])
def test_mac_array_random_blocks(shadow):
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
        results = run_blocks(rows, cols, blocks, rng, shadow)
        assert [tag for tag, _ in results] == list(range(len(blocks))), f"seed {seed}"
        for (a, b), (tag, got) in zip(blocks, results, strict=True):
            want = exact_gemm(a, b)
            assert np.array_equal(np.array(got), want), f"seed {seed}, {rows}x{cols} block {tag}"
