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
from .isa import MASK_WORD_BITS, Buffer, Opcode, Status

__all__ = ["DefinedBuffer", "NonZero", "Multiple", "Disjoint", "InRange", "StridedInRange",
           "PixelFits", "TensorInRange", "NeedsPassUnit", "TiledFits", "GateInRange", "Rule",
           "RULES", "PASS_OPCODES", "strided_span", "tensor_span", "pixel_fits", "tiled_fits",
           "gate_span", "extent_name", "extent_value", "limit_name", "limit_value"]

#: Opcodes of the PASS unit: ``ILLEGAL_OPCODE`` on a configuration without it
#: (``Implementation.pass_unit``).
PASS_OPCODES = frozenset({Opcode.PATCH, Opcode.DILATE})


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
    """``BAD_FIELD`` when the ranges ``[a, a + n)`` and ``[b, b + m)`` overlap (both non-empty),
    with ``n`` the product of ``extent`` (see :class:`InRange`) and ``m`` that of ``extent_b``
    (``extent`` when not given)."""
    a: str
    b: str
    extent: tuple[str, ...]
    extent_b: tuple[str, ...] | None = None
    status: ClassVar[Status] = Status.BAD_FIELD

    def overlap(self, config: AccelConfig, operands: dict) -> bool:
        n = extent_value(config, self.extent, operands)
        m = extent_value(config, self.extent if self.extent_b is None else self.extent_b,
                         operands)
        a, b = operands[self.a], operands[self.b]
        return n > 0 and m > 0 and a < b + m and b < a + n


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


@dataclass(frozen=True)
class NeedsPassUnit:
    """``BAD_FIELD`` when 1-bit operand ``field`` is set on a configuration without the PASS
    unit (``Implementation.pass_unit``)."""
    field: str
    status: ClassVar[Status] = Status.BAD_FIELD


@dataclass(frozen=True)
class TiledFits:
    """``BAD_FIELD`` unless an IM2COL's PASS fields are consistent: ``gate`` needs ``tiled``;
    ``tiled`` needs whole patches (``AccelConfig.patch_shape`` ``(ph, pw)``): ``in_h`` and
    ``oy0`` multiples of ``ph``, ``in_w`` and ``out_w`` multiples of ``pw``."""
    status: ClassVar[Status] = Status.BAD_FIELD


@dataclass(frozen=True)
class GateInRange:
    """``ADDR_RANGE`` unless the MASK bits a gated instruction reads lie in MASK (checked only
    with ``gate``): see :func:`gate_span`."""
    status: ClassVar[Status] = Status.ADDR_RANGE


Rule = (DefinedBuffer | NonZero | Multiple | Disjoint | InRange | StridedInRange | PixelFits
        | TensorInRange | NeedsPassUnit | TiledFits | GateInRange)

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
        NeedsPassUnit("gate"),
        InRange("acc_addr", ("count",), Buffer.ACC),
        StridedInRange("out_addr", "count", "out_gap", Buffer.OUT),
        InRange("param_addr", (), Buffer.PARAM),
        GateInRange(),
    ),
    Opcode.PATCH: (
        NonZero("k", Status.BAD_SHAPE, "a {op} needs k >= 1"),
        Disjoint("new_addr", "ref_addr", ("blocks", "k")),
        InRange("new_addr", ("blocks", "k"), Buffer.OUT),
        InRange("ref_addr", ("blocks", "k"), Buffer.OUT),
        InRange("mask_idx", ("blocks",), "mask_bits"),
    ),
    Opcode.DILATE: (
        NonZero("kh", Status.BAD_SHAPE, "a {op} window has >= 1 row"),
        NonZero("kw", Status.BAD_SHAPE, "a {op} window has >= 1 column"),
        NonZero("stride_y", Status.BAD_FIELD, "a {op} stride is >= 1"),
        NonZero("stride_x", Status.BAD_FIELD, "a {op} stride is >= 1"),
        Disjoint("src", "dst", ("in_h", "in_w"), ("out_h", "out_w")),
        InRange("src", ("in_h", "in_w"), "mask_bits"),
        InRange("dst", ("out_h", "out_w"), "mask_bits"),
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
        NeedsPassUnit("tiled"),
        NeedsPassUnit("gate"),
        TiledFits(),
        InRange("dst", ("m_blocks", "kh", "kw", "channels"), Buffer.INP, unless="pool"),
        InRange("dst", ("m_blocks", "channels"), Buffer.INP, when="pool"),
        TensorInRange(),
        GateInRange(),
    ),
}
assert set(RULES) == set(Opcode)
for _rules in RULES.values():  # ADDR_RANGE last
    _kinds = [isinstance(rule, (InRange, StridedInRange, TensorInRange, GateInRange))
              for rule in _rules]
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


def tiled_fits(config: AccelConfig, operands: dict) -> bool:
    """The :class:`TiledFits` rule on integers."""
    if not operands["tiled"]:
        return not operands["gate"]
    ph, pw = config.patch_shape
    return not (operands["in_h"] % ph or operands["oy0"] % ph or operands["in_w"] % pw
                or operands["out_w"] % pw)


def gate_span(config: AccelConfig, op: Opcode, operands: dict) -> tuple[int, int]:
    """``(first, n)``: the MASK bits a gated instruction reads. REQUANT: ``mask_idx`` and one
    bit per started block of ``rows`` rows, ``ceil(count / rows)``; IM2COL: its first patch's
    bit ``mask_word*64 + oy0*out_w/rows`` and ``m_blocks``."""
    if op == Opcode.REQUANT:
        return operands["mask_idx"], -(-operands["count"] // config.rows)
    first_patch = operands["oy0"] * operands["out_w"] // config.rows
    return operands["mask_word"] * MASK_WORD_BITS + first_patch, operands["m_blocks"]


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
