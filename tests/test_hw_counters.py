"""PerfCounters (flip-flops and block RAM) against a Python model: random increments, clears
and record dumps under back-pressure."""

import random

import pytest
from amaranth.sim import Simulator
from hw_tb import seed_from_env

from tinyaccel.hw.counters import PerfCounters
from tinyaccel.hw.isa import COUNTER_BITS, Counter

MAX_ADD = {c: 1 for c in Counter}
MAX_ADD.update({Counter.MACS_ISSUED: 8, Counter.MACS_SKIPPED: 8 * 65535,
                Counter.BYTES_IN: 2, Counter.BYTES_OUT: 82})


@pytest.mark.parametrize("ram,host_width", [(False, 16), (True, 16), (True, 64), (True, 8)])
def test_counters_random(ram, host_width):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = random.Random(seed)
    dut = PerfCounters(host_width, ram=ram, max_add=MAX_ADD)
    mask = (1 << COUNTER_BITS) - 1
    beats = len(Counter) * COUNTER_BITS // host_width

    async def bench(ctx):
        model = {c: 0 for c in Counter}
        for _ in range(12):
            # counting, with bursts of maximal increments so that carries cross RAM words
            for _ in range(rng.randrange(1, 400)):
                clear = rng.random() < 0.01
                big = rng.random() < 0.3
                adds = {c: (MAX_ADD[c] if big else rng.randrange(MAX_ADD[c] + 1))
                        if rng.random() < 0.7 else 0 for c in Counter}
                ctx.set(dut.clear, clear)
                for c in Counter:
                    ctx.set(dut.add[c.value], adds[c])
                await ctx.tick()
                model = {c: 0 if clear else (model[c] + adds[c]) & mask for c in Counter}
            ctx.set(dut.clear, 0)
            for c in Counter:
                ctx.set(dut.add[c.value], 0)
            # the record, under random back-pressure
            ctx.set(dut.dump, 1)
            record = []
            while len(record) < beats:
                ready = rng.random() < 0.6
                ctx.set(dut.o_record.ready, ready)
                await ctx.delay(1e-9)
                if ctx.get(dut.o_record.valid) and ready:
                    record.append(ctx.get(dut.o_record.payload))
                await ctx.tick()
            ctx.set(dut.dump, 0)
            ctx.set(dut.o_record.ready, 0)
            value = sum(beat << (host_width * i) for i, beat in enumerate(record))
            got = {c: value >> (COUNTER_BITS * c.value) & mask for c in Counter}
            assert got == model, f"seed {seed}"
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
