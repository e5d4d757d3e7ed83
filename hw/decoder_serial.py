"""Decoder, the serial design (compact builds): the range checks one term at a time on one adder.

Same signature and verdicts as :class:`~.decoder.DecoderParallel` (see the :mod:`.decoder`
module docstring), no access sets; the terms and the status priority come from
:data:`~.decode_rules.RULES`. Built only for configurations without the PASS unit
(``Implementation`` forbids ``pass_unit`` with ``serial_decode``): the PASS opcodes are
``ILLEGAL_OPCODE`` and the PASS fields ``BAD_FIELD``, one multiplexer each in the status and no
term.
"""

from dataclasses import dataclass
from functools import reduce
from operator import and_, or_

from amaranth.hdl import Mux, Signal, signed

from ..errors import ConfigError
from .arith import mul_const
from .config import AccelConfig
from .decode_rules import (
    RULES,
    DefinedBuffer,
    Disjoint,
    InRange,
    Multiple,
    NeedsPassUnit,
    NonZero,
    PixelFits,
    StridedInRange,
    TensorInRange,
)
from .decoder import Decoder, _ranged, implemented, operands_of, pixel_fits
from .isa import BLOCKS_BITS, OPCODE_BITS, OPERANDS, Buffer, Opcode, Status

__all__ = ["DecoderSerial"]


@dataclass(frozen=True)
class _Term:
    """One serial check: is ``a + x*y`` greater than ``b``?

    Fields are ``(opcode, name)``. ``x`` is a tuple of factors, outermost first (``()`` is 1):
    block counts and window sizes of at most 8 bits, counted down like the digits of an
    odometer. ``y`` is 1, a field, ``"n_rows"`` (``n_blocks * rows``) or ``"q"`` (the
    tensor-words register). ``kind``:

    - ``"range"``: ``b`` an int limit ``C`` or ``"buf_depth"`` (the LOAD/STORE buffer's depth);
      the answer is an ADDR_RANGE fault. A term with ``when`` (``unless``) counts only when
      that 1-bit field is set (clear); an inactive term does not iterate.
    - ``"overlap"``: ``b`` a field (PATCH overlap).
    - ``"strided"``: a :class:`~.decode_rules.StridedInRange` (``b`` its limit, ``x`` the gap,
      counted as ``gap + 1``, ``y`` the count, ``aux`` the gap): ``a + 1 + (count - 1)*(gap +
      1) > b``, i.e. ``a + count*(gap + 1) > b + gap``; ``a > b`` when the count is 0.
    - ``"tensor_words"``: computes ``ceil(x*y / 2**pack)`` (``aux``: the pack field) into the
      tensor-words register for the next term, no answer.
    """
    a: object
    b: object
    x: tuple = ()
    y: object = 1
    when: tuple | None = None
    unless: tuple | None = None
    kind: str = "range"
    aux: tuple | None = None


def _factors(op: Opcode, extent: tuple[str, ...]) -> tuple[tuple, object]:
    """``extent`` as ``(x, y)`` of a term: ``x`` its leading factors of at most 8 bits (block
    counts, window sizes); ``y`` the rest: 1, an operand, or ``"n_rows"`` (``n_blocks *
    rows``)."""
    if extent[-2:] == ("n_blocks", "rows"):
        return tuple((op, name) for name in extent[:-2]), "n_rows"
    x = []
    while extent and OPERANDS[op][extent[0]].shape.width <= BLOCKS_BITS:
        x.append((op, extent[0]))
        extent = extent[1:]
    if not extent:
        return tuple(x), 1
    (factor,) = extent
    return tuple(x), (op, factor)


def _terms(cfg: AccelConfig) -> dict:
    """The :class:`_Term` s of :data:`~.decode_rules.RULES`, per opcode that has any (of the
    opcodes ``cfg`` implements: :func:`~.decoder.implemented`).

    An :class:`~.decode_rules.InRange` or :class:`~.decode_rules.StridedInRange` rule is one
    term (``b`` its limit; ``"buf_depth"``: the depth of the LOAD/STORE buffer); a
    :class:`~.decode_rules.Disjoint` rule is two, since ``[a, a+n)`` and ``[b, b+n)`` overlap
    iff ``b + n > a`` and ``a + n > b``; a :class:`~.decode_rules.TensorInRange` rule is two:
    the tensor's pixel words ``ceil(in_h*in_w / 2**pack)``, then ``src + pitch*words``.
    """
    terms = {}
    for op, rules in implemented(cfg).items():
        op_terms = []
        for rule in rules:
            if isinstance(rule, Disjoint):
                assert rule.extent_b is None, rule  # (DILATE's: a PASS opcode)
                x, y = _factors(op, rule.extent)
                op_terms += [_Term((op, rule.b), (op, rule.a), x, y, kind="overlap"),
                             _Term((op, rule.a), (op, rule.b), x, y, kind="overlap")]
            elif isinstance(rule, InRange):
                x, y = _factors(op, rule.extent) if rule.extent else ((), 1)
                limit = {"buf": "buf_depth", "mask_bits": cfg.mask_bits}.get(rule.limit)
                when, unless = (None if name is None else (op, name)
                                for name in (rule.when, rule.unless))
                op_terms.append(_Term((op, rule.base),
                                      cfg.depth(rule.limit) if limit is None else limit,
                                      x, y, when=when, unless=unless))
            elif isinstance(rule, StridedInRange):
                op_terms.append(_Term((op, rule.base), cfg.depth(rule.limit), ((op, rule.gap),),
                                      (op, rule.count), kind="strided", aux=(op, rule.gap)))
            elif isinstance(rule, TensorInRange):
                # (the tensor-words term needs in_h*in_w + 7 < 2**16)
                assert sum(OPERANDS[op][n].shape.width for n in ("in_h", "in_w")) <= 16
                op_terms += [_Term(1, None, ((op, "in_h"),), (op, "in_w"), kind="tensor_words",
                                   aux=(op, "pack")),
                             _Term((op, rule.base), cfg.depth(rule.limit), ((op, "pitch"),),
                                   "q")]
        if op_terms:
            terms[op] = op_terms
    return terms


def _field_slice(op: Opcode, name: str) -> tuple[int, int]:
    """(offset in the instruction word, width) of operand ``name`` of ``op``."""
    f = OPERANDS[op][name]
    return OPCODE_BITS + f.offset, f.shape.width


class DecoderSerial(Decoder):
    """The serial design: the terms of :func:`_terms` one after another on one 18-bit adder (up
    to a few hundred cycles per instruction), for builds where every LUT counts.

    IM2COL takes at most ``1 + 4*6 + (INP depth + 1) + 255 + 63 + 1`` cycles (one of its two
    window terms, by ``pool``, iterates and stops once past the depth; ``in_h`` iterations for
    the tensor words, ``pitch`` for the tensor): 857 on the iCE40 preset.

    Raises :class:`~tinyaccel.errors.ConfigError` for a configuration with the PASS unit."""

    def __init__(self, config: AccelConfig, *, access: bool = True):
        if config.impl.pass_unit:
            raise ConfigError(f"config {config.name!r}: DecoderSerial has no PASS checks, and "
                              f"the profile ({config.impl.name}) has the PASS unit")
        super().__init__(config, access=access)

    def _checks(self, m, word, status, buf_ok):
        """The terms of :func:`_terms`, one after another; returns the 'done' pulse.

        Per term: ``acc = a + ~b`` (``= a - b - 1``, ``b`` a limit or a field), then
        ``acc += y`` while the factors of ``x`` last and ``acc < 0``; the answer is ``acc >= 0``,
        i.e. ``a + x*y > b``. Stopping at ``acc >= 0`` keeps every value within 18 bits signed:
        ``acc < 0`` before each add and ``y < 2**16``; so a product never overflows, however
        large (IM2COL's ``m_blocks*kh*kw*channels``). A term takes 6 cycles plus its iterations
        (the operand is selected through two registers): at most ``limit + 1`` iterations
        (``y >= 1``), or the product of ``x``.
        """
        cfg = self._config
        ops = word.operands
        raw = word.as_value()
        terms = _terms(cfg)
        n_terms = max(len(t) for t in terms.values())
        im2col = operands_of(word, Opcode.IM2COL)

        def field(spec):
            offset, width = _field_slice(*spec)
            return raw[offset:offset + width]

        # operand sources: one per distinct (offset, width) of the word (fields of different
        # opcodes often share their place), the computed ones, and the limit of a range term
        sources = {}
        q = Signal(len(im2col.in_h) + len(im2col.in_w))  # tensor words (of a "tensor_words")

        def source(spec, invert=False):
            if spec in (1, "n_rows", "q"):
                key = (spec,)
            else:
                key = (*_field_slice(*spec), invert)
            if key not in sources:
                if spec == 1:
                    value = 1
                elif spec == "n_rows":
                    value = mul_const(ops.gemm.n_blocks, cfg.rows)
                elif spec == "q":
                    value = q
                else:
                    value = -1 - field(spec) if invert else field(spec)  # ~b = -b - 1
                sources[key] = (len(sources), value)
            return sources[key][0]

        for op_terms in terms.values():
            for term in op_terms:
                source(term.a), source(term.y)
                if term.kind == "overlap":
                    source(term.b, invert=True)
        limit = Signal(signed(18))  # ~C of a range term
        const_src = len(sources)
        sources[("limit",)] = (const_src, limit)

        # the factors of x, outermost first: an odometer of down-counting digits
        n_digits = max(len(term.x) for op_terms in terms.values() for term in op_terms)
        widths = [max(_field_slice(*term.x[i])[1] + (term.kind == "strided")
                      for op_terms in terms.values() for term in op_terms if len(term.x) > i)
                  for i in range(n_digits)]
        digits = [Signal(w, name=f"x{i}") for i, w in enumerate(widths)]
        x_val = [Signal(w, name=f"x{i}_val") for i, w in enumerate(widths)]

        t = Signal(range(n_terms + 1))
        acc = Signal(signed(18))
        range_fail = Signal()  # some term found an access out of range
        overlap = Signal()  # PATCH: every overlap term held
        div, div_start = self._divider(m, word)

        # -- term table: per (opcode, term) the sources of a, b, x, y ----------------------
        # The operand source is selected into a register, and the operand into another (the
        # table lookup, the dozen-way multiplexer and the add do not fit one iCE40 cycle), so it
        # reaches the adder two phases after its phase selected it:
        # phase 0 selects a; 1 selects ~b; 2 acc += a, selects y; 3 acc += ~b;
        # 4 acc += y (x times); 5 records the answer
        phase = Signal(range(6))
        is_range = Signal()  # the term is a range term (else an overlap term)
        latches = Signal()  # the term computes the tensor words (no answer)
        active = Signal()  # the term exists, its `when` holds and its `unless` does not
        a_sel, b_sel, y_sel = (Signal(range(len(sources)), name=f"{n}_sel") for n in "aby")
        with m.Switch(word.opcode):
            for op, op_terms in terms.items():
                with m.Case(op):
                    with m.Switch(t):
                        for i, term in enumerate(op_terms):
                            with m.Case(i):
                                m.d.comb += [
                                    active.eq((1 if term.when is None else field(term.when)) &
                                              (1 if term.unless is None
                                               else ~field(term.unless))),
                                    a_sel.eq(source(term.a)),
                                    y_sel.eq(source(term.y)),
                                ]
                                for digit, spec in zip(x_val, (term.x + (1,) * n_digits)[:n_digits],
                                                       strict=True):
                                    if spec == 1:
                                        m.d.comb += digit.eq(1)
                                    elif term.kind == "strided":  # gap + 1
                                        m.d.comb += digit.eq(field(spec) + 1)
                                    else:
                                        m.d.comb += digit.eq(field(spec))
                                if term.kind == "overlap":
                                    m.d.comb += b_sel.eq(source(term.b, invert=True))
                                    continue
                                m.d.comb += b_sel.eq(const_src)
                                if term.kind == "tensor_words":
                                    # acc = 1 + ~C + x*y ends as x*y + 2**p - 1 - 2**16
                                    # (< 0): bits 0-15 hold x*y + 2**p - 1 (< 2**16, x and y
                                    # 8 bits), ceil(x*y / 2**p) from bit p up
                                    m.d.comb += latches.eq(1)
                                    with m.Switch(field(term.aux)):
                                        for p in range(4):
                                            with m.Case(p):
                                                m.d.comb += limit.eq(
                                                    ~((1 << 16) - (1 << p) + 1))
                                    continue
                                m.d.comb += is_range.eq(1)
                                if term.b == "buf_depth":
                                    with m.Switch(ops.ldst.buf):
                                        for buf in Buffer:
                                            with m.Case(buf):
                                                m.d.comb += limit.eq(~cfg.depth(buf))
                                elif term.kind == "strided":  # (see _Term)
                                    m.d.comb += limit.eq(Mux(field(term.y) == 0, ~term.b,
                                                             ~term.b - field(term.aux)))
                                else:
                                    m.d.comb += limit.eq(~term.b)
        last_term = Signal()
        with m.Switch(word.opcode):
            for op, op_terms in terms.items():
                with m.Case(op):
                    m.d.comb += last_term.eq(t >= len(op_terms) - 1)
            with m.Default():
                m.d.comb += last_term.eq(1)

        sel = Signal(range(len(sources)))
        m.d.sync += sel.eq(Mux(phase == 0, a_sel, Mux(phase == 1, b_sel, y_sel)))
        operand = Signal(signed(18))
        with m.Switch(sel):
            for index, value in sources.values():
                with m.Case(index):
                    m.d.sync += operand.eq(value)

        def count_down(i):  # the odometer's next value: the innermost digit counts first
            if i == 0:
                m.d.sync += digits[0].eq(digits[0] - 1)
                return
            with m.If(digits[i] == 1):
                m.d.sync += digits[i].eq(x_val[i])
                count_down(i - 1)
            with m.Else():
                m.d.sync += digits[i].eq(digits[i] - 1)

        nonneg = ~acc[-1]
        x_left = reduce(and_, [digit != 0 for digit in digits])
        done = Signal()
        with m.FSM(name="checks"):
            with m.State("START"):
                m.d.sync += [t.eq(0), phase.eq(0), acc.eq(0), range_fail.eq(0),
                             overlap.eq(1)]
                m.d.comb += div.start.eq(div_start)
                m.next = "TERMS"
            with m.State("TERMS"):
                with m.Switch(phase):
                    with m.Case(0, 1):
                        m.d.sync += phase.eq(phase + 1)
                    with m.Case(2):
                        m.d.sync += [acc.eq(acc + operand), phase.eq(3)]
                        m.d.sync += [d.eq(val) for d, val in zip(digits, x_val, strict=True)]
                    with m.Case(3):
                        m.d.sync += [acc.eq(acc + operand), phase.eq(4)]
                    with m.Case(4):
                        with m.If(x_left & ~nonneg & active):
                            m.d.sync += acc.eq(acc + operand)
                            count_down(n_digits - 1)
                        with m.Else():
                            m.d.sync += phase.eq(5)
                    with m.Case(5):
                        with m.If(active & is_range & nonneg):
                            m.d.sync += range_fail.eq(1)
                        with m.If(active & ~is_range & ~latches & ~nonneg):
                            m.d.sync += overlap.eq(0)
                        with m.If(latches):
                            m.d.sync += q.eq(acc[:16] >> im2col.pack)
                        m.d.sync += [acc.eq(0), phase.eq(0), t.eq(t + 1)]
                        with m.If(last_term):
                            m.next = "RESULT"
            with m.State("RESULT"):
                with m.If(div.done):
                    m.d.sync += [status.eq(self._status(word, range_fail, overlap,
                                                        div.remainder)),
                                 buf_ok.eq(self._buf_ok(word))]
                    m.d.comb += done.eq(1)
                    m.next = "START"
        return done

    @staticmethod
    def _buf_ok(word):
        """The buffer code of a LOAD/STORE names a buffer (the :class:`DefinedBuffer` rule)."""
        checked = [(op, rule) for op, rules in RULES.items() for rule in rules
                   if isinstance(rule, DefinedBuffer)]
        op, rule = checked[0]
        return (reduce(or_, [word.opcode == op for op, _ in checked]) &
                (operands_of(word, op)[rule.field].as_value() < len(Buffer)))

    def _status(self, word, range_fail, overlap, remainder):
        """The verdict: per opcode the first failing rule of :data:`~.decode_rules.RULES`, from
        the flags the terms and the divider left."""
        fault = Mux(range_fail, Status.ADDR_RANGE, Status.OK)
        result = Status.ILLEGAL_OPCODE
        for op, rules in implemented(self._config).items():
            o = operands_of(word, op) if op in OPERANDS and OPERANDS[op] is not None else None
            value = fault if any(_ranged(rule) for rule in rules) else Status.OK
            for rule in reversed(rules):
                if isinstance(rule, DefinedBuffer):
                    value = Mux(DecoderSerial._buf_ok(word), value, rule.status)
                elif isinstance(rule, NonZero):
                    value = Mux(o[rule.field] == 0, rule.status, value)
                elif isinstance(rule, Disjoint):
                    value = Mux(overlap, rule.status, value)
                elif isinstance(rule, Multiple):
                    value = Mux(remainder != 0, rule.status, value)
                elif isinstance(rule, PixelFits):
                    value = Mux(pixel_fits(self._config, o), value, rule.status)
                elif isinstance(rule, NeedsPassUnit):
                    value = Mux(o[rule.field], rule.status, value)
            result = Mux(word.opcode == op, value, result)
        return result
