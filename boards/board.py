"""What every board top shares: the accelerator, the UART bridge on the FTDI link, status LEDs."""

from collections.abc import Callable

from amaranth.hdl import Elaboratable, Module, ResetInserter, Signal
from amaranth.lib import io, wiring
from amaranth.lib.wiring import In, Out

from tinyaccel.errors import ConfigError
from tinyaccel.hw.config import AccelConfig, get_config

from .link import DEFAULT_BAUD, LinkSpec, link_for
from .uart import UARTBridge

__all__ = ["DEFAULT_BAUD", "BoardTop", "UARTAccelerator", "default_accelerator"]

_DEFAULT_LINK = LinkSpec()
_BOARD_CLOCK = object()  # sentinel: "the board's default clock_hz"


def default_accelerator(config: AccelConfig) -> wiring.Component:
    """``tinyaccel.hw.top.Accelerator(config)``, imported when a top is elaborated."""
    from tinyaccel.hw.top import Accelerator
    return Accelerator(config)


class UARTAccelerator(wiring.Component):
    """The accelerator behind the UART bridge: a board adds only clocks, pins and LEDs.

    Parameters
    ----------
    config:
        Accelerator configuration.
    divisor:
        Clock cycles per UART bit (:meth:`~tinyaccel.boards.link.LinkSpec.divisor`).
    fifo_depth:
        Bytes of UART receive buffer (default: ``LinkSpec().rx_fifo_bytes``; a board's is
        ``link_for(board).rx_fifo_bytes``).
    silence_cycles:
        Cycles of input silence in the middle of an instruction after which the bridge resets
        the accelerator (default: ``LinkSpec().silence_cycles(divisor)``).
    accelerator:
        ``callable(config) -> component`` with the ports of ``tinyaccel.hw.top.Accelerator``
        (``in_boundary`` among them); default: that class.

    Members
    -------
    rx : In(1)
        Serial line from the host.
    tx : Out(1)
        Serial line to the host.
    busy, error : Out(1)
        The accelerator's.
    link_error : Out(1)
        Sticky: the UART dropped a received byte (FIFO overflow or framing error).
    armed : Out(1)
        The resync's silence count is running (see :class:`~tinyaccel.boards.uart.UARTBridge`).
    resync : Out(1)
        One-cycle pulse: the silence resync fired and resets the accelerator.
    """

    rx: In(1, init=1)
    tx: Out(1, init=1)
    busy: Out(1)
    error: Out(1)
    link_error: Out(1)
    armed: Out(1)
    resync: Out(1)

    def __init__(self, config: str | AccelConfig, divisor: int, *, fifo_depth: int | None = None,
                 silence_cycles: int | None = None,
                 accelerator: Callable[[AccelConfig], wiring.Component] | None = None):
        self.config = get_config(config)
        self._divisor = divisor
        self._fifo_depth = _DEFAULT_LINK.rx_fifo_bytes if fifo_depth is None else fifo_depth
        self._silence_cycles = (_DEFAULT_LINK.silence_cycles(divisor) if silence_cycles is None
                                else silence_cycles)
        self._accelerator = default_accelerator if accelerator is None else accelerator
        super().__init__()

    @property
    def silence_cycles(self) -> int:
        """Cycles of mid-instruction input silence before the resync."""
        return self._silence_cycles

    def elaborate(self, platform):
        m = Module()
        m.submodules.bridge = bridge = UARTBridge(self.config.host_width, self._divisor,
                                                  fifo_depth=self._fifo_depth,
                                                  silence_cycles=self._silence_cycles)
        accel = self._accelerator(self.config)
        m.submodules.accelerator = ResetInserter(bridge.accel_reset)(accel)
        wiring.connect(m, bridge.o_stream, accel.i_stream)
        wiring.connect(m, accel.o_stream, bridge.i_stream)
        m.d.comb += [
            bridge.rx.eq(self.rx),
            bridge.in_boundary.eq(accel.in_boundary),
            self.tx.eq(bridge.tx),
            self.busy.eq(accel.busy),
            self.error.eq(accel.error),
            self.link_error.eq(bridge.overflow | bridge.framing_error),
            self.armed.eq(bridge.armed),
            self.resync.eq(bridge.resync),
        ]
        return m


class BoardTop(Elaboratable):
    """Accelerator + UART bridge + LEDs for one board; subclasses add the clock and the pins.

    Parameters
    ----------
    config:
        Accelerator configuration or preset name; defaults to the board's preset.
    clock_hz:
        Frequency of the ``sync`` domain made by the PLL. ``None`` runs at the board clock
        without a PLL. Defaults to the board's ``default_clock_hz``.
    link:
        The host link (:class:`~tinyaccel.boards.link.LinkSpec`: baud, receive FIFO, resync
        silence); defaults to the board's, ``link_for(name)``.
    baud:
        Overrides the link's UART rate (8N1): ``link.with_baud(baud)``.
    accelerator:
        ``callable(config) -> component`` with the ports of ``tinyaccel.hw.top.Accelerator``;
        defaults to that class.
    """

    #: board name, as in ``tinyaccel.boards.link.LINKS`` and ``tinyaccel.boards.build.BOARDS``
    name: str
    #: preset name used when no ``config`` is given
    default_config: str
    #: frequency of the oscillator on the board
    board_clock_hz: float
    #: PLL output when ``clock_hz`` is not given
    default_clock_hz: float | None

    def __init__(self, config: str | AccelConfig | None = None, *, clock_hz=_BOARD_CLOCK,
                 link: LinkSpec | None = None, baud: int | None = None,
                 accelerator: Callable[[AccelConfig], wiring.Component] | None = None):
        self.config = get_config(self.default_config if config is None else config)
        self.clock_hz = self.default_clock_hz if clock_hz is _BOARD_CLOCK else clock_hz
        if self.clock_hz is not None and self.clock_hz <= 0:
            raise ConfigError(f"clock_hz={clock_hz!r} must be positive (or None: board clock)")
        self.link = (link_for(self.name) if link is None else link).with_baud(baud)
        self._accelerator = default_accelerator if accelerator is None else accelerator
        self.pll = None if self.clock_hz is None else self._pll_params(self.clock_hz)

    @property
    def frequency(self) -> float:
        """Frequency of the ``sync`` domain in Hz (the PLL's achievable output, or the board's)."""
        return self.board_clock_hz if self.pll is None else self.pll.out_hz

    @property
    def baud(self) -> int:
        """UART rate of the host link."""
        return self.link.baud

    @property
    def divisor(self) -> int:
        """Clock cycles per UART bit."""
        return self.link.divisor(self.frequency)

    @property
    def silence_cycles(self) -> int:
        """Cycles of input silence in the middle of an instruction before the bridge resyncs."""
        return self.link.silence_cycles(self.divisor)

    # -- board specifics -----------------------------------------------------------------------

    def _pll_params(self, clock_hz):
        raise NotImplementedError

    def _add_pll_domain(self, m, platform):
        raise NotImplementedError

    def _status_leds(self, m, platform, *, busy, error, link_error, alive):
        raise NotImplementedError

    @staticmethod
    def _led(m, platform, name, number, value):
        m.submodules[f"{name}_{number}"] = led = io.Buffer("o", platform.request(name, number,
                                                                                 dir="-"))
        m.d.comb += led.o.eq(value)

    # -- shared ----------------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        if self.pll is not None:
            self._add_pll_domain(m, platform)

        m.submodules.core = core = UARTAccelerator(self.config, self.divisor,
                                                   fifo_depth=self.link.rx_fifo_bytes,
                                                   silence_cycles=self.silence_cycles,
                                                   accelerator=self._accelerator)
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = uart_rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = uart_tx = io.Buffer("o", uart.tx)
        m.d.comb += [core.rx.eq(uart_rx.i), uart_tx.o.eq(core.tx)]

        frame, alive = self._led_frames(m)
        busy = self._stretch(m, frame, core.busy)
        resynced = self._stretch(m, frame, core.resync)
        self._status_leds(m, platform, busy=busy, error=core.error | resynced,
                          link_error=core.link_error, alive=alive)
        return m

    def _led_frames(self, m):
        """A one-cycle ``frame`` pulse every ~40 ms and a heartbeat (~0.6 s period).

        Two short counters with a registered wrap between them, so that none of this is ever the
        critical path of the design (the accelerator's is the one worth measuring).
        """
        frame_bits = max(2, (int(0.04 * self.frequency) - 1).bit_length())
        low_bits = min(12, frame_bits - 1)
        low = Signal(low_bits)
        low_wrap = Signal()
        high = Signal(frame_bits - low_bits)
        frame = Signal()  # one cycle every 2**frame_bits cycles
        beat = Signal(4)
        m.d.sync += [
            low.eq(low + 1),
            low_wrap.eq(low == (1 << low_bits) - 1),
            frame.eq(low_wrap & (high == (1 << len(high)) - 1)),
        ]
        with m.If(low_wrap):
            m.d.sync += high.eq(high + 1)
        with m.If(frame):
            m.d.sync += beat.eq(beat + 1)
        return frame, beat[-1]

    @staticmethod
    def _stretch(m, frame, pulses):
        """``pulses`` held for the rest of the frame and the next one: a one-cycle pulse lights
        an LED for 40..80 ms."""
        seen = Signal()  # high at any time in the current frame
        shown = Signal()  # high at any time in the previous frame
        with m.If(frame):
            m.d.sync += [shown.eq(seen | pulses), seen.eq(pulses)]
        with m.Elif(pulses):
            m.d.sync += seen.eq(1)
        return shown | seen
