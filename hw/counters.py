"""Performance counters (section 10): ``len(Counter)`` 64-bit accumulators."""

from amaranth.hdl import Module, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .isa import COUNTER_BITS, Counter

__all__ = ["ADD_BITS", "PerfCounters"]

#: Width of one cycle's increment (MACS_SKIPPED adds ``rows*cols*k`` per skipped block).
ADD_BITS = 32


class PerfCounters(wiring.Component):
    """``values[c] += add[c]`` every cycle; ``clear`` zeroes all counters (and wins)."""

    add: In(data.ArrayLayout(unsigned(ADD_BITS), len(Counter)))
    clear: In(1)
    values: Out(data.ArrayLayout(unsigned(COUNTER_BITS), len(Counter)))

    def elaborate(self, platform):
        m = Module()
        for c in Counter:
            with m.If(self.clear):
                m.d.sync += self.values[c.value].eq(0)
            with m.Else():
                m.d.sync += self.values[c.value].eq(self.values[c.value] + self.add[c.value])
        return m
