"""UART <-> host stream bridge: the FTDI serial link of a board carries the host protocol bytes.

The byte protocol of ``docs/architecture.md`` section 9 is sent over an 8N1 UART. This module
turns the serial line into the accelerator's host stream and back::

    rx pin -> UARTReceiver -> RX FIFO -> ByteWidener ----> o_stream  (to Accelerator.i_stream)
    tx pin <- UARTTransmitter <------- ByteNarrower <---- i_stream  (from Accelerator.o_stream)

Beats carry ``host_width // 8`` bytes, byte 0 (the first on the wire) in bits 7..0.

A UART cannot be back-pressured: the receiver produces a byte whenever one arrives. The RX FIFO
absorbs the bytes the accelerator is not ready for (it stalls ``i_stream`` while a unit is busy);
a byte that arrives when the FIFO is full is dropped and sets the sticky ``overflow`` flag. The
host must therefore not run more than ``fifo_depth`` bytes ahead of what the accelerator has
consumed (``tinyaccel.boards.link.LinkSpec.window``).

A host that stops in the middle of an instruction (a lost byte, an interrupted program) would
leave the accelerator waiting for the rest forever. The bridge's *silence resync* ends that: when
the accelerator waits in the middle of an instruction (its ``in_boundary`` is 0, or the widener
holds part of a beat) with nothing queued for it, and no byte arrives for ``silence_cycles``, the
bridge pulses ``resync`` and holds ``accel_reset`` (and its own widener and narrower in reset)
for :data:`RESYNC_RESET_CYCLES`. The next host byte is then the first byte of an instruction.
At an instruction boundary nothing is ever reset, however long the host is silent.
"""

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from tinyaccel.errors import ConfigError

__all__ = [
    "MIN_DIVISOR", "RESYNC_RESET_CYCLES", "baud_divisor", "UARTReceiver", "UARTTransmitter",
    "ByteFIFO", "ByteWidener", "ByteNarrower", "UARTBridge",
]

#: Smallest clock cycles per bit the receiver supports (it samples once, at mid-bit).
MIN_DIVISOR = 4
#: Cycles the silence resync holds the accelerator, widener and narrower in reset.
RESYNC_RESET_CYCLES = 4
#: Largest baud rate error (relative) :func:`baud_divisor` accepts; 8N1 tolerates ~4 % in total.
MAX_BAUD_ERROR = 0.02


def baud_divisor(clk_hz: float, baud: int) -> int:
    """Clock cycles per UART bit for a ``baud`` rate from a ``clk_hz`` clock.

    Raises
    ------
    ConfigError
        When the clock is too slow for the rate, or the rounded divisor misses the rate by more
        than ``MAX_BAUD_ERROR``.
    """
    if baud <= 0 or clk_hz <= 0:
        raise ConfigError(f"UART: baud={baud!r} and clk_hz={clk_hz!r} must be positive")
    divisor = round(clk_hz / baud)
    if divisor < MIN_DIVISOR:
        raise ConfigError(f"UART: {baud} baud needs at least {MIN_DIVISOR} cycles per bit; "
                          f"a {clk_hz / 1e6:g} MHz clock gives {clk_hz / baud:.2f}")
    error = abs(clk_hz / divisor - baud) / baud
    if error > MAX_BAUD_ERROR:
        raise ConfigError(f"UART: {baud} baud from {clk_hz / 1e6:g} MHz with divisor {divisor} "
                          f"is off by {100 * error:.1f} % (limit {100 * MAX_BAUD_ERROR:g} %)")
    return divisor


def _check_divisor(divisor):
    if not isinstance(divisor, int) or divisor < MIN_DIVISOR:
        raise ConfigError(f"UART: divisor={divisor!r} must be an int >= {MIN_DIVISOR}")


def _check_width(width):
    if not isinstance(width, int) or width <= 0 or width % 8:
        raise ConfigError(f"host stream width={width!r} must be a positive multiple of 8")


class UARTReceiver(wiring.Component):
    """8N1 UART receiver.

    The line is synchronized with two flip-flops, a start bit is confirmed at its middle
    (``divisor // 2`` cycles after the falling edge) and every later bit is sampled one
    ``divisor`` further on. The byte is offered at the middle of the stop bit, which leaves half
    a bit for the next start edge.

    Members
    -------
    rx : In(1)
        Serial line (idle high), asynchronous to the domain.
    o_stream : Out(stream.Signature(8))
        Received bytes. Held until accepted; a byte that completes while the previous one is
        still waiting is dropped.
    overflow : Out(1)
        Sticky: a byte was dropped.
    framing_error : Out(1)
        Sticky: a stop bit was low (wrong baud rate or a break); that byte is dropped.
    """

    rx: In(1, init=1)
    o_stream: Out(stream.Signature(8))
    overflow: Out(1)
    framing_error: Out(1)

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self._divisor = divisor
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self._divisor

        rx = Signal(init=1)
        m.submodules.rx_sync = FFSynchronizer(self.rx, rx, init=1)

        timer = Signal(range(d))
        bit = Signal(range(8))
        shreg = Signal(8)

        with m.If(self.o_stream.ready):
            m.d.sync += self.o_stream.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    m.d.sync += timer.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [timer.eq(d - 1), bit.eq(0)]
                    # A start bit that is high again at its middle was a glitch.
                    with m.If(rx):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    # LSB first: shift in from the top.
                    m.d.sync += [timer.eq(d - 1), bit.eq(bit + 1), shreg.eq(Cat(shreg[1:], rx))]
                    with m.If(bit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(rx):
                        with m.If(self.o_stream.valid & ~self.o_stream.ready):
                            m.d.sync += self.overflow.eq(1)
                        with m.Else():
                            m.d.sync += [self.o_stream.payload.eq(shreg),
                                         self.o_stream.valid.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += self.framing_error.eq(1)
                        m.next = "BREAK"
            with m.State("BREAK"):
                # Wait for the line to idle before looking for the next start bit.
                with m.If(rx):
                    m.next = "IDLE"
        return m


class UARTTransmitter(wiring.Component):
    """8N1 UART transmitter: one start bit, eight data bits LSB first, one stop bit.

    Members
    -------
    i_stream : In(stream.Signature(8))
        Bytes to send; accepted when the previous frame has finished.
    tx : Out(1)
        Serial line, idle high.
    """

    i_stream: In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self._divisor = divisor
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self._divisor

        frame = Signal(10, init=0x3FF)  # stop, data[7:0], start; shifted out LSB first
        bits_left = Signal(range(11))
        timer = Signal(range(d))

        m.d.comb += [self.tx.eq(frame[0]), self.i_stream.ready.eq(bits_left == 0)]

        with m.If(self.i_stream.valid & self.i_stream.ready):
            m.d.sync += [
                frame.eq(Cat(Const(0, 1), self.i_stream.payload, Const(1, 1))),
                bits_left.eq(10),
                timer.eq(d - 1),
            ]
        with m.Elif(bits_left != 0):
            m.d.sync += timer.eq(timer - 1)
            with m.If(timer == 0):
                m.d.sync += [
                    frame.eq(Cat(frame[1:], Const(1, 1))),
                    bits_left.eq(bits_left - 1),
                    timer.eq(d - 1),
                ]
        return m


class ByteFIFO(wiring.Component):
    """``depth`` bytes, first in first out: ``depth - 1`` in a block RAM and one in the output
    register, as ``amaranth.lib.fifo.SyncFIFOBuffered`` holds them, in less logic (the pointers
    wrap by themselves when ``depth`` is a power of two).

    Members
    -------
    w_stream : In(stream.Signature(8))
        Accepted while fewer than ``depth - 1`` bytes are in the RAM.
    r_stream : Out(stream.Signature(8))
    empty : Out(1)
        No byte held, neither in the RAM nor in the output register.
    """

    w_stream: In(stream.Signature(8))
    r_stream: Out(stream.Signature(8))
    empty: Out(1)

    def __init__(self, depth: int):
        if not isinstance(depth, int) or depth < 2:
            raise ConfigError(f"FIFO: depth={depth!r} must be an int >= 2")
        self._depth = depth
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        depth = self._depth
        # A byte is read only once it is in the RAM, and the RAM never fills (depth - 1 of its
        # depth words), so a read never meets the write of its address: a combinational read
        # into the output register with `no_rw_check` maps to block RAM without read-first logic.
        m.submodules.mem = mem = Memory(shape=8, depth=depth, init=[],
                                        attrs={"no_rw_check": 1})
        rp = mem.read_port(domain="comb")
        wp = mem.write_port()
        w_ptr = Signal(range(depth))
        r_ptr = Signal(range(depth))
        level = Signal(range(depth))  # bytes in the RAM

        def advance(ptr):
            return ptr + 1 if depth & (depth - 1) == 0 else Mux(ptr == depth - 1, 0, ptr + 1)

        write = self.w_stream.valid & self.w_stream.ready
        read = (level != 0) & (~self.r_stream.valid | self.r_stream.ready)
        m.d.comb += [
            self.w_stream.ready.eq(level != depth - 1),
            wp.addr.eq(w_ptr), wp.data.eq(self.w_stream.payload), wp.en.eq(write),
            rp.addr.eq(r_ptr),
            self.empty.eq((level == 0) & ~self.r_stream.valid),
        ]
        with m.If(write):
            m.d.sync += w_ptr.eq(advance(w_ptr))
        with m.If(read):
            m.d.sync += [r_ptr.eq(advance(r_ptr)), self.r_stream.payload.eq(rp.data),
                         self.r_stream.valid.eq(1)]
        with m.Elif(self.r_stream.ready):
            m.d.sync += self.r_stream.valid.eq(0)
        m.d.sync += level.eq(level + write - read)
        return m


class ByteWidener(wiring.Component):
    """Packs bytes into ``width``-bit beats; the first byte lands in bits 7..0.

    Full throughput: a byte is accepted every cycle, also in the cycle in which a finished beat
    leaves.

    Members
    -------
    i_stream : In(stream.Signature(8))
    o_stream : Out(stream.Signature(width))
    partial : Out(1)
        Some bytes of a beat are held, not all of them.
    """

    def __init__(self, width: int):
        _check_width(width)
        self._width = width
        super().__init__({
            "i_stream": In(stream.Signature(8)),
            "o_stream": Out(stream.Signature(unsigned(width))),
            "partial": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        n = self._width // 8

        data = Signal(self._width)
        count = Signal(range(n + 1))
        full = count == n

        m.d.comb += [
            self.o_stream.payload.eq(data),
            self.o_stream.valid.eq(full),
            self.i_stream.ready.eq(~full | self.o_stream.ready),
            self.partial.eq((count != 0) & ~full),
        ]
        taken = self.o_stream.valid & self.o_stream.ready
        with m.If(self.i_stream.valid & self.i_stream.ready):
            # Shift right: after n bytes the first one has moved down to bits 7..0. Leftovers of
            # a beat that leaves this cycle are shifted out before the next beat is full.
            m.d.sync += data.eq(Cat(data[8:], self.i_stream.payload))
            with m.If(taken):
                m.d.sync += count.eq(1)
            with m.Else():
                m.d.sync += count.eq(count + 1)
        with m.Elif(taken):
            m.d.sync += count.eq(0)
        return m


class ByteNarrower(wiring.Component):
    """Splits ``width``-bit beats into bytes, bits 7..0 first.

    Full throughput: a new beat is accepted in the cycle its predecessor's last byte leaves.

    Members
    -------
    i_stream : In(stream.Signature(width))
    o_stream : Out(stream.Signature(8))
    """

    def __init__(self, width: int):
        _check_width(width)
        self._width = width
        super().__init__({
            "i_stream": In(stream.Signature(unsigned(width))),
            "o_stream": Out(stream.Signature(8)),
        })

    def elaborate(self, platform):
        m = Module()
        n = self._width // 8

        data = Signal(self._width)
        left = Signal(range(n + 1))  # bytes of the current beat not yet sent

        m.d.comb += [
            self.o_stream.payload.eq(data[:8]),
            self.o_stream.valid.eq(left != 0),
            self.i_stream.ready.eq((left == 0) | ((left == 1) & self.o_stream.ready)),
        ]
        with m.If(self.i_stream.valid & self.i_stream.ready):
            m.d.sync += [data.eq(self.i_stream.payload), left.eq(n)]
        with m.Elif(self.o_stream.valid & self.o_stream.ready):
            m.d.sync += [data.eq(data >> 8), left.eq(left - 1)]
        return m


class UARTBridge(wiring.Component):
    """The FTDI UART as the accelerator's host stream, with the silence resync.

    Parameters
    ----------
    host_width:
        Beat width of the host stream (``AccelConfig.host_width``).
    divisor:
        Clock cycles per UART bit (:func:`baud_divisor`).
    fifo_depth:
        Bytes the RX FIFO holds while the accelerator stalls its input.
    silence_cycles:
        Cycles of input silence in the middle of an instruction after which the bridge resyncs
        (``tinyaccel.boards.link.LinkSpec.silence_cycles``); ``None``: never.

    Members
    -------
    rx : In(1)
        Serial line from the host (asynchronous).
    tx : Out(1)
        Serial line to the host.
    o_stream : Out(stream.Signature(host_width))
        Beats to ``Accelerator.i_stream``.
    i_stream : In(stream.Signature(host_width))
        Beats from ``Accelerator.o_stream``.
    in_boundary : In(1)
        ``Accelerator.in_boundary``: its input is at an instruction boundary.
    overflow : Out(1)
        Sticky: a received byte was dropped because the RX FIFO was full.
    framing_error : Out(1)
        Sticky: a received byte had a low stop bit.
    armed : Out(1)
        The silence count is running: the accelerator waits in the middle of an instruction and
        nothing is queued for it.
    resync : Out(1)
        One-cycle pulse: ``silence_cycles`` consecutive armed cycles have passed.
    accel_reset : Out(1)
        Reset the accelerator: :data:`RESYNC_RESET_CYCLES` cycles from the ``resync`` pulse on.
    """

    def __init__(self, host_width: int, divisor: int, *, fifo_depth: int = 512,
                 silence_cycles: int | None = None):
        _check_width(host_width)
        _check_divisor(divisor)
        if not isinstance(fifo_depth, int) or fifo_depth < 2:
            raise ConfigError(f"UART: fifo_depth={fifo_depth!r} must be an int >= 2")
        if silence_cycles is not None and (not isinstance(silence_cycles, int)
                                           or silence_cycles < 2):
            raise ConfigError(f"UART: silence_cycles={silence_cycles!r} must be an int >= 2 "
                              "(or None: no resync)")
        self._host_width = host_width
        self._divisor = divisor
        self._fifo_depth = fifo_depth
        self._silence_cycles = silence_cycles
        super().__init__({
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "o_stream": Out(stream.Signature(unsigned(host_width))),
            "i_stream": In(stream.Signature(unsigned(host_width))),
            "in_boundary": In(1, init=1),
            "overflow": Out(1),
            "framing_error": Out(1),
            "armed": Out(1),
            "resync": Out(1),
            "accel_reset": Out(1),
        })

    @property
    def host_width(self) -> int:
        return self._host_width

    @property
    def divisor(self) -> int:
        return self._divisor

    @property
    def silence_cycles(self) -> int | None:
        return self._silence_cycles

    def elaborate(self, platform):
        m = Module()

        # The resync resets the widener and the narrower with the accelerator: a partial beat
        # on either side belongs to the abandoned instruction.
        resetting = Signal()
        m.submodules.receiver = receiver = UARTReceiver(self._divisor)
        m.submodules.rx_fifo = rx_fifo = ByteFIFO(self._fifo_depth)
        widener = ByteWidener(self._host_width)
        narrower = ByteNarrower(self._host_width)
        m.submodules.widener = ResetInserter(resetting)(widener)
        m.submodules.narrower = ResetInserter(resetting)(narrower)
        m.submodules.transmitter = transmitter = UARTTransmitter(self._divisor)

        m.d.comb += [
            receiver.rx.eq(self.rx),
            self.tx.eq(transmitter.tx),
            self.overflow.eq(receiver.overflow),
            self.framing_error.eq(receiver.framing_error),
            self.accel_reset.eq(resetting),
        ]
        wiring.connect(m, receiver.o_stream, rx_fifo.w_stream)
        wiring.connect(m, widener.o_stream, wiring.flipped(self.o_stream))
        wiring.connect(m, wiring.flipped(self.i_stream), narrower.i_stream)
        # No byte crosses into or out of a block that is held in reset: it would be lost.
        m.d.comb += [
            widener.i_stream.payload.eq(rx_fifo.r_stream.payload),
            widener.i_stream.valid.eq(rx_fifo.r_stream.valid & ~resetting),
            rx_fifo.r_stream.ready.eq(widener.i_stream.ready & ~resetting),
            transmitter.i_stream.payload.eq(narrower.o_stream.payload),
            transmitter.i_stream.valid.eq(narrower.o_stream.valid & ~resetting),
            narrower.o_stream.ready.eq(transmitter.i_stream.ready & ~resetting),
        ]
        if self._silence_cycles is not None:
            self._silence_resync(m, resetting, byte_in=receiver.o_stream.valid,
                                 starved=rx_fifo.empty & ~widener.o_stream.valid,
                                 partial=widener.partial)
        return m

    def _silence_resync(self, m, resetting, *, byte_in, starved, partial):
        """Count the cycles in which the accelerator waits for host bytes in the middle of an
        instruction; pulse ``resync`` after ``silence_cycles`` of them in a row."""
        cycles = self._silence_cycles
        count = Signal(range(cycles))  # armed cycles so far, this one excluded
        hold = Signal(range(RESYNC_RESET_CYCLES))  # reset cycles left after the pulse
        m.d.comb += [
            self.armed.eq(starved & (~self.in_boundary | partial) & ~resetting),
            resetting.eq(self.resync | (hold != 0)),
        ]
        # ``resync`` is a register: it rises in the cycle after the last counted one, i.e.
        # exactly ``cycles`` cycles after ``armed`` first rose. A byte completing in any of
        # those cycles (the receiver offers it to the FIFO) starts the count again.
        m.d.sync += self.resync.eq(0)
        with m.If(~self.armed | byte_in):
            m.d.sync += count.eq(0)
        with m.Elif(count == cycles - 1):
            m.d.sync += [count.eq(0), self.resync.eq(1)]
        with m.Else():
            m.d.sync += count.eq(count + 1)
        with m.If(self.resync):
            m.d.sync += hold.eq(RESYNC_RESET_CYCLES - 1)
        with m.Elif(hold != 0):
            m.d.sync += hold.eq(hold - 1)
