"""STORE: scratchpad words -> host beats, at one beat per cycle under back-pressure."""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .isa import ADDR_BITS, COUNT_BITS, Buffer
from .scratchpads import ReadClient, geometry

__all__ = ["StoreCommand", "StoreUnit"]


class StoreCommand(data.Struct):
    """``zero`` sends ``count`` zero words without reading (a STORE that is not executed)."""
    buf: Buffer
    addr: unsigned(ADDR_BITS)
    count: unsigned(COUNT_BITS)
    zero: unsigned(1)


class StoreUnit(wiring.Component):
    """Sends ``count`` words of ``buf`` on ``o_stream``, one beat per cycle under back-pressure.

    The read port's output is the send stage: it holds the word while its beats go out (``en``
    low), and the next word is read in the cycle its last beat is accepted, so it shows on the
    port the cycle after. No word is copied into registers.
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
        busy = self.ctrl.busy[0]
        hw = self._config.host_width
        max_fold = max(g.fold for g in geoms.values())
        max_beats = max(g.beats for g in geoms.values())

        buf = Signal(Buffer)
        zero = Signal()
        ptr = Signal(ADDR_BITS + max_fold.bit_length())
        left = Signal(COUNT_BITS + max_fold.bit_length())  # words still to read
        fetched = Signal()  # the read port holds a word whose beats are being sent
        beat = Signal(range(max_beats))

        last_beat = Signal()
        payload = Signal(hw)
        with m.Switch(buf):
            for b, g in geoms.items():
                with m.Case(b):
                    port = getattr(self, f"rd_{b.name.lower()}")
                    m.d.comb += [last_beat.eq(beat == g.beats - 1),
                                 payload.eq(port.data.word_select(beat, hw))]

        m.d.comb += [
            self.o_stream.valid.eq(fetched),
            self.o_stream.payload.eq(Mux(zero, 0, payload)),
            busy.eq((left != 0) | fetched),
        ]
        sent = self.o_stream.valid & self.o_stream.ready
        word_done = sent & last_beat
        issue = (left != 0) & (~fetched | word_done)

        with m.If(sent):
            m.d.sync += beat.eq(Mux(last_beat, 0, beat + 1))
        with m.If(issue):
            m.d.sync += [ptr.eq(ptr + 1), left.eq(left - 1), fetched.eq(1)]
        with m.Elif(word_done):
            m.d.sync += fetched.eq(0)

        for b in geoms:
            port = getattr(self, f"rd_{b.name.lower()}")
            m.d.comb += port.addr.eq(ptr)
            with m.If(issue & ~zero & (buf == b)):
                m.d.comb += port.en.eq(1)

        with m.If(self.ctrl.start):
            cmd = self.ctrl.cmd
            m.d.sync += [buf.eq(cmd.buf), zero.eq(cmd.zero), beat.eq(0)]
            with m.Switch(cmd.buf):
                for b, g in geoms.items():
                    with m.Case(b):
                        m.d.sync += [ptr.eq(mul_const(cmd.addr, g.fold)),
                                     left.eq(mul_const(cmd.count, g.fold))]
                with m.Default():  # undefined buffer: nothing is sent
                    m.d.sync += left.eq(0)
        return m
