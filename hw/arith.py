"""Small arithmetic helpers shared by the blocks."""

from functools import reduce
from operator import add

from amaranth.hdl import Const, Mux, Signal, Value

from ..errors import ConfigError

__all__ = ["mul_const", "leading_zeros"]


def mul_const(value, constant: int) -> Value:
    """``value * constant`` as shifts and adds, so that synthesis never spends a DSP on it."""
    if constant < 0:
        raise ConfigError(f"constant={constant} must be >= 0")
    value = Value.cast(value)
    terms = [value << bit for bit in range(constant.bit_length()) if constant >> bit & 1]
    return reduce(add, terms) if terms else Const(0)



def leading_zeros(m, value, name: str = "clz") -> Value:
    """Leading zeros of ``value`` (``len(value)`` when it is 0), as a balanced tree of signals:
    log2 levels, where a priority chain would be one mux per bit."""
    value = Value.cast(value)

    def node(bits, level, index):
        n = len(bits)
        if n == 1:
            return ~bits[0], ~bits[0]  # (all zero, count)
        half = 1 << ((n - 1).bit_length() - 1)  # the upper part is a power of two
        hi_zero, hi_count = node(bits[n - half:], level + 1, 2 * index)
        lo_zero, lo_count = node(bits[:n - half], level + 1, 2 * index + 1)
        zero = Signal(name=f"{name}_z{level}_{index}")
        count = Signal(range(n + 1), name=f"{name}_n{level}_{index}")
        m.d.comb += [zero.eq(hi_zero & lo_zero),
                     count.eq(Mux(hi_zero, half + lo_count, hi_count))]
        return zero, count

    return node(value, 0, 0)[1]
