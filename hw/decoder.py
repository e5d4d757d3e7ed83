"""Decoder: host beats -> checked instructions, and LOAD data passed through to the load unit.

For each instruction the decoder assembles the 128-bit word (``128 / host_width`` beats), runs
the section-5 checks and, for builds with hazard tracking, computes the instruction's access set
(:mod:`.hazards`), then offers the result on ``o_instr``. When a LOAD is taken it forwards the
LOAD's data beats on ``o_data`` before it reads the next instruction, so the input
stream never loses its place.

The checks need the products ``m_blocks*k``, ``n_blocks*k``, ``m_blocks*n_blocks`` (GEMM) and
``blocks*k`` (PATCH) and ``count mod stripe_len`` (SGQ); the iCE40 has no DSP to spare for them.

- Parallel checks (default): the products by shift-and-add, one multiplier bit per cycle and
  stopping early, the remainder by restoring division, then every range check at once.
- Serial checks (compact builds): every check is a *term* ``A + x*y`` compared with a limit,
  evaluated one after another on one 18-bit adder by repeated addition (``x`` is a count of at
  most 255, stopping as soon as the limit is passed), and the remainder by the same restoring
  division. Decode then takes up to a few hundred cycles, still far less than the 16 bytes of
  an instruction take on a UART.

Error priority when several checks fail: ILLEGAL_OPCODE, BAD_BUFFER, then the opcode's own checks
in the order of section 5 (GEMM/PATCH ``k = 0`` BAD_SHAPE, PATCH overlap BAD_FIELD, SGQ
``stripe_len = 0`` BAD_FIELD then ``count % stripe_len`` BAD_SHAPE), and ADDR_RANGE last.
"""

from dataclasses import dataclass

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .hazards import AccessLayout
from .isa import (
    BLOCKS_BITS,
    COUNT_BITS,
    INSTR_BITS,
    OPCODE_BITS,
    OPERANDS,
    Buffer,
    InstructionLayout,
    Opcode,
    Status,
)
from .scratchpads import geometry

__all__ = ["DecodedLayout", "Decoder"]


def DecodedLayout(config: AccelConfig, *, access: bool = True) -> data.StructLayout:
    """An instruction as the dispatcher receives it (with its access set if ``access``)."""
    fields = {
        "word": InstructionLayout,
        "status": Status,  # result of the decode checks
        "buf_ok": 1,  # LOAD/STORE: the buffer code is defined (data follows / is sent)
    }
    if access:
        fields["access"] = AccessLayout(config)
    return data.StructLayout(fields)


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


def _terms(cfg: AccelConfig) -> dict:
    depth = cfg.depth
    G, R, P = Opcode.GEMM, Opcode.REQUANT, Opcode.PATCH
    return {
        Opcode.LOAD: [_Term((Opcode.LOAD, "addr"), "buf_depth", 1, (Opcode.LOAD, "count"))],
        Opcode.STORE: [_Term((Opcode.LOAD, "addr"), "buf_depth", 1, (Opcode.LOAD, "count"))],
        G: [_Term((G, "inp_addr"), depth(Buffer.INP), (G, "m_blocks"), (G, "k")),
            _Term((G, "wgt_addr"), depth(Buffer.WGT), (G, "n_blocks"), (G, "k")),
            _Term((G, "acc_addr"), depth(Buffer.ACC), (G, "m_blocks"), "n_rows"),
            _Term((G, "mask_idx"), cfg.mask_bits, (G, "m_blocks"), 1, when=(G, "gate"))],
        R: [_Term((R, "acc_addr"), depth(Buffer.ACC), 1, (R, "count")),
            _Term((R, "out_addr"), depth(Buffer.OUT), 1, (R, "count")),
            _Term((R, "param_addr"), depth(Buffer.PARAM))],
        # overlap of [new, new+n) and [ref, ref+n): ref + n > new and new + n > ref
        P: [_Term((P, "ref_addr"), (P, "new_addr"), (P, "blocks"), (P, "k")),
            _Term((P, "new_addr"), (P, "ref_addr"), (P, "blocks"), (P, "k")),
            _Term((P, "new_addr"), depth(Buffer.INP), (P, "blocks"), (P, "k")),
            _Term((P, "ref_addr"), depth(Buffer.INP), (P, "blocks"), (P, "k")),
            _Term((P, "mask_idx"), cfg.mask_bits, (P, "blocks"), 1)],
        Opcode.SGQ: [_Term((Opcode.SGQ, "out_addr"), depth(Buffer.OUT), 1,
                           (Opcode.SGQ, "count"))],
    }


def _field_slice(op: Opcode, name: str) -> tuple[int, int]:
    """(offset in the instruction word, width) of operand ``name`` of ``op``."""
    f = OPERANDS[op][name]
    return OPCODE_BITS + f.offset, f.shape.width


class Decoder(wiring.Component):
    """Instruction fetch and decode-time checks (see module docstring).

    ``access``: also compute access sets (builds with hazard tracking). ``serial``: serial
    checks (compact builds).
    """

    def __init__(self, config: AccelConfig, *, access: bool = True, serial: bool = False):
        self._config = config
        self._access = access
        self._serial = serial
        hw = config.host_width
        super().__init__({
            "i_stream": In(stream.Signature(unsigned(hw))),
            "o_instr": Out(stream.Signature(DecodedLayout(config, access=access))),
            "o_data": Out(stream.Signature(unsigned(hw))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        hw = cfg.host_width
        n_beats = INSTR_BITS // hw

        word = Signal(InstructionLayout)
        beat = Signal(range(n_beats))
        out = self.o_instr.payload
        ops = word.operands
        status, buf_ok = Signal(Status), Signal()
        m.d.comb += [out.word.eq(word), out.status.eq(status), out.buf_ok.eq(buf_ok)]
        if self._access:
            self._access_reg = Signal.like(out.access)
            m.d.comb += out.access.eq(self._access_reg)

        # LOAD data to forward: whole words of `word_beats` beats each
        geoms = {buf: geometry(cfg, buf) for buf in Buffer}
        words_left = Signal(COUNT_BITS)
        data_beat = Signal(range(max(g.word_beats for g in geoms.values())))
        last_beat = Signal()
        with m.Switch(ops.ldst.buf):
            for buf, g in geoms.items():
                with m.Case(buf):
                    m.d.comb += last_beat.eq(data_beat == g.word_beats - 1)

        with m.FSM():
            with m.State("FETCH"):
                m.d.comb += self.i_stream.ready.eq(1)
                with m.If(self.i_stream.valid):
                    # (written in place, not shifted in: the reserved bits need no flip-flops)
                    m.d.sync += [
                        word.as_value().word_select(beat, hw).eq(self.i_stream.payload),
                        beat.eq(beat + 1),
                    ]
                    with m.If(beat == n_beats - 1):
                        m.d.sync += beat.eq(0)
                        m.next = "CHECK"
            with m.State("CHECK"):  # (statements of the checks only act in this state)
                done = (self._serial_checks if self._serial else self._parallel_checks)(
                    m, word, status, buf_ok)
                with m.If(done):
                    m.next = "OFFER"
            with m.State("OFFER"):
                m.d.comb += self.o_instr.valid.eq(1)
                # (loaded while offered, not when taken: `ready` comes late in the cycle)
                m.d.sync += [words_left.eq(ops.ldst.count), data_beat.eq(0)]
                with m.If(self.o_instr.ready):
                    with m.If((word.opcode == Opcode.LOAD) & buf_ok & (ops.ldst.count != 0)):
                        m.next = "DATA"
                    with m.Else():
                        m.next = "FETCH"
            with m.State("DATA"):  # a faulting LOAD still consumes its data
                m.d.comb += [
                    self.o_data.valid.eq(self.i_stream.valid),
                    self.o_data.payload.eq(self.i_stream.payload),
                    self.i_stream.ready.eq(self.o_data.ready),
                ]
                with m.If(self.o_data.valid & self.o_data.ready):
                    m.d.sync += data_beat.eq(data_beat + 1)
                    with m.If(last_beat):
                        m.d.sync += [data_beat.eq(0), words_left.eq(words_left - 1)]
                        with m.If(words_left == 1):
                            m.next = "FETCH"
        return m

    # -- parallel checks --------------------------------------------------------------------

    def _parallel_checks(self, m, word, status, buf_ok):
        """Products by shift-and-add, then all checks at once; returns the 'done' pulse.

        Cycles: 1 setup, ``bit_length(max(m_blocks, n_blocks))`` (GEMM, PATCH ``blocks``) or 16
        (SGQ) iterations (at least 1), 1 to register the result.
        """
        ops = word.operands
        m_a = Signal(BLOCKS_BITS)  # multiplier bits still to consume (m_blocks or blocks)
        m_b = Signal(BLOCKS_BITS)  # (n_blocks)
        k_sh = Signal(COUNT_BITS + BLOCKS_BITS)
        n_sh = Signal(2 * BLOCKS_BITS)
        p_mk = Signal(COUNT_BITS + BLOCKS_BITS)  # m_blocks*k or blocks*k
        p_nk = Signal(COUNT_BITS + BLOCKS_BITS)  # n_blocks*k
        p_mn = Signal(2 * BLOCKS_BITS)  # m_blocks*n_blocks
        div = _Divider(m, ops.sgq.count, ops.sgq.stripe_len)
        iter_done = (m_a == 0) & (m_b == 0) & div.done

        check = Signal(DecodedLayout(self._config, access=self._access))
        self._check(m, word, check, p_mk, p_nk, p_mn, div.remainder)

        done = Signal()
        with m.FSM(name="checks"):
            with m.State("SETUP"):
                m.d.sync += [
                    m_a.eq(0), m_b.eq(0),
                    p_mk.eq(0), p_nk.eq(0), p_mn.eq(0),
                    k_sh.eq(ops.gemm.k), n_sh.eq(ops.gemm.n_blocks),
                ]
                m.d.comb += div.start.eq(word.opcode == Opcode.SGQ)
                with m.Switch(word.opcode):
                    with m.Case(Opcode.GEMM):
                        m.d.sync += [m_a.eq(ops.gemm.m_blocks), m_b.eq(ops.gemm.n_blocks)]
                    with m.Case(Opcode.PATCH):
                        m.d.sync += [m_a.eq(ops.patch.blocks), k_sh.eq(ops.patch.k)]
                m.next = "ITERATE"
            with m.State("ITERATE"):
                m.d.sync += [m_a.eq(m_a >> 1), m_b.eq(m_b >> 1),
                             k_sh.eq(k_sh << 1), n_sh.eq(n_sh << 1)]
                with m.If(m_a[0]):
                    m.d.sync += [p_mk.eq(p_mk + k_sh), p_mn.eq(p_mn + n_sh)]
                with m.If(m_b[0]):
                    m.d.sync += p_nk.eq(p_nk + k_sh)
                with m.If(iter_done):
                    m.next = "RESULT"
            with m.State("RESULT"):
                m.d.sync += [status.eq(check.status), buf_ok.eq(check.buf_ok)]
                if self._access:
                    m.d.sync += self._access_reg.eq(check.access)
                m.d.comb += done.eq(1)
                m.next = "SETUP"
        return done

    def _check(self, m, word, out, p_mk, p_nk, p_mn, div_r):
        """Drives status, buf_ok (and the access set) of ``word`` into ``out``."""
        cfg = self._config
        ops = word.operands
        depth = {buf: cfg.depth(buf) for buf in Buffer}
        status = Signal(Status)
        buf_ok = Signal()
        acc = Signal(AccessLayout(cfg))

        def rng(buf, kind, lo, hi):
            r = acc[buf.name.lower()][kind]
            return [r.en.eq(1), r.lo.eq(lo), r.hi.eq(hi)]

        with m.Switch(word.opcode):
            with m.Case(Opcode.NOP, Opcode.SYNC):
                m.d.comb += status.eq(Status.OK)
            with m.Case(Opcode.LOAD, Opcode.STORE):
                o = ops.ldst
                end = o.addr + o.count
                kind = Mux(word.opcode == Opcode.LOAD, 1, 0)
                m.d.comb += status.eq(Status.BAD_BUFFER)
                with m.Switch(o.buf):
                    for buf in Buffer:
                        with m.Case(buf):
                            m.d.comb += [
                                buf_ok.eq(1),
                                status.eq(Mux(end > depth[buf], Status.ADDR_RANGE, Status.OK)),
                            ]
                            with m.If(kind):
                                m.d.comb += rng(buf, "w", o.addr, end)
                            with m.Else():
                                m.d.comb += rng(buf, "r", o.addr, end)
            with m.Case(Opcode.GEMM):
                o = ops.gemm
                inp_end = o.inp_addr + p_mk
                wgt_end = o.wgt_addr + p_nk
                acc_end = o.acc_addr + mul_const(p_mn, cfg.rows)
                in_range = ((inp_end <= depth[Buffer.INP]) & (wgt_end <= depth[Buffer.WGT]) &
                            (acc_end <= depth[Buffer.ACC]) &
                            (~o.gate | (o.mask_idx + o.m_blocks <= cfg.mask_bits)))
                with m.If(o.k == 0):
                    m.d.comb += status.eq(Status.BAD_SHAPE)
                with m.Elif(~in_range):
                    m.d.comb += status.eq(Status.ADDR_RANGE)
                m.d.comb += [
                    *rng(Buffer.INP, "r", o.inp_addr, inp_end),
                    *rng(Buffer.WGT, "r", o.wgt_addr, wgt_end),
                    *rng(Buffer.ACC, "w", o.acc_addr, acc_end),
                ]
                with m.If(o.accumulate):
                    m.d.comb += rng(Buffer.ACC, "r", o.acc_addr, acc_end)
                with m.If(o.gate):
                    m.d.comb += rng(Buffer.MASK, "r", 0, depth[Buffer.MASK])
            with m.Case(Opcode.REQUANT):
                o = ops.requant
                acc_end = o.acc_addr + o.count
                out_end = o.out_addr + o.count
                in_range = ((acc_end <= depth[Buffer.ACC]) & (out_end <= depth[Buffer.OUT]) &
                            (o.param_addr < depth[Buffer.PARAM]))
                with m.If(~in_range):
                    m.d.comb += status.eq(Status.ADDR_RANGE)
                m.d.comb += [
                    *rng(Buffer.ACC, "r", o.acc_addr, acc_end),
                    *rng(Buffer.PARAM, "r", o.param_addr, o.param_addr + 1),
                    *rng(Buffer.OUT, "w", o.out_addr, out_end),
                ]
            with m.Case(Opcode.PATCH):
                o = ops.patch
                new_end = o.new_addr + p_mk
                ref_end = o.ref_addr + p_mk
                overlap = (o.new_addr < ref_end) & (o.ref_addr < new_end)
                in_range = ((new_end <= depth[Buffer.INP]) & (ref_end <= depth[Buffer.INP]) &
                            (o.mask_idx + o.blocks <= cfg.mask_bits))
                with m.If(o.k == 0):
                    m.d.comb += status.eq(Status.BAD_SHAPE)
                with m.Elif(overlap):
                    m.d.comb += status.eq(Status.BAD_FIELD)
                with m.Elif(~in_range):
                    m.d.comb += status.eq(Status.ADDR_RANGE)
                m.d.comb += [
                    *rng(Buffer.INP, "r", Mux(o.new_addr < o.ref_addr, o.new_addr, o.ref_addr),
                         Mux(new_end > ref_end, new_end, ref_end)),
                    *rng(Buffer.INP, "w", o.ref_addr, ref_end),
                    *rng(Buffer.MASK, "r", 0, depth[Buffer.MASK]),
                    *rng(Buffer.MASK, "w", 0, depth[Buffer.MASK]),
                ]
            with m.Case(Opcode.SGQ):
                o = ops.sgq
                out_end = o.out_addr + o.count
                with m.If(o.stripe_len == 0):
                    m.d.comb += status.eq(Status.BAD_FIELD)
                with m.Elif(div_r != 0):
                    m.d.comb += status.eq(Status.BAD_SHAPE)
                with m.Elif(out_end > depth[Buffer.OUT]):
                    m.d.comb += status.eq(Status.ADDR_RANGE)
                m.d.comb += rng(Buffer.OUT, "r", o.out_addr, out_end)
            with m.Default():
                m.d.comb += status.eq(Status.ILLEGAL_OPCODE)

        m.d.comb += [out.status.eq(status), out.buf_ok.eq(buf_ok)]
        if self._access:
            m.d.comb += out.access.eq(acc)

    # -- serial checks ----------------------------------------------------------------------

    def _serial_checks(self, m, word, status, buf_ok):
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
        div = _Divider(m, ops.sgq.count, ops.sgq.stripe_len)

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
                m.d.comb += div.start.eq(word.opcode == Opcode.SGQ)
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
        return (((word.opcode == Opcode.LOAD) | (word.opcode == Opcode.STORE)) &
                (word.operands.ldst.buf.as_value() < len(Buffer)))

    @staticmethod
    def _status(word, range_fail, overlap, remainder):
        ops = word.operands
        fault = Mux(range_fail, Status.ADDR_RANGE, Status.OK)
        shape = {
            Opcode.NOP: Status.OK,
            Opcode.SYNC: Status.OK,
            Opcode.LOAD: Mux(Decoder._buf_ok(word), fault, Status.BAD_BUFFER),
            Opcode.STORE: Mux(Decoder._buf_ok(word), fault, Status.BAD_BUFFER),
            Opcode.GEMM: Mux(ops.gemm.k == 0, Status.BAD_SHAPE, fault),
            Opcode.REQUANT: fault,
            Opcode.PATCH: Mux(ops.patch.k == 0, Status.BAD_SHAPE,
                              Mux(overlap, Status.BAD_FIELD, fault)),
            Opcode.SGQ: Mux(ops.sgq.stripe_len == 0, Status.BAD_FIELD,
                            Mux(remainder != 0, Status.BAD_SHAPE, fault)),
        }
        result = Status.ILLEGAL_OPCODE
        for op, value in shape.items():
            result = Mux(word.opcode == op, value, result)
        return result


class _Divider:
    """``dividend mod divisor`` by restoring division, one dividend bit per cycle (16 cycles)
    after ``start``; a zero divisor leaves the remainder 0 and finishes at once."""

    def __init__(self, m, dividend, divisor):
        self.start = Signal()
        self.remainder = Signal(len(divisor))
        index = Signal(range(len(dividend) + 1))  # dividend bits still to shift in
        self.done = index == 0
        r2 = Cat(dividend.bit_select((index - 1).as_unsigned(), 1), self.remainder)
        with m.If(self.start):
            m.d.sync += [self.remainder.eq(0),
                         index.eq(Mux(divisor == 0, 0, len(dividend)))]
        with m.Elif(~self.done):
            m.d.sync += [self.remainder.eq(Mux(r2 >= divisor, r2 - divisor, r2)),
                         index.eq(index - 1)]
