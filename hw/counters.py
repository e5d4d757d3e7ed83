"""Performance counters (section 10): ``len(Counter)`` 64-bit counters and their record."""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..errors import ConfigError
from .isa import COUNTER_BITS, Counter

__all__ = ["ADD_BITS", "PerfCounters"]

#: Width of one cycle's increment (MACS_SKIPPED adds ``rows*cols*k`` per skipped block).
ADD_BITS = 32


class PerfCounters(wiring.Component):
    """``value[c] += add[c]`` every cycle; ``clear`` zeroes all counters (and wins).

    While ``dump`` is high the counter record (section 10: the counters in ``Counter`` order,
    64-bit little-endian each) leaves on ``o_record`` in host beats; the counters must not count
    meanwhile (the caller freezes them), so the record is a snapshot.

    Parameters
    ----------
    host_width:
        Beat width of the record.
    ram:
        Keep the counters in one block RAM instead of ``64 * len(Counter)`` flip-flops with a
        wide record multiplexer (compact builds). Each counter then has a narrow *pending*
        accumulator that ``add`` goes into; an updater visits the RAM words round-robin, one per
        cycle, and adds each counter's pending sum (taken when its first word passes) into its
        64 bits with a ``host_width``-bit adder. A counter is visited every ``T`` cycles (``T`` =
        RAM words), so its pending sum needs ``bit_length(T * max_add[c])`` bits. ``clear`` zeroes
        the pending sums and marks every counter as cleared: its RAM words read as zero when it
        is next visited (so reset needs no clearing pass). ``dump`` first runs the updater a full
        round so that the RAM holds every count, then reads the record out of it.
    max_add:
        ``{Counter: largest increment in one cycle}``; needed with ``ram``.
    """

    def __init__(self, host_width: int, *, ram: bool = False, max_add: dict | None = None):
        self._hw = host_width
        self._ram = ram
        self._max_add = max_add
        if ram:
            if COUNTER_BITS % host_width or max_add is None:
                raise ConfigError("counters in RAM need host_width | 64 and max_add")
        super().__init__({
            "add": In(data.ArrayLayout(unsigned(ADD_BITS), len(Counter))),
            "clear": In(1),
            "dump": In(1),
            "o_record": Out(stream.Signature(unsigned(host_width))),
        })

    def elaborate(self, platform):
        return self._elaborate_ram() if self._ram else self._elaborate_ff()

    def _elaborate_ff(self):
        m = Module()
        hw = self._hw
        values = Signal(data.ArrayLayout(unsigned(COUNTER_BITS), len(Counter)))
        for c in Counter:
            with m.If(self.clear):
                m.d.sync += values[c.value].eq(0)
            with m.Else():
                m.d.sync += values[c.value].eq(values[c.value] + self.add[c.value])

        beats = len(Counter) * COUNTER_BITS // hw
        beat = Signal(range(beats))
        m.d.comb += [
            self.o_record.valid.eq(self.dump),
            self.o_record.payload.eq(values.as_value().word_select(beat, hw)),
        ]
        with m.If(~self.dump):
            m.d.sync += beat.eq(0)
        with m.Elif(self.o_record.ready):
            m.d.sync += beat.eq(Mux(beat == beats - 1, 0, beat + 1))
        return m

    def _elaborate_ram(self):
        m = Module()
        hw = self._hw
        chunks = COUNTER_BITS // hw  # RAM words per counter (a power of two)
        depth = len(Counter) * chunks  # also the updater's period in cycles
        j_bits = chunks.bit_length() - 1

        # Combinational read into a register, as in .scratchpads (no read-during-write occurs:
        # the updater reads a word while it writes the previous one).
        m.submodules.mem = mem = Memory(shape=unsigned(hw), depth=depth, init=[],
                                        attrs={"no_rw_check": 1})
        rp = mem.read_port(domain="comb")
        wp = mem.write_port()
        rdata = Signal(hw, reset_less=True)
        rd_en = Signal()
        with m.If(rd_en):
            m.d.sync += rdata.eq(rp.data)

        widths = [(depth * self._max_add[c]).bit_length() for c in Counter]
        pend = [Signal(widths[c.value], name=f"pend_{c.name.lower()}") for c in Counter]
        cleared = Signal(len(Counter), init=(1 << len(Counter)) - 1)  # RAM words count as 0

        # -- updater: stage R reads word `rd_ptr`; stage W adds into it and writes it back ----
        run = Signal()  # stage R active
        rd_ptr = Signal(range(depth))
        w_valid = Signal()
        w_addr = Signal(range(depth))
        w_c, w_j = w_addr[j_bits:], w_addr[:j_bits]
        hi_bits = max(max(widths) - hw, 1)
        p_hi = Signal(hi_bits)  # the visited counter's pending sum above the current word
        zero = Signal()  # the visited counter was cleared: its old words count as 0
        carry = Signal()

        with m.If(run):
            m.d.comb += [rp.addr.eq(rd_ptr), rd_en.eq(1)]
            m.d.sync += [rd_ptr.eq(Mux(rd_ptr == depth - 1, 0, rd_ptr + 1)), w_addr.eq(rd_ptr)]
        m.d.sync += w_valid.eq(run)

        taken = Signal(max(widths))  # pending sum of the counter whose first word is in W
        is_zero = Signal()
        with m.Switch(w_c):
            for c in Counter:
                with m.Case(c.value):
                    m.d.comb += [taken.eq(pend[c.value]), is_zero.eq(cleared[c.value])]
        first = w_valid & (w_j == 0)
        operand = Mux(first, taken[:hw], p_hi[:hw] if hi_bits >= hw else p_hi)
        old = Mux(Mux(first, is_zero, zero), 0, rdata)
        total = Signal(hw + 1)
        m.d.comb += total.eq(old + operand + Mux(first, 0, carry))
        with m.If(w_valid):
            m.d.comb += [wp.addr.eq(w_addr), wp.en.eq(1), wp.data.eq(total[:hw])]
            m.d.sync += [carry.eq(total[hw]), p_hi.eq(p_hi >> hw)]
            with m.If(first):
                m.d.sync += [p_hi.eq(taken[hw:]), zero.eq(is_zero)]

        # `add` and `clear` go through flops first (the increments are computed late in the
        # cycle by the units): the counters run a cycle behind. The record still holds every
        # increment made before `dump`: the flush visits each counter at least a cycle later.
        add = [Signal(self._max_add[c].bit_length(), name=f"add_{c.name.lower()}")
               for c in Counter]
        clear = Signal()
        m.d.sync += [clear.eq(self.clear)] + [add[c.value].eq(self.add[c.value]) for c in Counter]
        for c in Counter:
            visited = first & (w_c == c.value)
            with m.If(clear):
                m.d.sync += [pend[c.value].eq(0), cleared[c.value].eq(1)]
            with m.Elif(visited):  # taken into the RAM this cycle: restart from this increment
                m.d.sync += [pend[c.value].eq(add[c.value]), cleared[c.value].eq(0)]
            with m.Else():
                m.d.sync += pend[c.value].eq(pend[c.value] + add[c.value])

        # -- record: after a full round of the updater, read the words out in order ---------
        flush = Signal(range(depth + chunks + 2))
        r_ptr = Signal(range(depth + 1))
        held = Signal()  # rdata holds record word r_ptr - 1
        m.d.comb += [self.o_record.valid.eq(held), self.o_record.payload.eq(rdata)]
        with m.FSM():
            with m.State("COUNT"):
                m.d.comb += run.eq(1)
                m.d.sync += flush.eq(depth + chunks + 1)
                with m.If(self.dump):
                    m.next = "FLUSH"
            with m.State("FLUSH"):  # every counter's pending sum, taken after `dump`, written
                m.d.comb += run.eq(flush > 1)  # and stage W empty before the reads start
                m.d.sync += [flush.eq(flush - 1), r_ptr.eq(0), held.eq(0)]
                with m.If(flush == 0):
                    m.next = "READ"
            with m.State("READ"):
                fetch = (r_ptr != depth) & (~held | self.o_record.ready)
                with m.If(fetch):
                    m.d.comb += [rp.addr.eq(r_ptr), rd_en.eq(1)]
                    m.d.sync += [r_ptr.eq(r_ptr + 1), held.eq(1)]
                with m.Elif(self.o_record.ready):
                    m.d.sync += held.eq(0)
                with m.If(~self.dump):
                    m.d.sync += held.eq(0)
                    m.next = "COUNT"
        return m
