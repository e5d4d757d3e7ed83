"""The host link of each board, defined once: read by the board build, the board top, the
simulated board and the driver (``BoardBackend``).

A board's host link is an 8N1 UART through its FTDI chip, with no hardware flow control (neither
board wires CTS). What keeps the board's receive FIFO from overflowing is the driver's pacing
(``docs/architecture.md`` section 9): it never has more than :attr:`LinkSpec.window` bytes on the
way that the board has not acknowledged. What brings a board back after a fault (a lost byte, a
host interrupted in the middle of a LOAD) is the *silence resync*: when the accelerator waits in
the middle of an instruction and no byte arrives for :attr:`LinkSpec.silence_bytes` byte times,
the bridge resets the accelerator, and the next program starts clean.

>>> LINKS["icebreaker"].window
1024
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tinyaccel.errors import ConfigError

from .uart import baud_divisor

__all__ = ["BITS_PER_BYTE", "LinkSpec", "LINKS", "DEFAULT_BAUD", "link_for", "board_for_config"]

#: An 8N1 frame: start bit, eight data bits, stop bit.
BITS_PER_BYTE = 10
#: UART rate of both boards' host link. Their FTDI chips (FT2232H on the iCEBreaker, FT231X on
#: the ULX3S) run it, and it divides the boards' clocks exactly (12, 25, 30, 40, 48 MHz...).
DEFAULT_BAUD = 1_000_000


@dataclass(frozen=True)
class LinkSpec:
    """One board's host link.

    Parameters
    ----------
    baud:
        UART rate (8N1) in both directions.
    rx_fifo_bytes:
        The board's receive FIFO: host bytes it holds while the accelerator does not take its
        input (block RAM; a power of two).
    silence_bytes:
        Byte times of input silence, while the accelerator waits in the middle of an
        instruction, after which the bridge resets the accelerator (the resync).
    """

    baud: int = DEFAULT_BAUD
    rx_fifo_bytes: int = 512
    silence_bytes: int = 20_000

    def __post_init__(self):
        if not isinstance(self.baud, int) or self.baud <= 0:
            raise ConfigError(f"link: baud={self.baud!r} must be a positive int")
        depth = self.rx_fifo_bytes
        if not isinstance(depth, int) or depth < 64 or depth & (depth - 1):
            raise ConfigError(f"link: rx_fifo_bytes={depth!r} must be a power of two >= 64")
        if not isinstance(self.silence_bytes, int) or self.silence_bytes < 16:
            raise ConfigError(f"link: silence_bytes={self.silence_bytes!r} must be an int >= 16")

    @property
    def byte_s(self) -> float:
        """Seconds one byte takes on the line."""
        return BITS_PER_BYTE / self.baud

    @property
    def bytes_per_s(self) -> float:
        """Line rate in bytes per second, each direction."""
        return self.baud / BITS_PER_BYTE

    @property
    def window(self) -> int:
        """Host bytes the driver may have sent past the last point the board acknowledged: the
        receive FIFO, which holds them all even if the accelerator takes none."""
        return self.rx_fifo_bytes

    @property
    def silence_s(self) -> float:
        """Seconds of input silence in the middle of an instruction before the board resyncs."""
        return self.silence_bytes * self.byte_s

    def divisor(self, clk_hz: float) -> int:
        """Clock cycles per UART bit at ``clk_hz`` (:func:`~tinyaccel.boards.uart.baud_divisor`)."""
        return baud_divisor(clk_hz, self.baud)

    def silence_cycles(self, divisor: int) -> int:
        """The resync silence in clock cycles, for a UART of ``divisor`` cycles per bit."""
        return self.silence_bytes * BITS_PER_BYTE * divisor

    def with_baud(self, baud: int | None) -> LinkSpec:
        """This link at another rate (``None``: unchanged)."""
        return self if baud is None else replace(self, baud=baud)


#: The link of each board (names as in ``tinyaccel.boards.build.BOARDS``). The iCE40 UP5K has
#: 30 EBR of 512 bytes, 25 used by the accelerator: the FIFO takes two. The ECP5-85F has 208
#: DP16KD of 2 KiB, ~150 used: the FIFO takes two.
LINKS: dict[str, LinkSpec] = {
    "icebreaker": LinkSpec(rx_fifo_bytes=1024),
    "ulx3s-85f": LinkSpec(rx_fifo_bytes=4096),
}

#: The board that runs each preset by default.
_BOARD_OF_CONFIG = {"ice40": "icebreaker", "ecp5": "ulx3s-85f"}


def link_for(board: str) -> LinkSpec:
    """The :class:`LinkSpec` of ``board``."""
    try:
        return LINKS[board]
    except KeyError:
        raise ConfigError(f"unknown board {board!r}; boards: {', '.join(LINKS)}") from None


def board_for_config(config_name: str) -> str:
    """The board whose default bitstream runs the preset ``config_name``."""
    try:
        return _BOARD_OF_CONFIG[config_name]
    except KeyError:
        raise ConfigError(
            f"no board runs config {config_name!r} by default; boards run "
            + ", ".join(f"{c!r} ({b})" for c, b in _BOARD_OF_CONFIG.items())) from None
