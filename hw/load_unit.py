"""LOAD: host data beats -> scratchpad words."""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .isa import ADDR_BITS, COUNT_BITS, Buffer
from .scratchpads import WriteClient, geometry, group

__all__ = ["LoadCommand", "LoadUnit"]


class LoadCommand(data.Struct):
    """What the dispatcher hands the load unit. ``discard`` consumes the beats without writing
    (a LOAD that is not executed still consumes its data)."""
    buf: Buffer
    addr: unsigned(ADDR_BITS)
    count: unsigned(COUNT_BITS)
    discard: unsigned(1)


class LoadUnit(wiring.Component):
    """Writes ``count`` words of ``buf`` from ``i_stream``, one host beat per cycle.

    Each beat is written straight into its slice of the word (write-enable per beat), so no word
    is assembled in registers. ``busy`` is high from the cycle after ``start`` until the last beat
    has been written; a command with ``count = 0`` never raises it.

    **Clearing.** Block RAM keeps its contents across a reset, but the contract (section 5) has
    the buffers zero after reset: from reset, ``clearing`` is high while the unit writes zero
    words to all buffers at once, one address per cycle (the deepest buffer's physical depth in
    cycles). The accelerator takes no input meanwhile. (Being the writer of every buffer, the
    load unit clears them without a port of its own.)
    """

    def __init__(self, config: AccelConfig):
        self._config = config
        self._geoms = {buf: geometry(config, buf) for buf in Buffer}
        members = {
            "i_stream": In(stream.Signature(unsigned(config.host_width))),
            "ctrl": In(UnitControl(LoadCommand)),
            "clearing": Out(1, init=1),
        }
        for buf, geom in self._geoms.items():
            members[f"wr_{buf.name.lower()}"] = Out(WriteClient(geom))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        geoms = self._geoms
        busy = self.ctrl.busy[0]
        max_fold = max(g.fold for g in geoms.values())
        max_beats = max(g.beats for g in geoms.values())

        buf = Signal(Buffer)
        ptr = Signal(max(g.addr_width for g in geoms.values()))  # physical word address
        left = Signal(COUNT_BITS + max_fold.bit_length())  # physical words still to write
        more = Signal()  # left != 0, kept in a register (busy and ready leave no wide OR)
        beat = Signal(range(max_beats))
        discard = Signal()

        last_beat = Signal()
        with m.Switch(buf):
            for beats, bufs in group(geoms, "beats").items():
                with m.Case(*bufs):
                    m.d.comb += last_beat.eq(beat == beats - 1)

        m.d.comb += [
            busy.eq(more),
            self.i_stream.ready.eq(busy),
        ]
        fire = self.i_stream.valid & self.i_stream.ready

        with m.If(fire):
            m.d.sync += beat.eq(Mux(last_beat, 0, beat + 1))
            with m.If(last_beat):
                m.d.sync += [ptr.eq(ptr + 1), left.eq(left - 1), more.eq(left != 1)]

        clear_end = max(g.depth for g in geoms.values()) - 1
        with m.If(self.clearing):
            m.d.sync += ptr.eq(ptr + 1)
            with m.If(ptr == clear_end):
                m.d.sync += [ptr.eq(0), self.clearing.eq(0)]
        data = Mux(self.clearing, 0, self.i_stream.payload)
        for b, g in geoms.items():
            port = getattr(self, f"wr_{b.name.lower()}")
            m.d.comb += [port.addr.eq(ptr), port.data.eq(data.replicate(g.beats))]
            with m.If(self.clearing & (ptr < g.depth)):
                m.d.comb += port.en.eq(-1)
            with m.Elif(fire & ~discard & (buf == b)):
                m.d.comb += port.en.bit_select(beat, 1).eq(1)

        with m.If(self.ctrl.start):
            cmd = self.ctrl.cmd
            m.d.sync += [buf.eq(cmd.buf), discard.eq(cmd.discard), beat.eq(0)]
            with m.Switch(cmd.buf):
                for fold, bufs in group(geoms, "fold").items():
                    with m.Case(*bufs):
                        m.d.sync += [ptr.eq(mul_const(cmd.addr, fold)),
                                     left.eq(mul_const(cmd.count, fold)),
                                     more.eq(cmd.count != 0)]
                with m.Default():  # undefined buffer: no data follows
                    m.d.sync += [left.eq(0), more.eq(0)]
        return m
