"""Scratchpad memories: one ``lib.memory.Memory`` per buffer, one read and one write port each.

Every buffer has exactly one read port and one write port so that it maps to block RAM (iCE40 EBR
and ECP5 DP16KD are used as simple dual-port RAMs; every further read port would duplicate the
RAM). Several units share a port: the dispatcher guarantees that at most one unit reads (and at
most one writes) a buffer at a time. Enables are ORed (a unit keeps them low while it does not use
the port); address and data are those of the unit whose enable is high (a priority multiplexer
whose default is the last client, so a buffer with one writer needs none).

Physical geometry: a buffer's physical word is its architectural word, except PARAM, which is
stored *folded* as ``cols / requant_lanes`` physical words of ``requant_lanes`` channels each when
that width is a whole number of host beats, and MASK, stored as host-beat words. The requant unit
reads exactly one physical PARAM word per cycle, and on the iCE40 a 96-bit x 32 RAM costs 6 EBRs
where a 384-bit x 8 one costs 24. MASK bit ``i`` is bit ``i % width`` of physical word
``i // width`` (see :func:`mask_bit`), so the iCE40's 256 mask bits are one 16-bit EBR instead of
256 flip-flops.
"""

from dataclasses import dataclass
from functools import reduce
from operator import or_

from amaranth.hdl import Module, Mux, Signal, Value, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from .config import MASK_WORD_BITS, AccelConfig
from .isa import CHANNEL_PARAMS_BITS, Buffer

__all__ = ["Geometry", "geometry", "group", "mask_bit", "ReadClient", "WriteClient", "Scratchpad"]


@dataclass(frozen=True)
class Geometry:
    """Physical shape of one scratchpad."""
    buf: Buffer
    width: int  #: bits of one physical word
    fold: int  #: physical words per architectural word
    arch_depth: int  #: depth in architectural words (the range the ISA checks)
    host_width: int

    @property
    def depth(self) -> int:
        return self.arch_depth * self.fold

    @property
    def addr_width(self) -> int:
        return ceil_log2(self.depth)

    @property
    def beats(self) -> int:
        """Host beats per physical word."""
        return self.width // self.host_width

    @property
    def word_beats(self) -> int:
        """Host beats per architectural word."""
        return self.beats * self.fold


def geometry(config: AccelConfig, buf: Buffer) -> Geometry:
    """The physical geometry of scratchpad ``buf`` in ``config``."""
    buf = Buffer(buf)
    width, fold = config.word_bits(buf), 1
    if buf == Buffer.PARAM:
        lane_bits = CHANNEL_PARAMS_BITS * config.requant_lanes
        if lane_bits % config.host_width == 0:
            width, fold = lane_bits, config.cols // config.requant_lanes
    elif buf == Buffer.MASK:  # host_width divides the 64-bit MASK word (AccelConfig checks)
        width, fold = config.host_width, MASK_WORD_BITS // config.host_width
    return Geometry(buf, width, fold, config.depth(buf), config.host_width)


def group(geoms: dict, attr: str) -> dict:
    """``{value: [buffers]}`` of a :class:`Geometry` attribute (``fold``, ``beats``): the cases
    of a switch over buffers that only needs that value."""
    groups = {}
    for buf, g in geoms.items():
        groups.setdefault(getattr(g, attr), []).append(buf)
    return groups


def mask_bit(geom: Geometry, pos) -> tuple[Value, Value]:
    """(physical word, bit in it) of MASK bit ``pos``; the physical width is a power of two."""
    shift = geom.width.bit_length() - 1
    return pos >> shift, pos[:shift]


class ReadClient(wiring.Signature):
    """A unit's view of a synchronous read port: ``data`` is the word at ``addr`` one cycle
    after a cycle with ``en``, and holds while ``en`` is low. Host beat ``i`` of it reads as 0
    instead if ``zero[i]`` was high too (on a :class:`Scratchpad` without ``lanes``, any
    ``zero`` bit zeroes the whole word)."""

    def __init__(self, geom: Geometry):
        super().__init__({
            "addr": Out(geom.addr_width),
            "en": Out(1),
            "zero": Out(geom.beats),
            "data": In(geom.width),
        })


class WriteClient(wiring.Signature):
    """A unit's view of a write port with one enable bit per host beat of the word."""

    def __init__(self, geom: Geometry):
        super().__init__({
            "addr": Out(geom.addr_width),
            "data": Out(geom.width),
            "en": Out(geom.beats),
        })


class Scratchpad(wiring.Component):
    """One buffer: a Memory with one read and one write port, shared by ``readers`` and
    ``writers`` clients (see the module docstring; the dispatcher keeps them exclusive in time).

    With ``lanes`` the buffer is one Memory per host beat of the word (the same block RAMs when
    a beat is a RAM's width, as on the iCE40), so that each beat's read register can be zeroed
    on its own.
    """

    def __init__(self, geom: Geometry, *, readers: int, writers: int, lanes: bool = False):
        self._geom = geom
        self._lanes = lanes
        super().__init__({
            "rd": In(ReadClient(geom)).array(readers),
            "wr": In(WriteClient(geom)).array(writers),
        })

    def elaborate(self, platform):
        m = Module()
        geom = self._geom
        # No unit ever reads an address in the cycle another writes it (the dispatcher's hazard
        # rule; no unit does so itself), so read-during-write behaviour never matters. A
        # synchronous read port promises old data on a collision, which Yosys emulates around
        # iCE40 block RAM (a delayed write port and a bypass: about two FFs and a LUT per bit).
        # A combinational read into a reset-less register with `no_rw_check` simulates the same
        # and is folded into the RAM without it (Yosys only keeps the register's initial value:
        # one gate per bit until the first read). `zero` is a synchronous reset of the register:
        # Yosys emulates it with that same gate.
        hw = geom.host_width
        rd_en, rd_zero = Signal(), Signal(geom.beats)
        rd_addr, wr_addr = Signal(geom.addr_width), Signal(geom.addr_width)
        wr_en, wr_data = Signal(geom.beats), Signal(geom.width)
        rdata = Signal(geom.width, reset_less=True)
        if self._lanes:
            parts = [(hw, rd_zero[i]) for i in range(geom.beats)]
        else:
            parts = [(geom.width, rd_zero.any())]
        for i, (width, zero) in enumerate(parts):
            mem = Memory(shape=unsigned(width), depth=geom.depth, init=[],
                         attrs={"no_rw_check": 1})
            m.submodules[f"mem{i}" if self._lanes else "mem"] = mem
            rp = mem.read_port(domain="comb")
            wp = mem.write_port(granularity=hw)
            lane = rdata.word_select(i, width)
            m.d.comb += [rp.addr.eq(rd_addr), wp.addr.eq(wr_addr),
                         wp.en.eq(wr_en.word_select(i, len(wp.en))),
                         wp.data.eq(wr_data.word_select(i, width))]
            with m.If(rd_en):
                m.d.sync += lane.eq(Mux(zero, 0, rp.data))

        def select(values, enables):
            """The value of the client using the port; the last client's when none does."""
            result = values[-1]
            for value, en in zip(values[-2::-1], enables[-2::-1], strict=True):
                result = Mux(en, value, result)
            return result

        m.d.comb += [
            rd_en.eq(reduce(or_, [r.en for r in self.rd])),
            rd_zero.eq(reduce(or_, [r.zero for r in self.rd])),
            rd_addr.eq(select([r.addr for r in self.rd], [r.en for r in self.rd])),
            wr_en.eq(reduce(or_, [w.en for w in self.wr])),
            wr_addr.eq(select([w.addr for w in self.wr], [w.en.any() for w in self.wr])),
            wr_data.eq(select([w.data for w in self.wr], [w.en.any() for w in self.wr])),
        ]
        for r in self.rd:
            m.d.comb += r.data.eq(rdata)
        return m
