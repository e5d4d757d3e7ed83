"""Small arithmetic helpers shared by the blocks."""

from functools import reduce
from operator import add

from amaranth.hdl import Const, Mux, Value

__all__ = ["mul_const", "mul_digit"]


def mul_const(value, constant: int) -> Value:
    """``value * constant`` as shifts and adds, so that synthesis never spends a DSP on it."""
    if constant < 0:
        raise ValueError(f"constant={constant} must be >= 0")
    value = Value.cast(value)
    terms = [value << bit for bit in range(constant.bit_length()) if constant >> bit & 1]
    return reduce(add, terms) if terms else Const(0)


def mul_digit(value, digit, *, signed_digit: bool = False) -> Value:
    """``value * digit`` for a narrow ``digit`` as a sum of gated shifts (no DSP inferred).

    With ``signed_digit`` the top bit of ``digit`` weighs ``-2^(len(digit)-1)``.
    """
    value, digit = Value.cast(value), Value.cast(digit)
    n = len(digit)
    terms = [Mux(digit[j], value << j, 0) for j in range(n - 1 if signed_digit else n)]
    total = reduce(add, terms) if terms else Const(0)
    if signed_digit:
        total = total - Mux(digit[n - 1], value << (n - 1), 0)
    return total
