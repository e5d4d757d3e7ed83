"""StripeEncoderPipeline and StripeEncoderSerial against tinyaccel.sim.numerics.sgq_encode
(section 8), byte for byte with the CRC-32 trailer, on an OUT memory of its own, with random
back-pressure on the response stream."""

import zlib

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module, unsigned
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator
from hw_tb import seed_from_env, small_config

from tinyaccel.hw.crc import StreamCrc
from tinyaccel.hw.isa import SGQ_MODE_BITS, Buffer, SgqMode
from tinyaccel.hw.scratchpads import geometry
from tinyaccel.hw.sgq_encoder import StripeEncoderPipeline
from tinyaccel.hw.sgq_serial import StripeEncoderSerial
from tinyaccel.protocol import sgq_frame
from tinyaccel.sim.numerics import sgq_encode, sgq_stripe_modes

CONFIGS = {
    "cols4": small_config(),  # 16-bit host beats, like the iCE40
    "cols8": small_config(rows=8, cols=8, host_width=64, requant_lanes=1),
    "cols16": small_config(rows=8, cols=16, host_width=64, requant_lanes=2),  # like the ECP5
}


class _Bench(Elaboratable):
    def __init__(self, config, words, serial, held_cmd=False):
        self.dut = (StripeEncoderSerial(config, held_cmd=held_cmd) if serial
                    else StripeEncoderPipeline(config))
        self._geom = geometry(config, Buffer.OUT)
        self._words = words

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = self.dut
        m.submodules.mem = mem = Memory(shape=unsigned(self._geom.width), depth=self._geom.depth,
                                        init=self._words)
        port = mem.read_port()
        m.d.comb += [port.addr.eq(dut.rd_out.addr), port.en.eq(dut.rd_out.en),
                     dut.rd_out.data.eq(port.data)]
        return m


#: Words 0..9 of OUT: five stripes of two words (the low value, then low + span) whose spans
#: just fit BASE (a group base of -128), 1-, 2-, 4- and 8-bit codes at shift 0.
MODE_SPANS = (0, 1, 3, 15, 255)


def _out_values(rng, cfg):
    """OUT contents with the cases the encoder distinguishes: BASE stripes (all zero after
    ReLU), two neighbouring levels (1-bit codes), narrow ranges at various offsets, full range,
    constants at the extremes; the first 10 words hold one stripe of each mode."""
    depth = geometry(cfg, Buffer.OUT).depth
    out = rng.integers(-128, 128, (depth, cfg.cols), dtype=np.int8)
    kinds = rng.integers(0, 7, depth)
    for w in range(depth):
        if kinds[w] == 0:
            out[w] = 0
        elif kinds[w] == 1:
            out[w] = rng.integers(0, 4, cfg.cols)
        elif kinds[w] == 2:
            lo = rng.integers(-128, 100)
            out[w] = rng.integers(lo, lo + rng.integers(1, 29), cfg.cols)
        elif kinds[w] == 3:
            out[w] = rng.choice([-128, 127])
        elif kinds[w] == 4:
            out[w] = rng.integers(0, 2, cfg.cols) + rng.integers(-128, 127)
    for i, span in enumerate(MODE_SPANS):
        lo = -128 if span in (0, 255) else int(rng.integers(-127, 128 - span))
        out[2 * i], out[2 * i + 1] = lo, lo + span
    return out


def _commands(rng, cfg, n):
    depth = geometry(cfg, Buffer.OUT).depth
    cmds = [(0, 0, 1, 3, 0), (0, 5, 5, 2, 1)]  # empty group; not executed (zero length)
    cmds += [(0, 2 * len(MODE_SPANS), 2, 0, 0), (0, 2 * len(MODE_SPANS), 2, 7, 0)]  # all modes
    for _ in range(n):
        stripe_len = int(rng.choice([1, 1, 2, 3, 4, 8]))
        stripes = int(rng.integers(1, depth // stripe_len + 1))
        stripes = min(stripes, int(rng.integers(1, 6)))
        count = stripes * stripe_len
        addr = int(rng.integers(0, depth - count + 1))
        cmds.append((addr, count, stripe_len, int(rng.integers(0, 8)), 0))
    return cmds


@pytest.mark.parametrize("serial,held", [(False, False), (True, False), (True, True)],
                         ids=["words", "serial", "serial-held"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stripe_encoder(name, serial, held):
    """The command stays on offer until the encoder is done, as the dispatcher of compact builds
    keeps it (``held_cmd`` relies on that)."""
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    cfg = CONFIGS[name]
    out = _out_values(rng, cfg)
    words = [int.from_bytes(row.tobytes(), "little") for row in out]
    cmds = _commands(rng, cfg, 12 if serial else 20)
    bench = _Bench(cfg, words, serial, held)
    dut = bench.dut
    bb = cfg.beat_bytes
    got = []

    async def driver(ctx):
        for addr, count, stripe_len, max_shift, zero in cmds:
            while ctx.get(dut.ctrl.busy[0]):
                await ctx.tick()
            for _ in range(int(rng.integers(0, 3))):
                await ctx.tick()
            ctx.set(dut.ctrl.cmd, {"operands": {"out_addr": addr, "count": count,
                                                "stripe_len": stripe_len,
                                                "max_shift": max_shift},
                                   "zero": zero})
            ctx.set(dut.ctrl.start, 1)
            await ctx.tick()
            ctx.set(dut.ctrl.start, 0)
            response = bytearray()
            got.append(response)
            idle = 0
            while idle < 4:
                ready = rng.random() >= 0.3
                ctx.set(dut.o_stream.ready, ready)
                if ready and ctx.get(dut.o_stream.valid):
                    response.extend(ctx.get(dut.o_stream.payload).to_bytes(bb, "little"))
                idle = 0 if ctx.get(dut.ctrl.busy[0]) or ctx.get(dut.o_stream.valid) else idle + 1
                await ctx.tick()

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(driver)
    sim.run()

    widths = set()
    for (addr, count, stripe_len, max_shift, zero), response in zip(cmds, got, strict=True):
        values = out[addr:addr + count]
        payload = b"" if zero else sgq_encode(values, stripe_len, max_shift)
        want = sgq_frame(cfg, payload)
        assert bytes(response) == want, (
            f"seed {seed}: SGQ out_addr={addr} count={count} stripe_len={stripe_len} "
            f"max_shift={max_shift} zero={zero}:\n{bytes(response).hex()}\n!= golden\n"
            f"{want.hex()}")
        # the CRC trailer, checked on its own: zlib's CRC-32 of the beats before it
        body = len(response) - max(bb, 4)
        assert response[body:body + 4] == zlib.crc32(response[:body]).to_bytes(4, "little")
        if not zero and count:
            widths |= {SGQ_MODE_BITS.get(SgqMode(m), 0)
                       for m in sgq_stripe_modes(values, stripe_len, max_shift)[1]}
    print(f"code widths sent: {sorted(widths)}")
    assert widths == {0, 1, 2, 4, 8}


@pytest.mark.parametrize("width", [1, 16, 64])
def test_stream_crc_is_zlibs_crc32(width):
    """StreamCrc over little-endian words of any width (bits LSB first for width 1) is zlib's
    CRC-32 of the bytes; ``start`` restarts it between two messages."""
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    messages = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 8, 40)]
    dut = StreamCrc(width)
    got = []

    async def tb(ctx):
        for msg in messages:
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            words = int.from_bytes(msg, "little")
            for i in range(0, 8 * len(msg), width):
                ctx.set(dut.valid, rng.random() < 0.7)  # idle cycles change nothing
                while not ctx.get(dut.valid):
                    await ctx.tick()
                    ctx.set(dut.valid, rng.random() < 0.7)
                ctx.set(dut.data, words >> i & ((1 << width) - 1))
                await ctx.tick()
            ctx.set(dut.valid, 0)
            got.append(ctx.get(dut.crc))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert got == [zlib.crc32(msg) for msg in messages], f"seed {seed}"
