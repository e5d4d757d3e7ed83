"""Decoder: host beats -> checked instructions, and LOAD data passed through to the load unit.

For each instruction the decoder assembles the 128-bit word (``128 / host_width`` beats), runs the
section-5 checks and computes the instruction's access set (:mod:`.hazards`), then offers the
result on ``o_instr``. When a LOAD is taken it forwards the LOAD's data beats on ``o_data`` before
it reads the next instruction, so the input stream never loses its place.

The checks need the products ``m_blocks*k``, ``n_blocks*k``, ``m_blocks*n_blocks`` (GEMM),
``blocks*k`` (PATCH) and ``count mod stripe_len`` (SGQ). They are computed by shift-and-add and
restoring division, one bit per cycle and stopping early, instead of with multipliers: the
iCE40 has no DSP to spare and decode is rarely on the critical path.

Error priority when several checks fail: ILLEGAL_OPCODE, BAD_BUFFER, then the opcode's own checks
in the order of section 5 (GEMM/PATCH ``k = 0`` BAD_SHAPE, PATCH overlap BAD_FIELD, SGQ
``stripe_len = 0`` BAD_FIELD then ``count % stripe_len`` BAD_SHAPE), and ADDR_RANGE last.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .hazards import AccessLayout
from .isa import BLOCKS_BITS, COUNT_BITS, INSTR_BITS, Buffer, InstructionLayout, Opcode, Status
from .scratchpads import geometry

__all__ = ["DecodedLayout", "Decoder"]


def DecodedLayout(config: AccelConfig) -> data.StructLayout:
    """An instruction as the dispatcher receives it."""
    max_word_beats = max(geometry(config, buf).word_beats for buf in Buffer)
    return data.StructLayout({
        "word": InstructionLayout,
        "status": Status,  # result of the decode checks
        "buf_ok": 1,  # LOAD/STORE: the buffer code is defined (data follows / is sent)
        "data_beats": unsigned(COUNT_BITS + max_word_beats.bit_length()),  # LOAD data beats
        "access": AccessLayout(config),
    })


class Decoder(wiring.Component):
    """Instruction fetch and decode-time checks (see module docstring)."""

    def __init__(self, config: AccelConfig):
        self._config = config
        hw = config.host_width
        super().__init__({
            "i_stream": In(stream.Signature(unsigned(hw))),
            "o_instr": Out(stream.Signature(DecodedLayout(config))),
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
        data_left = Signal.like(out.data_beats)

        # -- iterative products and remainder --------------------------------------------
        m_a = Signal(BLOCKS_BITS)  # multiplier bits still to consume (m_blocks or blocks)
        m_b = Signal(BLOCKS_BITS)  # (n_blocks)
        k_sh = Signal(COUNT_BITS + BLOCKS_BITS)
        n_sh = Signal(2 * BLOCKS_BITS)
        p_mk = Signal(COUNT_BITS + BLOCKS_BITS)  # m_blocks*k or blocks*k
        p_nk = Signal(COUNT_BITS + BLOCKS_BITS)  # n_blocks*k
        p_mn = Signal(2 * BLOCKS_BITS)  # m_blocks*n_blocks
        div_q = Signal(COUNT_BITS)
        div_r = Signal(8)
        div_n = Signal(range(COUNT_BITS + 1))
        ops = word.operands
        iter_done = (m_a == 0) & (m_b == 0) & (div_n == 0)

        # The checks are combinational from the word and the products and registered in CHECK
        # (the word itself holds while the instruction is offered). A build without hazard
        # tracking never reads `access`, and synthesis removes it.
        check = Signal(out.shape())
        self._check(m, word, check, p_mk, p_nk, p_mn, div_r)
        status, buf_ok, data_beats = Signal(Status), Signal(), Signal.like(out.data_beats)
        access = Signal.like(out.access)
        m.d.comb += [out.word.eq(word), out.status.eq(status), out.buf_ok.eq(buf_ok),
                     out.data_beats.eq(data_beats), out.access.eq(access)]

        with m.FSM():
            with m.State("FETCH"):
                m.d.comb += self.i_stream.ready.eq(1)
                with m.If(self.i_stream.valid):
                    m.d.sync += [
                        word.as_value().word_select(beat, hw).eq(self.i_stream.payload),
                        beat.eq(beat + 1),
                    ]
                    with m.If(beat == n_beats - 1):
                        m.d.sync += beat.eq(0)
                        m.next = "SETUP"
            with m.State("SETUP"):
                m.d.sync += [
                    m_a.eq(0), m_b.eq(0), div_n.eq(0),
                    p_mk.eq(0), p_nk.eq(0), p_mn.eq(0),
                    k_sh.eq(ops.gemm.k), n_sh.eq(ops.gemm.n_blocks),
                    div_q.eq(ops.sgq.count), div_r.eq(0),
                ]
                with m.Switch(word.opcode):
                    with m.Case(Opcode.GEMM):
                        m.d.sync += [m_a.eq(ops.gemm.m_blocks), m_b.eq(ops.gemm.n_blocks)]
                    with m.Case(Opcode.PATCH):
                        m.d.sync += [m_a.eq(ops.patch.blocks), k_sh.eq(ops.patch.k)]
                    with m.Case(Opcode.SGQ):
                        m.d.sync += div_n.eq(Mux(ops.sgq.stripe_len == 0, 0, COUNT_BITS))
                m.next = "ITERATE"
            with m.State("ITERATE"):
                m.d.sync += [m_a.eq(m_a >> 1), m_b.eq(m_b >> 1),
                             k_sh.eq(k_sh << 1), n_sh.eq(n_sh << 1)]
                with m.If(m_a[0]):
                    m.d.sync += [p_mk.eq(p_mk + k_sh), p_mn.eq(p_mn + n_sh)]
                with m.If(m_b[0]):
                    m.d.sync += p_nk.eq(p_nk + k_sh)
                with m.If(div_n != 0):
                    r2 = Cat(div_q[-1], div_r)
                    d = ops.sgq.stripe_len
                    m.d.sync += [
                        div_r.eq(Mux(r2 >= d, r2 - d, r2)),
                        div_q.eq(div_q << 1),
                        div_n.eq(div_n - 1),
                    ]
                with m.If(iter_done):
                    m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += [status.eq(check.status), buf_ok.eq(check.buf_ok),
                             data_beats.eq(check.data_beats), access.eq(check.access)]
                m.next = "OFFER"
            with m.State("OFFER"):
                m.d.comb += self.o_instr.valid.eq(1)
                with m.If(self.o_instr.ready):
                    m.d.sync += data_left.eq(out.data_beats)
                    with m.If(out.data_beats != 0):
                        m.next = "DATA"
                    with m.Else():
                        m.next = "FETCH"
            with m.State("DATA"):
                m.d.comb += [
                    self.o_data.valid.eq(self.i_stream.valid),
                    self.o_data.payload.eq(self.i_stream.payload),
                    self.i_stream.ready.eq(self.o_data.ready),
                ]
                with m.If(self.o_data.valid & self.o_data.ready):
                    m.d.sync += data_left.eq(data_left - 1)
                    with m.If(data_left == 1):
                        m.next = "FETCH"
        return m

    def _check(self, m, word, out, p_mk, p_nk, p_mn, div_r):
        """Drives status, access set and data beat count of ``word`` into ``out``."""
        cfg = self._config
        ops = word.operands
        depth = {buf: cfg.depth(buf) for buf in Buffer}
        status = Signal(Status)
        buf_ok = Signal()
        beats = Signal.like(out.data_beats)
        acc = Signal(out.access.shape())

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
                                beats.eq(mul_const(o.count, geometry(cfg, buf).word_beats)),
                                status.eq(Mux(end > depth[buf], Status.ADDR_RANGE, Status.OK)),
                            ]
                            with m.If(kind):
                                m.d.comb += rng(buf, "w", o.addr, end)
                            with m.Else():
                                m.d.comb += rng(buf, "r", o.addr, end)
                with m.If(word.opcode == Opcode.STORE):
                    m.d.comb += beats.eq(0)
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

        m.d.comb += [
            out.status.eq(status),
            out.buf_ok.eq(buf_ok),
            out.data_beats.eq(beats),  # a faulting LOAD still consumes its data
            out.access.eq(acc),
        ]
