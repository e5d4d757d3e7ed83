"""The decode-time legality rules (section 5 of docs/architecture.md), stated once, as data.

:data:`RULES` lists per opcode, in priority order, the checks an instruction must pass; the first
that fails sets the status (an undefined opcode is ``ILLEGAL_OPCODE`` before any of them, and the
``ADDR_RANGE`` checks come last). Everything that decides legality reads this table: the golden
model evaluates it on integers (:func:`tinyaccel.sim.golden.check_instruction`, which the
decoder's unit test uses for the expected verdict), and both RTL decoders build their checks from
it (:class:`~.decoder.DecoderParallel` all at once, :class:`~.decoder_serial.DecoderSerial` one
term after another). Plain Python: no hardware is built here.

Operands are named as in the operand structs of :mod:`.isa`.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import ClassVar

from .config import AccelConfig
from .isa import Buffer, Opcode, Status

__all__ = ["DefinedBuffer", "NonZero", "Multiple", "Disjoint", "InRange", "StridedInRange",
           "PixelFits", "TensorInRange", "Rule", "RULES", "strided_span", "tensor_span",
           "pixel_fits", "extent_name", "extent_value", "limit_name", "limit_value"]


@dataclass(frozen=True)
class DefinedBuffer:
    """``BAD_BUFFER`` unless operand ``field`` is the code of a :class:`~.isa.Buffer`."""
    field: str = "buf"
    status: ClassVar[Status] = Status.BAD_BUFFER


@dataclass(frozen=True)
class NonZero:
    """``status`` when operand ``field`` is 0; ``need`` says why (``{op}``: the opcode name)."""
    field: str
    status: Status
    need: str


@dataclass(frozen=True)
class Multiple:
    """``BAD_SHAPE`` unless operand ``field`` is a multiple of operand ``of`` (a :class:`NonZero`
    rule on ``of`` comes first)."""
    field: str
    of: str
    status: ClassVar[Status] = Status.BAD_SHAPE


@dataclass(frozen=True)
class Disjoint:
    """``BAD_FIELD`` when the ranges ``[a, a + n)`` and ``[b, b + n)`` overlap, with ``n`` the
    product of ``extent`` (see :class:`InRange`)."""
    a: str
    b: str
    extent: tuple[str, ...]
    status: ClassVar[Status] = Status.BAD_FIELD


@dataclass(frozen=True)
class InRange:
    """``ADDR_RANGE`` unless ``base + extent <= limit`` (checked only while 1-bit operand
    ``when`` is set and ``unless`` is clear, for those given).

    ``extent``: the product of its factors, operand names or ``"rows"`` (the array's rows);
    ``()`` is 1. ``limit``: a :class:`~.isa.Buffer` (its depth in words), ``"buf"`` (the depth of
    the buffer that operand ``buf`` names) or ``"mask_bits"``.
    """
    base: str
    extent: tuple[str, ...]
    limit: Buffer | str
    when: str | None = None
    unless: str | None = None
    status: ClassVar[Status] = Status.ADDR_RANGE

    def applies(self, operands: dict) -> bool:
        """The rule is checked for these operand values (``when`` set, ``unless`` clear)."""
        return ((self.when is None or bool(operands[self.when]))
                and (self.unless is None or not operands[self.unless]))


@dataclass(frozen=True)
class StridedInRange:
    """``ADDR_RANGE`` unless ``base + span <= limit`` for ``count`` words ``gap + 1`` apart:
    ``span = (count - 1)*(gap + 1) + 1``, and 0 when ``count`` is 0 (with ``gap = 0`` this is
    :class:`InRange` with extent ``(count,)``)."""
    base: str
    count: str
    gap: str
    limit: Buffer
    status: ClassVar[Status] = Status.ADDR_RANGE


@dataclass(frozen=True)
class PixelFits:
    """``BAD_FIELD`` unless an IM2COL pixel's ``channels`` fit its storage: ``channels <=
    pitch*cols`` with ``pack = 0``; ``channels <= cols >> pack`` with ``pack > 0``, when
    ``2**pack`` pixels share a word."""
    status: ClassVar[Status] = Status.BAD_FIELD


@dataclass(frozen=True)
class TensorInRange:
    """``ADDR_RANGE`` unless an IM2COL's input tensor lies in OUT: ``src + ceil(in_h*in_w /
    2**pack)*pitch <= OUT depth``."""
    base: str = "src"
    limit: Buffer = Buffer.OUT
    status: ClassVar[Status] = Status.ADDR_RANGE


Rule = (DefinedBuffer | NonZero | Multiple | Disjoint | InRange | StridedInRange | PixelFits
        | TensorInRange)

_LOAD_STORE = (DefinedBuffer("buf"), InRange("addr", ("count",), "buf"))

#: Per opcode, the rules in priority order. (The opcodes without rules come first: the serial
#: decoder's status multiplexer is built in this order.)
RULES: dict[Opcode, tuple[Rule, ...]] = {
    Opcode.NOP: (),
    Opcode.SYNC: (),
    Opcode.LOAD: _LOAD_STORE,
    Opcode.STORE: _LOAD_STORE,
    Opcode.GEMM: (
        NonZero("k", Status.BAD_SHAPE, "a {op} needs k >= 1"),
        InRange("inp_addr", ("m_blocks", "k"), Buffer.INP),
        InRange("wgt_addr", ("n_blocks", "k"), Buffer.WGT),
        InRange("acc_addr", ("m_blocks", "n_blocks", "rows"), Buffer.ACC),
        InRange("mask_idx", ("m_blocks",), "mask_bits", when="gate"),
    ),
    Opcode.REQUANT: (
        InRange("acc_addr", ("count",), Buffer.ACC),
        StridedInRange("out_addr", "count", "out_gap", Buffer.OUT),
        InRange("param_addr", (), Buffer.PARAM),
    ),
    Opcode.PATCH: (
        NonZero("k", Status.BAD_SHAPE, "a {op} needs k >= 1"),
        Disjoint("new_addr", "ref_addr", ("blocks", "k")),
        InRange("new_addr", ("blocks", "k"), Buffer.INP),
        InRange("ref_addr", ("blocks", "k"), Buffer.INP),
        InRange("mask_idx", ("blocks",), "mask_bits"),
    ),
    Opcode.SGQ: (
        NonZero("stripe_len", Status.BAD_FIELD, "stripes need >= 1 word"),
        Multiple("count", "stripe_len"),
        InRange("out_addr", ("count",), Buffer.OUT),
    ),
    Opcode.IM2COL: (
        NonZero("in_h", Status.BAD_SHAPE, "an {op} input has >= 1 row"),
        NonZero("in_w", Status.BAD_SHAPE, "an {op} input has >= 1 column"),
        NonZero("channels", Status.BAD_SHAPE, "an {op} input has >= 1 channel"),
        NonZero("kh", Status.BAD_SHAPE, "an {op} window has >= 1 row"),
        NonZero("kw", Status.BAD_SHAPE, "an {op} window has >= 1 column"),
        NonZero("out_w", Status.BAD_SHAPE, "an {op} output has >= 1 column"),
        NonZero("stride", Status.BAD_FIELD, "an {op} stride is >= 1"),
        NonZero("dilation", Status.BAD_FIELD, "an {op} dilation is >= 1"),
        NonZero("pitch", Status.BAD_FIELD, "an {op} pixel takes >= 1 word"),
        PixelFits(),
        InRange("dst", ("m_blocks", "kh", "kw", "channels"), Buffer.INP, unless="pool"),
        InRange("dst", ("m_blocks", "channels"), Buffer.INP, when="pool"),
        TensorInRange(),
    ),
}
assert set(RULES) == set(Opcode)
for _rules in RULES.values():  # ADDR_RANGE last
    _kinds = [isinstance(rule, (InRange, StridedInRange, TensorInRange)) for rule in _rules]
    assert _kinds == sorted(_kinds), _rules


def strided_span(count: int, gap: int) -> int:
    """Words from the first to past the last of ``count`` words ``gap + 1`` apart (0 for none)."""
    return (count - 1) * (gap + 1) + 1 if count else 0


def tensor_span(operands: dict) -> int:
    """OUT words an IM2COL's input tensor spans from ``src`` (see :class:`TensorInRange`)."""
    pixels = operands["in_h"] * operands["in_w"]
    return -(-pixels >> operands["pack"]) * operands["pitch"]


def pixel_fits(cols: int, operands: dict) -> bool:
    """The :class:`PixelFits` rule on integers."""
    if operands["pack"]:
        return operands["channels"] <= cols >> operands["pack"]
    return operands["channels"] <= operands["pitch"] * cols


def extent_name(extent: tuple[str, ...]) -> str:
    """``extent`` as written in messages: ``"m_blocks*k"``, ``"1"`` for ``()``."""
    return "*".join(extent) or "1"


def extent_value(config: AccelConfig, extent: tuple[str, ...], operands: dict) -> int:
    """The product of ``extent`` for the operand values ``operands``."""
    return prod(config.rows if factor == "rows" else operands[factor] for factor in extent)


def limit_name(limit: Buffer | str, operands: dict) -> str:
    """The limit as written in messages: ``"INP depth"``, ``"mask_bits"``."""
    if limit == "mask_bits":
        return "mask_bits"
    return f"{Buffer(operands['buf'] if limit == 'buf' else limit).name} depth"


def limit_value(config: AccelConfig, limit: Buffer | str, operands: dict) -> int:
    """The limit for the operand values ``operands`` (``buf`` must name a buffer)."""
    if limit == "mask_bits":
        return config.mask_bits
    return config.depth(Buffer(operands["buf"]) if limit == "buf" else limit)
