"""iCEBreaker (iCE40 UP5K): the ``ice40`` preset, the array on the 8 SB_MAC16 DSPs.

Host link: the FT2232H's second channel (pins 6 = rx, 9 = tx). LEDs: green = busy (stretched),
red = accelerator error, UART receive error (FIFO overflow / framing) or a silence resync
(stretched).
"""

from amaranth.hdl import Signal
from amaranth_boards.icebreaker import ICEBreakerPlatform

from .board import BoardTop
from .clocking import ice40_pll, ice40_pll_params, pll_sync_domain

__all__ = ["ICEBreakerPlatform", "ICEBreakerTop"]


class ICEBreakerTop(BoardTop):
    """Board top for the iCEBreaker; the sync clock comes from SB_PLL40_PAD (30 MHz default).

    See :class:`~tinyaccel.boards.board.BoardTop` for the parameters.
    """

    name = "icebreaker"
    default_config = "ice40"
    board_clock_hz = 12e6
    default_clock_hz = 30e6

    def _pll_params(self, clock_hz):
        return ice40_pll_params(self.board_clock_hz, clock_hz)

    def _add_pll_domain(self, m, platform):
        # The 12 MHz oscillator sits on pin 35, a PLL pad: SB_PLL40_PAD takes the raw pin.
        clk12 = platform.request("clk12", 0, dir="-")
        clk = Signal(name="pll_clk")
        lock = Signal(name="pll_lock")
        m.submodules.pll = ice40_pll(self.pll, clk12.io, clk, lock)
        pll_sync_domain(m, clk, lock, self.pll.out_hz)

    def _status_leds(self, m, platform, *, busy, error, link_error, alive):
        self._led(m, platform, "led_g", 0, busy)
        self._led(m, platform, "led_r", 0, error | link_error)
