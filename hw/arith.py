"""Small arithmetic helpers shared by the blocks."""

from functools import reduce
from operator import add

from amaranth.hdl import Const, Value

__all__ = ["mul_const"]


def mul_const(value, constant: int) -> Value:
    """``value * constant`` as shifts and adds, so that synthesis never spends a DSP on it."""
    if constant < 0:
        raise ValueError(f"constant={constant} must be >= 0")
    value = Value.cast(value)
    terms = [value << bit for bit in range(constant.bit_length()) if constant >> bit & 1]
    return reduce(add, terms) if terms else Const(0)

