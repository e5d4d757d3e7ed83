"""Amaranth-simulator helpers shared by the tests/test_hw_*.py unit tests (not a test module)."""

import dataclasses
import random

from amaranth.sim import Simulator

from tinyaccel.hw.config import AccelConfig, Implementation
from tinyaccel.hw.isa import Counter
from tinyaccel.hw.top import Accelerator
from tinyaccel.protocol import Program, StatusReport, check_link, parse_responses
from tinyaccel.sim.golden import GoldenMachine

__all__ = ["seed_from_env", "run_accelerator", "small_config", "check_against_golden", "FULL",
           "COMPACT"]

#: The two implementation profiles (see hw/config.py): tests run the small configs in both.
FULL = Implementation.full()
COMPACT = Implementation.compact()

#: Counters the golden model reports as 0 (timing); compared for plausibility only.
TIMING = (Counter.CYCLES, Counter.BUSY_CYCLES, Counter.COMPUTE_CYCLES)


def seed_from_env() -> int:
    """The run's seed: fixed unless ``TINYACCEL_SEED`` sets it (an integer, or ``random``);
    printed. See :func:`tinyaccel.sim.randprog.seed_from_env`."""
    from tinyaccel.sim.randprog import seed_from_env as run_seed
    return run_seed()


def small_config(**overrides) -> AccelConfig:
    """A tiny configuration for fast end-to-end simulation: an iCE40-like 2 x 4 array with the
    compact profile unless ``impl=`` says otherwise."""
    params = dict(name="tiny", rows=2, cols=4, host_width=16, inp_depth=64, wgt_depth=64,
                  acc_depth=32, out_depth=32, param_depth=4, mask_bits=128, requant_lanes=2,
                  impl=COMPACT)
    params.update(overrides)
    return AccelConfig(**params)


def run_accelerator(config: AccelConfig, stream: bytes, *, seed: int = 0, gaps: float = 0.3,
                    backpressure: float = 0.3, max_cycles: int = 200_000,
                    dut: Accelerator | None = None) -> tuple[bytes, int]:
    """Stream ``stream`` into an :class:`Accelerator` and collect its responses.

    Input beats come with random valid gaps and the output sees random back-pressure (both from
    ``seed``). Returns (response bytes, cycles). Stops once every input beat is taken, the
    accelerator is idle and nothing is pending on the output.
    """
    bb = config.beat_bytes
    assert len(stream) % bb == 0, "the host stream is whole beats"
    beats = [int.from_bytes(stream[i:i + bb], "little") for i in range(0, len(stream), bb)]
    dut = dut if dut is not None else Accelerator(config)
    rng_in = random.Random(seed)
    rng_out = random.Random(seed ^ 0x5A5A5A5A)
    out = bytearray()
    cycles = 0

    async def sender(ctx):
        nonlocal cycles
        i = 0
        idle = 0
        while cycles < max_cycles:
            if i < len(beats) and rng_in.random() >= gaps:
                ctx.set(dut.i_stream.valid, 1)
                ctx.set(dut.i_stream.payload, beats[i])
            else:
                ctx.set(dut.i_stream.valid, 0)
            took = ctx.get(dut.i_stream.valid) and ctx.get(dut.i_stream.ready)
            if i == len(beats) and not ctx.get(dut.busy) and not ctx.get(dut.o_stream.valid):
                idle += 1
                if idle > 8:
                    return
            else:
                idle = 0
            await ctx.tick()
            cycles += 1
            if took:
                i += 1
        raise AssertionError(f"timeout after {cycles} cycles; {i}/{len(beats)} beats taken, "
                             f"{len(out)} bytes out")

    async def receiver(ctx):
        while True:
            ready = rng_out.random() >= backpressure
            ctx.set(dut.o_stream.ready, ready)
            if ready and ctx.get(dut.o_stream.valid):
                out.extend(ctx.get(dut.o_stream.payload).to_bytes(bb, "little"))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(sender)
    sim.add_testbench(receiver, background=True)
    sim.run()
    return bytes(out), cycles


def check_against_golden(config: AccelConfig, program: Program, *, seed: int = 0,
                         impl: Implementation | None = None, **kwargs) -> tuple[list, int]:
    """Run ``program`` on the RTL and on the golden model; assert identical responses.

    Timing counters are checked for ``COMPUTE_CYCLES <= BUSY_CYCLES <= CYCLES`` and then
    ignored; so is the ``tx_crc`` of a SYNC with counters (it covers them), after every link
    trailer of the RTL's answer was checked against the bytes it covers (``check_link``).
    ``impl`` replaces the config's :class:`Implementation` profile (default: keep it).
    Returns (parsed RTL responses, cycles).
    """
    if impl is not None:
        config = dataclasses.replace(config, impl=impl)
    stream = program.to_bytes()
    want = GoldenMachine(config).run(stream)
    got, cycles = run_accelerator(config, stream, seed=seed, dut=Accelerator(config), **kwargs)
    assert len(got) == len(want), f"seed {seed}: {len(got)} response bytes, expected {len(want)}"
    check_link(config, stream, got)
    got_items = parse_responses(config, program, got)
    want_items = parse_responses(config, program, want)
    for index, (g, w) in enumerate(zip(got_items, want_items, strict=True)):
        where = f"seed {seed}, instruction {index} ({program[index][0]!r})"
        if isinstance(w, StatusReport):
            if g.counters is not None:
                c = g.counters
                assert (c[Counter.COMPUTE_CYCLES] <= c[Counter.BUSY_CYCLES]
                        <= c[Counter.CYCLES]), f"{where}: implausible timing counters {c}"
                g = StatusReport(**{**g.__dict__, "tx_crc": w.tx_crc, "counters": {
                    k: (0 if k in TIMING else v) for k, v in c.items()}})
            assert g == w, f"{where}: status {g} != golden {w}"
        elif hasattr(w, "shape"):
            assert (g == w).all(), f"{where}: STORE data differs\n{g}\n!= golden\n{w}"
        else:
            assert g == w, f"{where}: {g!r} != golden {w!r}"
    return got_items, cycles
