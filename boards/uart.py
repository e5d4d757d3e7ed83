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
consumed; in practice the driver waits for the response of a ``SYNC`` before streaming more data
after a long-running instruction.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from tinyaccel.errors import ConfigError

__all__ = [
    "MIN_DIVISOR", "baud_divisor", "UARTReceiver", "UARTTransmitter", "ByteFIFO", "ByteWidener",
    "ByteNarrower", "UARTBridge",
]

#: Smallest clock cycles per bit the receiver supports (it samples once, at mid-bit).
MIN_DIVISOR = 4
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
    """

    w_stream: In(stream.Signature(8))
    r_stream: Out(stream.Signature(8))

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
    """

    def __init__(self, width: int):
        _check_width(width)
        self._width = width
        super().__init__({
            "i_stream": In(stream.Signature(8)),
            "o_stream": Out(stream.Signature(unsigned(width))),
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
    """The FTDI UART as the accelerator's host stream.

    Parameters
    ----------
    host_width:
        Beat width of the host stream (``AccelConfig.host_width``).
    divisor:
        Clock cycles per UART bit (:func:`baud_divisor`).
    fifo_depth:
        Bytes the RX FIFO holds while the accelerator stalls its input (one iCE40/ECP5 block RAM
        at the default).

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
    overflow : Out(1)
        Sticky: a received byte was dropped because the RX FIFO was full.
    framing_error : Out(1)
        Sticky: a received byte had a low stop bit.
    """

    def __init__(self, host_width: int, divisor: int, *, fifo_depth: int = 512):
        _check_width(host_width)
        _check_divisor(divisor)
        if not isinstance(fifo_depth, int) or fifo_depth < 2:
            raise ConfigError(f"UART: fifo_depth={fifo_depth!r} must be an int >= 2")
        self._host_width = host_width
        self._divisor = divisor
        self._fifo_depth = fifo_depth
        super().__init__({
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "o_stream": Out(stream.Signature(unsigned(host_width))),
            "i_stream": In(stream.Signature(unsigned(host_width))),
            "overflow": Out(1),
            "framing_error": Out(1),
        })

    @property
    def host_width(self) -> int:
        return self._host_width

    @property
    def divisor(self) -> int:
        return self._divisor

    def elaborate(self, platform):
        m = Module()

        m.submodules.receiver = receiver = UARTReceiver(self._divisor)
        m.submodules.rx_fifo = rx_fifo = ByteFIFO(self._fifo_depth)
        m.submodules.widener = widener = ByteWidener(self._host_width)
        m.submodules.narrower = narrower = ByteNarrower(self._host_width)
        m.submodules.transmitter = transmitter = UARTTransmitter(self._divisor)

        m.d.comb += [
            receiver.rx.eq(self.rx),
            self.tx.eq(transmitter.tx),
            self.overflow.eq(receiver.overflow),
            self.framing_error.eq(receiver.framing_error),
        ]
        wiring.connect(m, receiver.o_stream, rx_fifo.w_stream)
        wiring.connect(m, rx_fifo.r_stream, widener.i_stream)
        wiring.connect(m, widener.o_stream, wiring.flipped(self.o_stream))
        wiring.connect(m, wiring.flipped(self.i_stream), narrower.i_stream)
        wiring.connect(m, narrower.o_stream, transmitter.i_stream)
        return m
