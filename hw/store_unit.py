"""STORE: scratchpad words -> host beats, at one beat per cycle under back-pressure."""

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

__all__ = ["StoreCommand", "StoreUnit"]


class StoreCommand(data.Struct):
    """``zero`` sends ``count`` zero words without reading (a STORE that is not executed)."""
    buf: Buffer
    addr: unsigned(ADDR_BITS)
    count: unsigned(COUNT_BITS)
    zero: unsigned(1)


class StoreUnit(wiring.Component):
    """Sends ``count`` words of ``buf`` on ``o_stream``, one beat per cycle under back-pressure.

    The read port's output holds the word while its beats are picked (``en`` low), one per
    cycle into a two-entry output FIFO, and the next word is read in the cycle its last beat is
    picked, so it shows on the port the cycle after. No word is copied into registers.

    ``exclusive`` (no other unit runs meanwhile; scratchpads with ``lanes``): the beat is
    picked without a multiplexer. The cycle after the start zeroes every read port's register,
    then each beat is read on its own with the other beats of the word zeroed, so the beat sent
    (without the output FIFO) is the OR of all read registers. A beat is read only when the
    previous one has left (the read enables do not depend on ``o_stream.ready``): a beat every
    other cycle at most.
    """

    def __init__(self, config: AccelConfig, *, exclusive: bool = False):
        self._config = config
        self._exclusive = exclusive
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
        busy = self.ctrl.busy[0]
        hw = self._config.host_width
        max_fold = max(g.fold for g in geoms.values())
        max_beats = max(g.beats for g in geoms.values())

        buf = Signal(Buffer)
        zero = Signal()
        ptr = Signal(max(g.addr_width for g in geoms.values()))  # (a zero-mode STORE reads none)
        left = Signal(COUNT_BITS + max_fold.bit_length())  # words still to read
        more = Signal()  # left != 0, kept in a register (busy leaves no wide OR)
        fetched = Signal()  # the read port holds a word whose beats are being sent
        beat = Signal(range(max_beats))

        last_beat = Signal()
        with m.Switch(buf):
            for beats, bufs in group(geoms, "beats").items():
                with m.Case(*bufs):
                    m.d.comb += last_beat.eq(beat == beats - 1)
        ports = {b: getattr(self, f"rd_{b.name.lower()}") for b in geoms}

        if self._exclusive:
            # `beat` is the next beat to read; each read fetches one beat. A beat is read only
            # once the port is free (from flops: the sink's ready reaches no read enable or
            # address), so beats leave at most every other cycle (the iCE40's host link is far
            # slower anyway)
            # The read registers are zeroed the cycle after the start, from a flop (the start
            # comes late in the cycle, and each read register's reset is a wide net); no read
            # is issued in that cycle.
            clearing = Signal()
            m.d.sync += clearing.eq(self.ctrl.start)
            m.d.comb += [self.o_stream.valid.eq(fetched), busy.eq(more | fetched | clearing)]
            sent = self.o_stream.valid & self.o_stream.ready
            issue = more & ~fetched & ~clearing
            m.d.comb += self.o_stream.payload.eq(
                reduce(or_, [p.data.word_select(i, hw)
                             for b, p in ports.items() for i in range(geoms[b].beats)]))
            with m.If(issue):
                m.d.sync += [beat.eq(Mux(last_beat, 0, beat + 1)), fetched.eq(1)]
                with m.If(last_beat):
                    m.d.sync += [ptr.eq(ptr + 1), left.eq(left - 1), more.eq(left != 1)]
            with m.Elif(sent):
                m.d.sync += fetched.eq(0)
            for b, port in ports.items():
                with m.If(clearing):  # clear every read register (a zero STORE reads none)
                    m.d.comb += [port.en.eq(1), port.zero.eq(-1)]
                with m.Elif(issue & ~zero & (buf == b)):
                    m.d.comb += [port.en.eq(1), port.zero.eq(~(1 << beat))]
        else:
            # `beat` is the beat being picked; each read fetches a word. Picked beats go through
            # a two-entry FIFO, so neither the path from a block RAM's output (the read
            # registers' clock-to-output is slow on the ECP5) nor the sink's `ready` reaches
            # further than the FIFO: a beat is picked when the FIFO has room (from its level).
            m.submodules.out_fifo = fifo = SyncFIFO(width=hw, depth=2)
            m.d.comb += [
                self.o_stream.valid.eq(fifo.r_rdy),
                self.o_stream.payload.eq(fifo.r_data),
                fifo.r_en.eq(self.o_stream.ready),
                busy.eq(more | fetched | fifo.r_rdy),
            ]
            sent = fetched & fifo.w_rdy  # the picked beat enters the FIFO
            payload = Signal(hw)
            with m.Switch(buf):
                for b, port in ports.items():
                    with m.Case(b):
                        m.d.comb += payload.eq(port.data.word_select(beat, hw))
            m.d.comb += [fifo.w_en.eq(sent), fifo.w_data.eq(Mux(zero, 0, payload))]
            word_done = sent & last_beat
            issue = more & (~fetched | word_done)
            with m.If(sent):
                m.d.sync += beat.eq(Mux(last_beat, 0, beat + 1))
            with m.If(issue):
                m.d.sync += [ptr.eq(ptr + 1), left.eq(left - 1), more.eq(left != 1),
                             fetched.eq(1)]
            with m.Elif(word_done):
                m.d.sync += fetched.eq(0)
            for b, port in ports.items():
                with m.If(issue & ~zero & (buf == b)):
                    m.d.comb += port.en.eq(1)
        for port in ports.values():
            m.d.comb += port.addr.eq(ptr)

        with m.If(self.ctrl.start):
            cmd = self.ctrl.cmd
            m.d.sync += [buf.eq(cmd.buf), zero.eq(cmd.zero), beat.eq(0)]
            with m.Switch(cmd.buf):
                for fold, bufs in group(geoms, "fold").items():
                    with m.Case(*bufs):
                        m.d.sync += [ptr.eq(mul_const(cmd.addr, fold)),
                                     left.eq(mul_const(cmd.count, fold)),
                                     more.eq(cmd.count != 0)]
                with m.Default():  # undefined buffer: nothing is sent
                    m.d.sync += [left.eq(0), more.eq(0)]
        return m
