"""PLL settings and the PLL-driven ``sync`` domain of the board tops.

The divider searches follow Project IceStorm's ``icepll`` and Project Trellis' ``ecppll`` (same
ranges, same choice among equal candidates), so the settings match what those tools print.
"""

from dataclasses import dataclass

from amaranth.hdl import ClockDomain, ClockSignal, Instance, Module, ResetSignal, Signal
from amaranth.lib.cdc import FFSynchronizer

from tinyaccel.errors import ConfigError

__all__ = [
    "ICE40PLLParams", "ECP5PLLParams", "ice40_pll_params", "ecp5_pll_params", "ice40_pll",
    "ecp5_pll", "pll_sync_domain",
]


@dataclass(frozen=True)
class ICE40PLLParams:
    """SB_PLL40 settings in SIMPLE feedback mode: ``out = in * (divf+1) / ((divr+1) * 2^divq)``."""

    divr: int
    divf: int
    divq: int
    filter_range: int
    in_hz: float
    out_hz: float
    vco_hz: float


@dataclass(frozen=True)
class ECP5PLLParams:
    """EHXPLLL settings with CLKOP feedback: ``out = in * clkfb_div / clki_div``."""

    clki_div: int
    clkfb_div: int
    clkop_div: int
    in_hz: float
    out_hz: float
    vco_hz: float

    @property
    def clkop_cphase(self) -> int:
        # Zero phase for the primary output is CPHASE = DIV - 1 (as Diamond and LiteX set it).
        return self.clkop_div - 1


def ice40_pll_params(in_hz: float, out_hz: float) -> ICE40PLLParams:
    """Divider settings of an iCE40 SB_PLL40 for ``out_hz`` from ``in_hz`` (``icepll``).

    Raises
    ------
    ConfigError
        When ``out_hz`` is outside the PLL's 16..275 MHz output range.
    """
    if not 16e6 <= out_hz <= 275e6:
        raise ConfigError(f"iCE40 PLL: output {out_hz / 1e6:g} MHz outside 16..275 MHz")
    fin, fout = in_hz / 1e6, out_hz / 1e6
    best = None
    for divr in range(16):
        f_pfd = fin / (divr + 1)
        if not 10 <= f_pfd <= 133:
            continue
        for divf in range(128):
            f_vco = f_pfd * (divf + 1)
            if not 533 <= f_vco <= 1066:
                continue
            for divq in range(1, 7):
                f = f_vco / 2 ** divq
                if best is None or abs(f - fout) < abs(best[0] - fout):
                    best = (f, divr, divf, divq, f_pfd, f_vco)
    if best is None:
        raise ConfigError(f"iCE40 PLL: no setting for {in_hz / 1e6:g} MHz in")
    f, divr, divf, divq, f_pfd, f_vco = best
    filter_range = next(i + 1 for i, lim in enumerate((17, 26, 44, 66, 101, 1e9)) if f_pfd < lim)
    return ICE40PLLParams(divr=divr, divf=divf, divq=divq, filter_range=filter_range,
                          in_hz=in_hz, out_hz=f * 1e6, vco_hz=f_vco * 1e6)


def ecp5_pll_params(in_hz: float, out_hz: float) -> ECP5PLLParams:
    """Divider settings of an ECP5 EHXPLLL for ``out_hz`` from ``in_hz`` (``ecppll``).

    Raises
    ------
    ConfigError
        When ``out_hz`` is outside 10..400 MHz.
    """
    if not 10e6 <= out_hz <= 400e6:
        raise ConfigError(f"ECP5 PLL: output {out_hz / 1e6:g} MHz outside 10..400 MHz")
    fin, fout = in_hz / 1e6, out_hz / 1e6
    best = None
    for clki_div in range(1, 129):
        f_pfd = fin / clki_div
        if not 3.125 <= f_pfd <= 400:
            continue
        for clkfb_div in range(1, 81):
            for clkop_div in range(1, 129):
                f_vco = f_pfd * clkfb_div * clkop_div
                if not 400 <= f_vco <= 800:
                    continue
                f = f_vco / clkop_div
                err = abs(f - fout)
                if (best is None or err < best[0]
                        or (err == best[0] and abs(f_vco - 600) < abs(best[5] - 600))):
                    best = (err, f, clki_div, clkfb_div, clkop_div, f_vco)
    if best is None:
        raise ConfigError(f"ECP5 PLL: no setting for {in_hz / 1e6:g} MHz in")
    _, f, clki_div, clkfb_div, clkop_div, f_vco = best
    return ECP5PLLParams(clki_div=clki_div, clkfb_div=clkfb_div, clkop_div=clkop_div,
                         in_hz=in_hz, out_hz=f * 1e6, vco_hz=f_vco * 1e6)


def ice40_pll(p: ICE40PLLParams, packagepin, clk_out, lock) -> Instance:
    """SB_PLL40_PAD fed straight from the clock pad (the iCEBreaker's 12 MHz pin is a PLL pad)."""
    return Instance(
        "SB_PLL40_PAD",
        p_FEEDBACK_PATH="SIMPLE",
        p_DIVR=p.divr, p_DIVF=p.divf, p_DIVQ=p.divq, p_FILTER_RANGE=p.filter_range,
        i_PACKAGEPIN=packagepin,
        i_RESETB=1, i_BYPASS=0,
        o_PLLOUTGLOBAL=clk_out,
        o_LOCK=lock,
    )


def ecp5_pll(p: ECP5PLLParams, clk_in, clk_out, lock) -> Instance:
    """EHXPLLL with CLKOP as the output and its own feedback (``ecppll``'s template)."""
    return Instance(
        "EHXPLLL",
        a_FREQUENCY_PIN_CLKI=f"{p.in_hz / 1e6:g}",
        a_FREQUENCY_PIN_CLKOP=f"{p.out_hz / 1e6:g}",
        a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
        a_MFG_GMCREF_SEL="2",
        p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
        p_DPHASE_SOURCE="DISABLED",
        p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB", p_OUTDIVIDER_MUXC="DIVC",
        p_OUTDIVIDER_MUXD="DIVD",
        p_CLKI_DIV=p.clki_div, p_CLKFB_DIV=p.clkfb_div,
        p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=p.clkop_div,
        p_CLKOP_CPHASE=p.clkop_cphase, p_CLKOP_FPHASE=0,
        p_FEEDBK_PATH="CLKOP",
        i_RST=0, i_STDBY=0, i_CLKI=clk_in, i_CLKFB=clk_out,
        i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
        i_PLLWAKESYNC=0, i_ENCLKOP=0,
        o_CLKOP=clk_out, o_LOCK=lock,
    )


def pll_sync_domain(m: Module, clk: Signal, lock: Signal, freq_hz: float,
                    *, por_s: float = 15e-6) -> ClockDomain:
    """Make ``clk`` the ``sync`` domain; hold its reset until the PLL has locked for ``por_s``.

    The delay also covers the iCE40 quirk that block RAMs read as zero for ~3 us after
    configuration (Amaranth's default iCE40 domain waits 15 us for the same reason).

    No timing constraint is put on ``clk``: after synthesis the net carries another name, so
    nextpnr would ignore it. nextpnr derives the PLL output's constraint from the board clock's
    and the divider settings instead ("Derived frequency constraint ... for net ...").
    """
    m.domains.sync = cd_sync = ClockDomain("sync")
    m.domains.por = ClockDomain("por", reset_less=True, local=True)
    delay = max(1, int(por_s * freq_hz))
    timer = Signal(range(delay + 1))
    ready = Signal()
    m.d.comb += [ClockSignal("sync").eq(clk), ClockSignal("por").eq(clk)]
    locked = Signal()
    m.submodules.lock_sync = FFSynchronizer(lock, locked, o_domain="por")
    with m.If(~locked):
        m.d.por += [timer.eq(0), ready.eq(0)]
    with m.Elif(timer == delay):
        m.d.por += ready.eq(1)
    with m.Else():
        m.d.por += timer.eq(timer + 1)
    m.d.comb += ResetSignal("sync").eq(~ready)
    return cd_sync
