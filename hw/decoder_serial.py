"""Decoder, the serial design (compact builds): the range checks one term at a time on one adder.

Same signature, verdicts and access sets as :class:`~.decoder.DecoderParallel` (see the
:mod:`.decoder` module docstring); the terms and the status priority come from
:data:`~.decode_rules.RULES`.
"""

from dataclasses import dataclass
from functools import reduce
from operator import or_

from amaranth.hdl import Mux, Signal, signed

from .arith import mul_const
from .config import AccelConfig
from .decode_rules import RULES, DefinedBuffer, Disjoint, InRange, Multiple, NonZero
from .decoder import Decoder, operands_of
from .isa import BLOCKS_BITS, OPCODE_BITS, OPERANDS, Buffer, Opcode, Status

__all__ = ["DecoderSerial"]


@dataclass(frozen=True)
class _Term:
    """One serial check: is ``a + x*y`` greater than ``b``?

    Fields are ``(opcode, name)``; ``b`` is a field (PATCH overlap) or an int limit ``C``, in
    which case the answer is an ADDR_RANGE fault (``a + x*y > C``). ``x`` and ``y`` may be 1;
    ``y`` may be ``"n_rows"`` (``n_blocks * rows``). A term with ``when`` counts only when that
    1-bit field is set.
    """
    a: tuple
    b: object
    x: object = 1
    y: object = 1
    when: tuple | None = None


def _factors(op: Opcode, extent: tuple[str, ...]) -> tuple[object, object]:
    """``extent`` as ``(x, y)`` of a term: ``x`` its leading block count (at most 255), if any,
    else 1; ``y`` the rest: 1, an operand, or ``"n_rows"`` (``n_blocks * rows``)."""
    x = 1
    if extent and OPERANDS[op][extent[0]].shape.width <= BLOCKS_BITS:
        x, extent = (op, extent[0]), extent[1:]
    if not extent:
        return x, 1
    if extent == ("n_blocks", "rows"):
        return x, "n_rows"
    (factor,) = extent
    return x, (op, factor)


def _terms(cfg: AccelConfig) -> dict:
    """The :class:`_Term` s of :data:`~.decode_rules.RULES`, per opcode that has any.

    An :class:`~.decode_rules.InRange` rule is one term (``b`` its limit; ``"buf_depth"``: the
    depth of the LOAD/STORE buffer); a :class:`~.decode_rules.Disjoint` rule is two, since
    ``[a, a+n)`` and ``[b, b+n)`` overlap iff ``b + n > a`` and ``a + n > b``.
    """
    terms = {}
    for op, rules in RULES.items():
        op_terms = []
        for rule in rules:
            if isinstance(rule, Disjoint):
                x, y = _factors(op, rule.extent)
                op_terms += [_Term((op, rule.b), (op, rule.a), x, y),
                             _Term((op, rule.a), (op, rule.b), x, y)]
            elif isinstance(rule, InRange):
                x, y = _factors(op, rule.extent)
                limit = {"buf": "buf_depth", "mask_bits": cfg.mask_bits}.get(rule.limit)
                when = None if rule.when is None else (op, rule.when)
                op_terms.append(_Term((op, rule.base),
                                      cfg.depth(rule.limit) if limit is None else limit,
                                      x, y, when=when))
        if op_terms:
            terms[op] = op_terms
    return terms


def _field_slice(op: Opcode, name: str) -> tuple[int, int]:
    """(offset in the instruction word, width) of operand ``name`` of ``op``."""
    f = OPERANDS[op][name]
    return OPCODE_BITS + f.offset, f.shape.width


class DecoderSerial(Decoder):
    """The serial design: the terms of :func:`_terms` one after another on one 18-bit adder (up
    to a few hundred cycles per instruction), for builds where every LUT counts."""

    def _checks(self, m, word, status, buf_ok):
        """The terms of :func:`_terms`, one after another; returns the 'done' pulse.

        Per term: ``acc = a + ~b`` (``= a - b - 1``, ``b`` a limit or a field), then
        ``acc += y`` while ``x`` lasts and ``acc < 0``; the answer is ``acc >= 0``, i.e.
        ``a + x*y > b``. Stopping at ``acc >= 0`` keeps every value within 18 bits signed:
        ``acc < 0`` before each add and ``y < 2**16``. A term takes 6 cycles plus its
        iterations (the operand is selected through two registers).
        """
        cfg = self._config
        ops = word.operands
        raw = word.as_value()
        terms = _terms(cfg)
        n_terms = max(len(t) for t in terms.values())

        def field(spec):
            offset, width = _field_slice(*spec)
            return raw[offset:offset + width]

        # operand sources: one per distinct (offset, width) of the word (fields of different
        # opcodes often share their place), the computed ones, and the limit of a range term
        sources = {}

        def source(spec, invert=False):
            if spec in (1, "n_rows"):
                key = (spec,)
            else:
                key = (*_field_slice(*spec), invert)
            if key not in sources:
                if spec == 1:
                    value = 1
                elif spec == "n_rows":
                    value = mul_const(ops.gemm.n_blocks, cfg.rows)
                else:
                    value = -1 - field(spec) if invert else field(spec)  # ~b = -b - 1
                sources[key] = (len(sources), value)
            return sources[key][0]

        for op_terms in terms.values():
            for term in op_terms:
                source(term.a), source(term.y)
                if isinstance(term.b, tuple):
                    source(term.b, invert=True)
        limit = Signal(signed(18))  # ~C of a range term
        const_src = len(sources)
        sources[("limit",)] = (const_src, limit)

        t = Signal(range(n_terms + 1))
        acc = Signal(signed(18))
        xcnt = Signal(BLOCKS_BITS)
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
        active = Signal()  # the term exists and its `when` holds
        x_val = Signal(BLOCKS_BITS)
        a_sel, b_sel, y_sel = (Signal(range(len(sources)), name=f"{n}_sel") for n in "aby")
        with m.Switch(word.opcode):
            for op, op_terms in terms.items():
                with m.Case(op):
                    with m.Switch(t):
                        for i, term in enumerate(op_terms):
                            with m.Case(i):
                                m.d.comb += [
                                    active.eq(1 if term.when is None else field(term.when)),
                                    a_sel.eq(source(term.a)),
                                    y_sel.eq(source(term.y)),
                                    x_val.eq(1 if term.x == 1 else field(term.x)),
                                ]
                                if isinstance(term.b, tuple):
                                    m.d.comb += b_sel.eq(source(term.b, invert=True))
                                else:
                                    m.d.comb += [b_sel.eq(const_src), is_range.eq(1)]
                                    if term.b == "buf_depth":
                                        with m.Switch(ops.ldst.buf):
                                            for buf in Buffer:
                                                with m.Case(buf):
                                                    m.d.comb += limit.eq(~cfg.depth(buf))
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

        nonneg = ~acc[-1]
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
                        m.d.sync += [acc.eq(acc + operand), xcnt.eq(x_val), phase.eq(3)]
                    with m.Case(3):
                        m.d.sync += [acc.eq(acc + operand), phase.eq(4)]
                    with m.Case(4):
                        with m.If((xcnt != 0) & ~nonneg):
                            m.d.sync += [acc.eq(acc + operand), xcnt.eq(xcnt - 1)]
                        with m.Else():
                            m.d.sync += phase.eq(5)
                    with m.Case(5):
                        with m.If(active & is_range & nonneg):
                            m.d.sync += range_fail.eq(1)
                        with m.If(active & ~is_range & ~nonneg):
                            m.d.sync += overlap.eq(0)
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

    @staticmethod
    def _status(word, range_fail, overlap, remainder):
        """The verdict: per opcode the first failing rule of :data:`~.decode_rules.RULES`, from
        the flags the terms and the divider left."""
        fault = Mux(range_fail, Status.ADDR_RANGE, Status.OK)
        result = Status.ILLEGAL_OPCODE
        for op, rules in RULES.items():
            value = fault if any(isinstance(rule, InRange) for rule in rules) else Status.OK
            for rule in reversed(rules):
                if isinstance(rule, DefinedBuffer):
                    value = Mux(DecoderSerial._buf_ok(word), value, rule.status)
                elif isinstance(rule, NonZero):
                    value = Mux(operands_of(word, op)[rule.field] == 0, rule.status, value)
                elif isinstance(rule, Disjoint):
                    value = Mux(overlap, rule.status, value)
                elif isinstance(rule, Multiple):
                    value = Mux(remainder != 0, rule.status, value)
            result = Mux(word.opcode == op, value, result)
        return result
