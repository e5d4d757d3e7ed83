"""Decoder: host beats -> checked instructions, and LOAD data passed through to the load unit.

For each instruction the decoder assembles the 128-bit word (``128 / host_width`` beats), runs
the section-5 checks and, for builds with hazard tracking, computes the instruction's access set
(:mod:`.hazards`), then offers the result on ``o_instr``. When a LOAD is taken it forwards the
LOAD's data beats on ``o_data`` before it reads the next instruction, so the input
stream never loses its place. ``in_boundary`` says the input is between instructions: no part of
a word taken and no LOAD data due (a LOAD whose data will be discarded included).

The checks are those of :data:`.decode_rules.RULES`. They need the products ``m_blocks*k``,
``n_blocks*k``, ``m_blocks*n_blocks`` (GEMM), ``blocks*k`` (PATCH), ``(count - 1)*(out_gap + 1)``
(the strided REQUANT), ``m_blocks*kh*kw*channels`` (``m_blocks*channels`` with ``pool``),
``ceil(in_h*in_w / 2**pack)*pitch`` and, gated, ``oy0*out_w`` (IM2COL), ``in_h*in_w`` and
``out_h*out_w`` (DILATE), and ``count mod stripe_len`` (SGQ); the iCE40 has no DSP to spare for
them. The PASS rules (:class:`~.decode_rules.NeedsPassUnit`, :class:`~.decode_rules.TiledFits`,
:class:`~.decode_rules.GateInRange`, the opcodes of :data:`~.decode_rules.PASS_OPCODES`) are
built for the configuration's ``Implementation.pass_unit``: without it the PASS opcodes are
``ILLEGAL_OPCODE`` and the PASS fields ``BAD_FIELD``, and nothing else of them is built. Two
designs with one signature, :class:`Decoder`:

- :class:`DecoderParallel` (here): the products by shift-and-add, one multiplier bit per cycle and
  stopping early (IM2COL's in two rounds, at full width: no product wraps), the remainder by
  restoring division, then every check at once; at most 25 cycles (IM2COL).
- :class:`~.decoder_serial.DecoderSerial` (compact builds): every range check is a *term*
  ``A + x*y`` compared with a limit, evaluated one after another on one 18-bit adder by repeated
  addition (``x`` a product of counts of at most 8 bits each, stopping as soon as the limit is
  passed, so that no product overflows), and the remainder by the same restoring division.
  Decode then takes up to a few hundred cycles (IM2COL: up to about the INP depth plus 340),
  still far less than the 16 bytes of an instruction take on a UART. It is built only for
  configurations without the PASS unit (``Implementation`` forbids ``pass_unit`` with
  ``serial_decode``).

Error priority when several checks fail: ILLEGAL_OPCODE, then the opcode's rules in the order of
:data:`~.decode_rules.RULES` (BAD_BUFFER; GEMM/PATCH ``k = 0`` BAD_SHAPE, PATCH overlap
BAD_FIELD, SGQ ``stripe_len = 0`` BAD_FIELD then ``count % stripe_len`` BAD_SHAPE, IM2COL's
zero fields, PixelFits, the PASS fields, then TiledFits; DILATE's zero fields then overlap), and
ADDR_RANGE last.
"""

from functools import reduce
from operator import and_, or_

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .decode_rules import (
    PASS_OPCODES,
    RULES,
    Disjoint,
    GateInRange,
    InRange,
    Multiple,
    NeedsPassUnit,
    NonZero,
    PixelFits,
    StridedInRange,
    TensorInRange,
    TiledFits,
)
from .hazards import AccessLayout
from .isa import (
    BLOCKS_BITS,
    COUNT_BITS,
    INSTR_BITS,
    MASK_WORD_BITS,
    OPERANDS,
    PITCH_BITS,
    Buffer,
    InstructionLayout,
    Opcode,
    OperandsLayout,
    Status,
)
from .scratchpads import geometry

__all__ = ["DecodedLayout", "OPERAND_VIEW", "operands_of", "pixel_fits", "applies",
           "implemented", "Decoder", "DecoderParallel"]


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


#: The member of the operand union that holds each opcode's operands (``ldst`` for LOAD/STORE).
OPERAND_VIEW: dict[Opcode, str] = {
    op: name for name, member in OperandsLayout for op, layout in OPERANDS.items()
    if layout is not None and data.Layout.cast(member.shape) == layout
}


def operands_of(word, op: Opcode) -> data.View:
    """The operands of ``op`` in the instruction word ``word`` (an ``InstructionLayout`` view)."""
    return word.operands[OPERAND_VIEW[op]]


def pixel_fits(config: AccelConfig, o) -> Value:
    """The :class:`~.decode_rules.PixelFits` rule on the IM2COL operands ``o`` (constants and one
    shift-and-add of ``pitch``)."""
    room = Mux(o.pack == 0, mul_const(o.pitch, config.cols),
               Mux(o.pack == 1, config.cols >> 1,
                   Mux(o.pack == 2, config.cols >> 2, config.cols >> 3)))
    return o.channels <= room


def applies(rule, o) -> Value | None:
    """Whether the (:class:`~.decode_rules.InRange`) ``rule`` is checked for the operands
    ``o``: its ``when`` set and its ``unless`` clear; ``None`` when it always is."""
    terms = []
    if getattr(rule, "when", None) is not None:
        terms.append(Value.cast(o[rule.when]))
    if getattr(rule, "unless", None) is not None:
        terms.append(~Value.cast(o[rule.unless]))
    return reduce(and_, terms) if terms else None


def _ranged(rule) -> bool:
    """``rule`` is an ADDR_RANGE check (they come last)."""
    return isinstance(rule, (InRange, StridedInRange, TensorInRange, GateInRange))


def implemented(config: AccelConfig) -> dict:
    """The opcodes ``config`` implements (the :data:`~.decode_rules.PASS_OPCODES` only with
    ``Implementation.pass_unit``; the others are ``ILLEGAL_OPCODE``) and their rules, those that
    can fail there: without the PASS unit :class:`~.decode_rules.TiledFits` and
    :class:`~.decode_rules.GateInRange` cannot (their fields are 0 once the
    :class:`~.decode_rules.NeedsPassUnit` rules before them pass); with it
    :class:`~.decode_rules.NeedsPassUnit` cannot."""
    passing = (NeedsPassUnit,) if config.impl.pass_unit else (TiledFits, GateInRange)
    return {op: tuple(rule for rule in rules if not isinstance(rule, passing))
            for op, rules in RULES.items() if config.impl.pass_unit or op not in PASS_OPCODES}


def tiled_misfits(config: AccelConfig, o) -> Value:
    """The :class:`~.decode_rules.TiledFits` rule fails on the IM2COL operands ``o``: ``gate``
    without ``tiled``, or ``tiled`` with a field not a multiple of the patch side it must be
    (powers of two: the low bits are 0)."""
    ph, pw = config.patch_shape
    misaligned = reduce(or_, [o[name][:side.bit_length() - 1] != 0 for name, side in
                              (("in_h", ph), ("oy0", ph), ("in_w", pw), ("out_w", pw))
                              if side > 1], Const(0))
    return Mux(o.tiled, misaligned, o.gate)


class Decoder(wiring.Component):
    """Instruction fetch, LOAD data pass-through and the decode-time checks (see the module
    docstring): the signature and the fetch machine of both designs, :class:`DecoderParallel`
    and :class:`~.decoder_serial.DecoderSerial`.

    ``access``: also compute access sets (builds with hazard tracking). Each design supplies
    ``_checks(m, word, status, buf_ok)``, which adds the checks of ``word`` (acting in state
    CHECK only) that load ``status`` and ``buf_ok`` (and ``self._access_reg``), and returns
    their 'done' pulse.
    """

    def __init__(self, config: AccelConfig, *, access: bool = True):
        self._config = config
        self._access = access
        hw = config.host_width
        super().__init__({
            "i_stream": In(stream.Signature(unsigned(hw))),
            "o_instr": Out(stream.Signature(DecodedLayout(config, access=access))),
            "o_data": Out(stream.Signature(unsigned(hw))),
            "in_boundary": Out(1),
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

        # At an instruction boundary: no part of a word fetched and no LOAD data due. A fetched
        # word is whole while it is checked and offered; only a LOAD that will take data (its
        # buffer defined and count > 0, whether it executes or is discarded) keeps it 0.
        data_due = ((word.opcode == Opcode.LOAD) & (ops.ldst.count != 0)
                    & (ops.ldst.buf.as_value() < len(Buffer)))
        with m.FSM():
            with m.State("FETCH"):
                m.d.comb += [self.i_stream.ready.eq(1), self.in_boundary.eq(beat == 0)]
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
                m.d.comb += self.in_boundary.eq(~data_due)
                done = self._checks(m, word, status, buf_ok)
                with m.If(done):
                    m.next = "OFFER"
            with m.State("OFFER"):
                m.d.comb += [self.o_instr.valid.eq(1), self.in_boundary.eq(~data_due)]
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

    @staticmethod
    def _divider(m, word):
        """The restoring divider of the :class:`~.decode_rules.Multiple` rule (SGQ ``count mod
        stripe_len``) and the condition to start it on."""
        ((op, rule),) = [(op, rule) for op, rules in RULES.items() for rule in rules
                         if isinstance(rule, Multiple)]
        o = operands_of(word, op)
        return _Divider(m, o[rule.field], o[rule.of]), word.opcode == op


class DecoderParallel(Decoder):
    """The parallel design: products by shift-and-add, then every check at once (a few cycles
    per instruction, a few tens for IM2COL)."""

    def _checks(self, m, word, status, buf_ok):
        """Products by shift-and-add, then all checks at once; returns the 'done' pulse.

        Cycles: 1 setup, then the first products: ``bit_length(max(m_blocks, n_blocks))`` (GEMM,
        PATCH ``blocks``), 16 (SGQ), ``bit_length(out_gap + 1)`` (REQUANT),
        ``bit_length(max(in_h, out_h))`` (DILATE) or ``bit_length(max(kh, kw, in_h))`` (IM2COL;
        ``kh``, ``kw`` taken as 1 with ``pool``) iterations plus 1; IM2COL then multiplies the
        partial products (``bit_length(max(m_blocks*kh, oy0))`` iterations plus 1); 1 to
        register the result. At most 25 cycles (IM2COL); DILATE at most 11, PATCH 11.
        """
        ops = word.operands
        m_a = Signal(BLOCKS_BITS)  # multiplier bits still to consume (m_blocks or blocks)
        m_b = Signal(BLOCKS_BITS)  # (n_blocks)
        k_sh = Signal(COUNT_BITS + BLOCKS_BITS)
        n_sh = Signal(2 * BLOCKS_BITS)
        p_mk = Signal(COUNT_BITS + BLOCKS_BITS)  # m_blocks*k or blocks*k
        p_nk = Signal(COUNT_BITS + BLOCKS_BITS)  # n_blocks*k
        p_mn = Signal(2 * BLOCKS_BITS)  # m_blocks*n_blocks
        div, div_start = self._divider(m, word)
        spans, spans_done, stage1, stage2, stage2_done = self._spans(m, word)
        iter_done = (m_a == 0) & (m_b == 0) & div.done & spans_done

        check = Signal(DecodedLayout(self._config, access=self._access))
        products = {("m_blocks", "k"): p_mk, ("n_blocks", "k"): p_nk,
                    ("m_blocks", "n_blocks"): p_mn, **spans}
        if Opcode.PATCH in implemented(self._config):
            products["blocks", "k"] = p_mk
        self._check(m, word, check, products, div.remainder)

        done = Signal()
        with m.FSM(name="checks"):
            with m.State("SETUP"):
                m.d.sync += [
                    m_a.eq(0), m_b.eq(0),
                    p_mk.eq(0), p_nk.eq(0), p_mn.eq(0),
                    k_sh.eq(ops.gemm.k), n_sh.eq(ops.gemm.n_blocks),
                ]
                m.d.comb += [div.start.eq(div_start), stage1.eq(1)]
                with m.Switch(word.opcode):
                    with m.Case(Opcode.GEMM):
                        m.d.sync += [m_a.eq(ops.gemm.m_blocks), m_b.eq(ops.gemm.n_blocks)]
                    if ("blocks", "k") in products:
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
                    with m.If(word.opcode == Opcode.IM2COL):
                        m.d.comb += stage2.eq(1)
                        m.next = "ITERATE2"
                    with m.Else():
                        m.next = "RESULT"
            with m.State("ITERATE2"):  # (IM2COL) the products of the partial products
                with m.If(stage2_done):
                    m.next = "RESULT"
            with m.State("RESULT"):
                m.d.sync += [status.eq(check.status), buf_ok.eq(check.buf_ok)]
                if self._access:
                    m.d.sync += self._access_reg.eq(check.access)
                m.d.comb += done.eq(1)
                m.next = "SETUP"
        return done

    def _spans(self, m, word):
        """The spans of REQUANT's :class:`~.decode_rules.StridedInRange`, IM2COL's 4-factor
        :class:`~.decode_rules.InRange`, :class:`~.decode_rules.TensorInRange` and (with the
        PASS unit) :class:`~.decode_rules.GateInRange`, and DILATE's two 2-factor extents, on
        three shift-and-add multipliers started with the other products.

        Returns ``({key: span}, first products done, stage-1 start, stage-2 start (both to
        drive), stage 2 done)``; keys are an extent tuple or a rule class. IM2COL's extent
        ``f0*f1*f2*f3`` is ``(f0*f1) * (f2*f3)``, at full width; its tensor ``ceil(in_h*in_w /
        2**pack) * pitch``; its gate's first patch needs ``oy0*out_w`` (stage 2, on the
        multiplier of ``f2*f3``). DILATE's extents are ``x`` and ``z`` of stage 1.
        """
        cfg = self._config
        ops = implemented(cfg)
        (strided,) = [r for r in RULES[Opcode.REQUANT] if isinstance(r, StridedInRange)]
        windows = [r for r in RULES[Opcode.IM2COL] if isinstance(r, InRange) and r.extent]
        (extent,) = [r.extent for r in windows if len(r.extent) == 4]
        rq, ic = operands_of(word, Opcode.REQUANT), operands_of(word, Opcode.IM2COL)
        # the other window extents (pool's m_blocks*channels) are products of some of these
        # factors: while such a rule applies (the rules of one base exclude each other), the
        # factors it lacks are 1, and x.product is its extent
        others = [r for r in windows if r.extent != extent]
        assert all(set(r.extent) < set(extent) and applies(r, ic) is not None for r in others)
        f = []
        for name in extent:
            lacking = [applies(r, ic) for r in others if name not in r.extent]
            f.append(Mux(reduce(or_, lacking), 1, ic[name]) if lacking else ic[name])
        # the narrower factor is the multiplier (its bits are the iterations)
        pair_a, pair_b = (sorted(f[i:i + 2], key=len, reverse=True) for i in (0, 2))
        wa, wb = len(pair_a[0]) + len(pair_a[1]), len(pair_b[0]) + len(pair_b[1])
        gated = any(isinstance(r, GateInRange) for r in ops[Opcode.IM2COL])
        # DILATE: the distinct extents of its ranges, two factors each (x and z)
        dilate = []
        if Opcode.DILATE in ops:
            do = operands_of(word, Opcode.DILATE)
            for rule in ops[Opcode.DILATE]:
                for ext in ((rule.extent, rule.extent_b or rule.extent)
                            if isinstance(rule, Disjoint) else
                            (rule.extent,) if isinstance(rule, InRange) else ()):
                    if ext not in dilate:
                        dilate.append(ext)
            assert len(dilate) == 2 and all(len(ext) == 2 for ext in dilate), dilate
        x = _Multiplier(m, max(wa, wb), min(wa, wb), "mul_x")  # f0*f1, then the extent
        # f2*f3; gated IM2COL: oy0*out_w (stage 2)
        y = _Multiplier(m, max([len(pair_b[0])] + ([len(ic.out_w)] if gated else [])),
                        max([len(pair_b[1])] + ([len(ic.oy0)] if gated else [])), "mul_y")
        count = rq[strided.count]
        # z: in_w*in_h then tensor_words*pitch; REQUANT (count - 1)*(out_gap + 1)
        z = _Multiplier(m, max(len(count), len(ic.in_w)), max(len(ic.in_h), PITCH_BITS + 1),
                        "mul_z")
        dilate = dict(zip(dilate, (x, z)[:len(dilate)], strict=True))  # extent: multiplier
        for (f_b, f_a), mul in dilate.items():
            assert len(do[f_a]) <= len(mul.a) and len(do[f_b]) <= len(mul.b)
        stage1, stage2 = Signal(), Signal()
        tensor_words = Signal(len(ic.in_h) + len(ic.in_w))  # ceil(in_h*in_w / 2**pack)
        m.d.comb += tensor_words.eq((z.product + (Const(1, 4) << ic.pack) - 1) >> ic.pack)
        with m.If(stage2):
            narrow, wide = (x.product, y.product) if wa <= wb else (y.product, x.product)
            m.d.comb += [x.start.eq(1), x.a.eq(wide), x.b.eq(narrow),
                         z.start.eq(1), z.a.eq(tensor_words), z.b.eq(ic.pitch)]
            if gated:
                m.d.comb += [y.start.eq(1), y.a.eq(ic.out_w), y.b.eq(ic.oy0)]
        with m.Elif(stage1):  # (every instruction starts them, with 0 when unused)
            m.d.comb += [x.start.eq(1), y.start.eq(1), z.start.eq(1)]
            with m.Switch(word.opcode):
                with m.Case(Opcode.IM2COL):
                    m.d.comb += [x.a.eq(pair_a[0]), x.b.eq(pair_a[1]),
                                 y.a.eq(pair_b[0]), y.b.eq(pair_b[1]),
                                 z.a.eq(ic.in_w), z.b.eq(ic.in_h)]
                with m.Case(Opcode.REQUANT):  # (count - 1)*(out_gap + 1)
                    m.d.comb += [z.a.eq(count - 1),
                                 z.b.eq(rq[strided.gap] + 1)]
                if dilate:
                    with m.Case(Opcode.DILATE):
                        for (f_b, f_a), mul in dilate.items():
                            m.d.comb += [mul.a.eq(do[f_a]), mul.b.eq(do[f_b])]
        spans = {
            **{r.extent: x.product for r in windows},
            StridedInRange: Mux(count == 0, 0, z.product + 1),
            TensorInRange: z.product,
            **{ext: mul.product for ext, mul in dilate.items()},
        }
        if gated:
            spans[GateInRange] = y.product
        return spans, x.done & y.done & z.done, stage1, stage2, x.done & y.done & z.done

    def _check(self, m, word, out, products, div_r):
        """Drives status, buf_ok (and the access set) of ``word`` into ``out``."""
        cfg = self._config
        depth = {buf: cfg.depth(buf) for buf in Buffer}
        status = Signal(Status)
        buf_ok = Signal()
        acc = Signal(AccessLayout(cfg))

        def rng(buf, kind, lo, hi):
            r = acc[buf.name.lower()][kind]
            return [r.en.eq(1), r.lo.eq(lo), r.hi.eq(hi)]

        rules = implemented(cfg)

        def gated(op):  # the opcode's `gate` is implemented
            return any(isinstance(rule, GateInRange) for rule in rules[op])

        # MASK ranges are in bits, the MASK buffer's depth in words: a MASK access is the whole
        # buffer (MASK's reader and writer need its single ports anyway, see hw/hazards.py)
        def access_set(op, o, end):  # (hw/hazards.py) from the ends of the ranges of the rules
            if op == Opcode.GEMM:
                m.d.comb += [
                    *rng(Buffer.INP, "r", o.inp_addr, end["inp_addr"]),
                    *rng(Buffer.WGT, "r", o.wgt_addr, end["wgt_addr"]),
                    *rng(Buffer.ACC, "w", o.acc_addr, end["acc_addr"]),
                ]
                with m.If(o.accumulate):
                    m.d.comb += rng(Buffer.ACC, "r", o.acc_addr, end["acc_addr"])
                with m.If(o.gate):
                    m.d.comb += rng(Buffer.MASK, "r", 0, depth[Buffer.MASK])
            elif op == Opcode.REQUANT:
                m.d.comb += [
                    *rng(Buffer.ACC, "r", o.acc_addr, end["acc_addr"]),
                    *rng(Buffer.PARAM, "r", o.param_addr, o.param_addr + 1),
                    *rng(Buffer.OUT, "w", o.out_addr, end["out_addr"]),
                ]
                if gated(op):
                    with m.If(o.gate):
                        m.d.comb += rng(Buffer.MASK, "r", 0, depth[Buffer.MASK])
            elif op == Opcode.PATCH:
                # OUT: one read range, the hull of the new and the reference tiles
                new_end, ref_end = end["new_addr"], end["ref_addr"]
                m.d.comb += [
                    *rng(Buffer.OUT, "r", Mux(o.new_addr < o.ref_addr, o.new_addr, o.ref_addr),
                         Mux(new_end > ref_end, new_end, ref_end)),
                    *rng(Buffer.OUT, "w", o.ref_addr, ref_end),
                    *rng(Buffer.MASK, "r", 0, depth[Buffer.MASK]),
                    *rng(Buffer.MASK, "w", 0, depth[Buffer.MASK]),
                ]
            elif op == Opcode.DILATE:
                m.d.comb += [
                    *rng(Buffer.MASK, "r", 0, depth[Buffer.MASK]),
                    *rng(Buffer.MASK, "w", 0, depth[Buffer.MASK]),
                ]
            elif op == Opcode.SGQ:
                m.d.comb += rng(Buffer.OUT, "r", o.out_addr, end["out_addr"])
            elif op == Opcode.IM2COL:
                m.d.comb += [
                    *rng(Buffer.OUT, "r", o.src, end["src"]),
                    *rng(Buffer.INP, "w", o.dst, end["dst"]),
                ]
                if gated(op):
                    with m.If(o.gate):
                        m.d.comb += rng(Buffer.MASK, "r", 0, depth[Buffer.MASK])

        with m.Switch(word.opcode):
            with m.Case(Opcode.NOP, Opcode.SYNC):
                m.d.comb += status.eq(Status.OK)
            with m.Case(Opcode.LOAD, Opcode.STORE):
                # the rules of both (DefinedBuffer, then InRange up to the depth of `buf`), one
                # buffer code per case
                o = word.operands.ldst
                end = self._ends(o, Opcode.LOAD, products)["addr"]
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
            for op in rules:  # (the PASS opcodes without the PASS unit: ILLEGAL_OPCODE)
                if op in (Opcode.NOP, Opcode.SYNC, Opcode.LOAD, Opcode.STORE):
                    continue
                with m.Case(op):
                    o = operands_of(word, op)
                    end = self._ends(o, op, products)
                    self._verdict(m, op, o, end, products, div_r, status)
                    access_set(op, o, end)
            with m.Default():
                m.d.comb += status.eq(Status.ILLEGAL_OPCODE)

        m.d.comb += [out.status.eq(status), out.buf_ok.eq(buf_ok)]
        if self._access:
            m.d.comb += out.access.eq(acc)

    def _ends(self, o, op, products):
        """``{base: base + span}`` for every range the rules of ``op`` name (one adder each,
        shared by the checks and the access set); ``o``: the operands of ``op``."""
        ends = {}
        for rule in RULES[op]:
            if isinstance(rule, InRange) and rule.extent:
                pairs = [(rule.base, rule.extent)]
            elif isinstance(rule, (StridedInRange, TensorInRange)):
                pairs = [(rule.base, type(rule))]
            elif isinstance(rule, Disjoint):
                pairs = [(rule.a, rule.extent), (rule.b, rule.extent_b or rule.extent)]
            else:
                continue
            for base, extent in pairs:  # (the first rule of a base gives its span)
                if base not in ends:
                    span = (products[extent] if not isinstance(extent, tuple)
                            else self._extent(o, extent, products))
                    ends[base] = o[base] + span
        return ends

    def _gate_end(self, op, o, products):
        """The end of the MASK bits a gated ``op`` reads (:func:`~.decode_rules.gate_span`):
        REQUANT ``mask_idx + ceil(count / rows)``, IM2COL ``mask_word*64 + oy0*out_w/rows +
        m_blocks`` (``rows`` a power of two: the PASS patch)."""
        ph, pw = self._config.patch_shape  # (raises for rows not a power of two)
        shift = (ph * pw).bit_length() - 1
        if op == Opcode.REQUANT:
            return o.mask_idx + ((o.count + (self._config.rows - 1)) >> shift)
        return ((o.mask_word * MASK_WORD_BITS) + (products[GateInRange] >> shift)
                + o.m_blocks)

    def _extent(self, o, extent, products):
        if extent[-1] == "rows":
            return mul_const(self._extent(o, extent[:-1], products), self._config.rows)
        if len(extent) == 1:
            return o[extent[0]]
        return products[extent]

    def _verdict(self, m, op, o, end, products, remainder, status):
        """Drives ``status`` by the rules of ``op`` (those :func:`implemented` can fail), every
        one evaluated at once, the first that fails winning; ``end`` from :meth:`_ends`,
        ``remainder`` for the :class:`Multiple` rule.

        The range checks pass as ``end <= limit`` all together (``base < limit`` for an extent of
        1) or, when there is just one, fail as ``end > limit``."""
        cfg = self._config
        limits = {buf: cfg.depth(buf) for buf in Buffer}
        limits["mask_bits"] = cfg.mask_bits
        checks, ranges = [], []
        for rule in implemented(cfg)[op]:
            if isinstance(rule, NonZero):
                checks.append((o[rule.field] == 0, rule.status))
            elif isinstance(rule, Multiple):
                checks.append((remainder != 0, rule.status))
            elif isinstance(rule, Disjoint):
                overlap = (o[rule.a] < end[rule.b]) & (o[rule.b] < end[rule.a])
                if rule.extent_b is not None:  # (one empty range overlaps nothing)
                    overlap &= ((self._extent(o, rule.extent, products) != 0)
                                & (self._extent(o, rule.extent_b, products) != 0))
                checks.append((overlap, rule.status))
            elif isinstance(rule, PixelFits):
                checks.append((~pixel_fits(cfg, o), rule.status))
            elif isinstance(rule, NeedsPassUnit):  # (only without the PASS unit)
                checks.append((o[rule.field] != 0, rule.status))
            elif isinstance(rule, TiledFits):  # (only with the PASS unit)
                checks.append((tiled_misfits(cfg, o), rule.status))
            elif _ranged(rule):
                ranges.append(rule)
        if len(ranges) == 1 and not isinstance(ranges[0], GateInRange):
            (rule,) = ranges
            checks.append((end[rule.base] > limits[rule.limit], rule.status))
        elif ranges:
            within = []
            for rule in ranges:
                if isinstance(rule, GateInRange):
                    ok = self._gate_end(op, o, products) <= cfg.mask_bits
                    checked = o.gate
                else:
                    limit = limits[rule.limit]
                    if isinstance(rule, InRange) and not rule.extent:
                        ok = o[rule.base] < limit
                    else:
                        ok = end[rule.base] <= limit
                    checked = applies(rule, o)
                within.append(ok if checked is None else ~checked | ok)
            checks.append((~reduce(and_, within), InRange.status))
        for i, (fails, verdict) in enumerate(checks):
            with (m.Elif if i else m.If)(fails):
                m.d.comb += status.eq(verdict)


class _Multiplier:
    """``a * b`` by shift-and-add, one bit of ``b`` per cycle after ``start`` (``a`` and ``b``
    are sampled with it), stopping when no bit of ``b`` is left: ``bit_length(b)`` cycles."""

    def __init__(self, m, a_width, b_width, name):
        self.start = Signal(name=f"{name}_start")
        self.a = Signal(a_width, name=f"{name}_a")
        self.b = Signal(b_width, name=f"{name}_b")
        self.product = Signal(a_width + b_width, name=f"{name}_p")
        shifted = Signal(a_width + b_width, name=f"{name}_sh")
        rest = Signal(b_width, name=f"{name}_rest")  # multiplier bits still to consume
        self.done = rest == 0
        with m.If(self.start):
            m.d.sync += [self.product.eq(0), shifted.eq(self.a), rest.eq(self.b)]
        with m.Elif(~self.done):
            m.d.sync += [shifted.eq(shifted << 1), rest.eq(rest >> 1)]
            with m.If(rest[0]):
                m.d.sync += self.product.eq(self.product + shifted)


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
