"""STORE: scratchpad words -> host beats, in two designs with one signature.

:class:`BufferedStoreUnit` (full builds) sends a beat per cycle under back-pressure;
:class:`ExclusiveStoreUnit` (compact builds, one instruction at a time) a beat every other
cycle at most, with no multiplexer and no FIFO.
"""

from dataclasses import dataclass
from functools import reduce
from operator import or_

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .isa import ADDR_BITS, COUNT_BITS, Buffer
from .scratchpads import ReadClient, geometry, group

__all__ = ["StoreCommand", "StoreUnit", "BufferedStoreUnit", "ExclusiveStoreUnit"]


class StoreCommand(data.Struct):
    """``zero`` sends ``count`` zero words without reading (a STORE that is not executed)."""
    buf: Buffer
    addr: unsigned(ADDR_BITS)
    count: unsigned(COUNT_BITS)
    zero: unsigned(1)


@dataclass(frozen=True)
class _StoreState:
    """The registers of a STORE in progress, shared by both designs (loaded at ``start``)."""
    buf: Signal
    zero: Signal
    ptr: Signal
    left: Signal
    more: Signal
    fetched: Signal
    beat: Signal
    last_beat: Signal  # beat == beats of buf - 1
    ports: dict


class StoreUnit(wiring.Component):
    """Sends ``count`` words of ``buf`` on ``o_stream`` (the common part of the two designs).

    :class:`BufferedStoreUnit` sends a beat per cycle through an output FIFO and may run beside
    other units; :class:`ExclusiveStoreUnit` picks beats without a multiplexer, through
    scratchpads with ``lanes``, when no other unit runs meanwhile. Both have this signature; a
    subclass supplies :meth:`transfer`, the read-and-send datapath.
    """

    def __init__(self, config: AccelConfig):
        self._config = config
        self._geoms = {buf: geometry(config, buf) for buf in Buffer}
        members = {
            "o_stream": Out(stream.Signature(unsigned(config.host_width))),
            "ctrl": In(UnitControl(StoreCommand)),
        }
        for buf, geom in self._geoms.items():
            members[f"rd_{buf.name.lower()}"] = Out(ReadClient(geom))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        geoms = self._geoms
        max_fold = max(g.fold for g in geoms.values())
        max_beats = max(g.beats for g in geoms.values())

        s = _StoreState(
            buf=Signal(Buffer, name="buf"),
            zero=Signal(name="zero"),
            # (a zero-mode STORE reads none)
            ptr=Signal(max(g.addr_width for g in geoms.values()), name="ptr"),
            left=Signal(COUNT_BITS + max_fold.bit_length(), name="left"),  # words still to read
            more=Signal(name="more"),  # left != 0, kept in a register (busy leaves no wide OR)
            fetched=Signal(name="fetched"),  # the read port holds a word (or beat) being sent
            beat=Signal(range(max_beats), name="beat"),
            last_beat=Signal(name="last_beat"),
            ports={b: getattr(self, f"rd_{b.name.lower()}") for b in geoms},
        )
        with m.Switch(s.buf):
            for beats, bufs in group(geoms, "beats").items():
                with m.Case(*bufs):
                    m.d.comb += s.last_beat.eq(s.beat == beats - 1)

        self.transfer(m, s)
        for port in s.ports.values():
            m.d.comb += port.addr.eq(s.ptr)

        with m.If(self.ctrl.start):
            cmd = self.ctrl.cmd
            m.d.sync += [s.buf.eq(cmd.buf), s.zero.eq(cmd.zero), s.beat.eq(0)]
            with m.Switch(cmd.buf):
                for fold, bufs in group(geoms, "fold").items():
                    with m.Case(*bufs):
                        m.d.sync += [s.ptr.eq(mul_const(cmd.addr, fold)),
                                     s.left.eq(mul_const(cmd.count, fold)),
                                     s.more.eq(cmd.count != 0)]
                with m.Default():  # undefined buffer: nothing is sent
                    m.d.sync += [s.left.eq(0), s.more.eq(0)]
        return m

    def transfer(self, m: Module, s: _StoreState):
        """Add the datapath that reads ``s.buf`` from ``s.ptr`` on and sends its beats, and
        drives ``ctrl.busy``."""
        raise NotImplementedError


class BufferedStoreUnit(StoreUnit):
    """A beat per cycle under back-pressure, beside other units (full builds).

    The read port's output holds the word while its beats are picked (``en`` low), one per
    cycle into a two-entry output FIFO, and the next word is read in the cycle its last beat is
    picked, so it shows on the port the cycle after. No word is copied into registers.
    """

    def transfer(self, m, s):
        hw = self._config.host_width
        busy = self.ctrl.busy[0]
        # `beat` is the beat being picked; each read fetches a word. Picked beats go through
        # a two-entry FIFO, so neither the path from a block RAM's output (the read
        # registers' clock-to-output is slow on the ECP5) nor the sink's `ready` reaches
        # further than the FIFO: a beat is picked when the FIFO has room (from its level).
        m.submodules.out_fifo = fifo = SyncFIFO(width=hw, depth=2)
        m.d.comb += [
            self.o_stream.valid.eq(fifo.r_rdy),
            self.o_stream.payload.eq(fifo.r_data),
            fifo.r_en.eq(self.o_stream.ready),
            busy.eq(s.more | s.fetched | fifo.r_rdy),
        ]
        sent = s.fetched & fifo.w_rdy  # the picked beat enters the FIFO
        payload = Signal(hw)
        with m.Switch(s.buf):
            for b, port in s.ports.items():
                with m.Case(b):
                    m.d.comb += payload.eq(port.data.word_select(s.beat, hw))
        m.d.comb += [fifo.w_en.eq(sent), fifo.w_data.eq(Mux(s.zero, 0, payload))]
        word_done = sent & s.last_beat
        issue = s.more & (~s.fetched | word_done)
        with m.If(sent):
            m.d.sync += s.beat.eq(Mux(s.last_beat, 0, s.beat + 1))
        with m.If(issue):
            m.d.sync += [s.ptr.eq(s.ptr + 1), s.left.eq(s.left - 1), s.more.eq(s.left != 1),
                         s.fetched.eq(1)]
        with m.Elif(word_done):
            m.d.sync += s.fetched.eq(0)
        for b, port in s.ports.items():
            with m.If(issue & ~s.zero & (s.buf == b)):
                m.d.comb += port.en.eq(1)


class ExclusiveStoreUnit(StoreUnit):
    """A beat every other cycle at most, with no other unit running (compact builds; the
    scratchpads have ``lanes``).

    The beat is picked without a multiplexer. The cycle after the start zeroes every read
    port's register, then each beat is read on its own with the other beats of the word zeroed,
    so the beat sent (without an output FIFO) is the OR of all read registers. A beat is read
    only when the previous one has left (the read enables do not depend on ``o_stream.ready``).
    """

    def transfer(self, m, s):
        hw = self._config.host_width
        geoms = self._geoms
        busy = self.ctrl.busy[0]
        # `beat` is the next beat to read; each read fetches one beat. A beat is read only
        # once the port is free (from flops: the sink's ready reaches no read enable or
        # address), so beats leave at most every other cycle (the iCE40's host link is far
        # slower anyway)
        # The read registers are zeroed the cycle after the start, from a flop (the start
        # comes late in the cycle, and each read register's reset is a wide net); no read
        # is issued in that cycle.
        clearing = Signal()
        m.d.sync += clearing.eq(self.ctrl.start)
        m.d.comb += [self.o_stream.valid.eq(s.fetched),
                     busy.eq(s.more | s.fetched | clearing)]
        sent = self.o_stream.valid & self.o_stream.ready
        issue = s.more & ~s.fetched & ~clearing
        m.d.comb += self.o_stream.payload.eq(
            reduce(or_, [p.data.word_select(i, hw)
                         for b, p in s.ports.items() for i in range(geoms[b].beats)]))
        with m.If(issue):
            m.d.sync += [s.beat.eq(Mux(s.last_beat, 0, s.beat + 1)), s.fetched.eq(1)]
            with m.If(s.last_beat):
                m.d.sync += [s.ptr.eq(s.ptr + 1), s.left.eq(s.left - 1),
                             s.more.eq(s.left != 1)]
        with m.Elif(sent):
            m.d.sync += s.fetched.eq(0)
        for b, port in s.ports.items():
            with m.If(clearing):  # clear every read register (a zero STORE reads none)
                m.d.comb += [port.en.eq(1), port.zero.eq(-1)]
            with m.Elif(issue & ~s.zero & (s.buf == b)):
                m.d.comb += [port.en.eq(1), port.zero.eq(~(1 << s.beat))]
