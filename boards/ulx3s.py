"""ULX3S (ECP5 LFE5U-85F): the ``ecp5`` preset, the array on MULT18X18D DSPs.

Host link: the FT231X UART (M1 = rx, L4 = tx). LEDs: 0 = heartbeat (~1 Hz: clock and reset
alive), 1 = busy (stretched), 2 = accelerator error or a silence resync (stretched), 3 = UART
receive error (FIFO overflow or framing).
"""

from amaranth.hdl import Signal
from amaranth.lib import io
from amaranth_boards.ulx3s import ULX3S_85F_Platform

from .board import BoardTop
from .clocking import ecp5_pll, ecp5_pll_params, pll_sync_domain

__all__ = ["ULX3S_85F_Platform", "ULX3STop", "ULX3SBuildPlatform"]


class ULX3SBuildPlatform(ULX3S_85F_Platform):
    """``ULX3S_85F_Platform`` that does not demand ``openFPGALoader`` just to build.

    amaranth-boards lists the programmer among the required tools, so ``build()`` refuses to run
    without it even with ``do_program=False``. Programming still goes through
    ``toolchain_program`` (``OPENFPGALOADER`` names the tool).
    """

    @property
    def required_tools(self):
        return [tool for tool in super().required_tools if tool != "openFPGALoader"]


class ULX3STop(BoardTop):
    """Board top for the ULX3S-85F; the sync clock comes from EHXPLLL (40 MHz default).

    40 MHz: the routed ``ecp5`` preset reached 50.7 MHz at nextpnr seed 1 and seeds vary by
    10-30 %, so 40 MHz meets timing with margin; it divides the 1 Mbaud link exactly (40).

    See :class:`~tinyaccel.boards.board.BoardTop` for the parameters.
    """

    name = "ulx3s-85f"
    default_config = "ecp5"
    board_clock_hz = 25e6
    default_clock_hz = 40e6

    def _pll_params(self, clock_hz):
        return ecp5_pll_params(self.board_clock_hz, clock_hz)

    def _add_pll_domain(self, m, platform):
        m.submodules.clk25 = clk25 = io.Buffer("i", platform.request("clk25", 0, dir="-"))
        clk = Signal(name="pll_clk")
        lock = Signal(name="pll_lock")
        m.submodules.pll = ecp5_pll(self.pll, clk25.i, clk, lock)
        pll_sync_domain(m, clk, lock, self.pll.out_hz)

    def _status_leds(self, m, platform, *, busy, error, link_error, alive):
        for i, value in enumerate((alive, busy, error, link_error)):
            self._led(m, platform, "led", i, value)
