"""Requantization: INT32 accumulators -> INT8 outputs per output channel (section 6)."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import leading_zeros, mul_const
from .config import AccelConfig
from .control import UnitControl
from .isa import ADDR_BITS, COUNT_BITS, Buffer, ChannelParams, RequantOperands
from .scratchpads import ReadClient, WriteClient, geometry

__all__ = ["RequantPipeline", "RequantSerial", "RequantUnit"]

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
MAX_SHIFT = 31

POST = data.StructLayout({"zero_point": signed(8), "clamp_min": signed(8), "clamp_max": signed(8)})


def _sat32(value):
    return Mux(value > INT32_MAX, INT32_MAX, Mux(value < INT32_MIN, INT32_MIN, value))


class RequantPipeline(wiring.Component):
    """``lanes`` independent requantizers, one channel each per cycle.

    Stages (one register each, loaded only with valid data): inputs; ``sat32(acc + bias)`` and the
    clamped shift split into left/right amounts; saturating left shift; the 32 x 32 SRDHM
    multiply; the SRDHM rounding ``(ab + 2^30) >> 31`` (equal to gemmlowp's nudge-and-truncate
    for every ``ab``) with the ``INT32_MIN * INT32_MIN`` case; RoundingDivideByPOT; zero point
    and clamps. Each stage keeps only the parameters later stages need.

    The multiply is three pipelined stages: four 17 x 17 partial products (one DSP each), their
    middle sum, the 64-bit sum. A channel per cycle per lane; ``latency`` cycles separate an input
    from its output. The ``tag`` rides along unchanged.
    """

    latency = 9  #: cycles from a valid input to its output
    interval = 1  #: cycles between inputs

    def __init__(self, lanes: int, tag_shape=0):
        self.lanes = lanes
        super().__init__({
            "i_stream": In(stream.Signature(data.StructLayout({
                "acc": data.ArrayLayout(signed(32), lanes),
                "params": data.ArrayLayout(ChannelParams, lanes),
                "tag": tag_shape,
            }), always_ready=True)),
            "o_stream": Out(stream.Signature(data.StructLayout({
                "out": data.ArrayLayout(signed(8), lanes),
                "tag": tag_shape,
            }), always_ready=True)),
            "busy": Out(1),  # some stage holds a valid input
        })

    def elaborate(self, platform):
        m = Module()
        i = self.i_stream.payload
        tag_shape = i.tag.shape()

        # control: valid bits and the tag, per stage
        def stage(name):
            return Signal(name=f"v_{name}"), Signal(tag_shape, name=f"tag_{name}")
        v1, t1 = stage("in")
        v2, t2 = stage("bias")
        v3, t3 = stage("lshift")
        v6, t6 = stage("product")
        v7, t7 = stage("srdhm")
        v8, t8 = stage("rdbpot")
        v9, t9 = stage("out")
        chain = [(self.i_stream.valid, i.tag, v1, t1), (v1, t1, v2, t2), (v2, t2, v3, t3),
                 (v6, t6, v7, t7), (v7, t7, v8, t8), (v8, t8, v9, t9)]  # (4-6: below)
        for v_in, t_in, v_out, t_out in chain:
            m.d.sync += v_out.eq(v_in)
            with m.If(v_in):
                m.d.sync += t_out.eq(t_in)
        v4, t4 = stage("pp")
        v5, t5 = stage("mid")
        for v_in, t_in, v_out, t_out in [(v3, t3, v4, t4), (v4, t4, v5, t5), (v5, t5, v6, t6)]:
            m.d.sync += v_out.eq(v_in)
            with m.If(v_in):
                m.d.sync += t_out.eq(t_in)
        busy = [v1, v2, v3, v4, v5, v6, v7, v8, v9]

        m.d.comb += [
            self.o_stream.valid.eq(v9),
            self.o_stream.payload.tag.eq(t9),
            self.busy.eq(Cat(*busy).any()),
        ]
        for lane in range(self.lanes):
            m.d.comb += self.o_stream.payload.out[lane].eq(
                self._lane(m, lane, self.i_stream.valid, i.acc[lane], i.params[lane],
                           (v1, v2, v3, v4, v5, v6, v7, v8)))
        return m

    def _lane(self, m, lane, valid, acc_in, params_in, valids):
        v1, v2, v3, v4, v5, v6, v7, v8 = valids

        def reg(shape, name):
            return Signal(shape, name=f"l{lane}_{name}")

        # 1: inputs
        acc, p = reg(signed(32), "acc"), reg(ChannelParams, "params")
        with m.If(valid):
            m.d.sync += [acc.eq(acc_in), p.eq(params_in)]

        # 2: x = sat32(acc + bias); shift clamped to [-31, 31] and split
        x1, mult2, post2 = reg(signed(32), "x1"), reg(signed(32), "mult2"), reg(POST, "post2")
        lsh, rsh2 = reg(range(MAX_SHIFT + 1), "lsh"), reg(range(MAX_SHIFT + 1), "rsh2")
        sh = p.shift
        with m.If(v1):
            m.d.sync += [
                x1.eq(_sat32(acc + p.bias)), mult2.eq(p.multiplier),
                post2.zero_point.eq(p.zero_point), post2.clamp_min.eq(p.clamp_min),
                post2.clamp_max.eq(p.clamp_max),
                lsh.eq(Mux(sh > MAX_SHIFT, MAX_SHIFT, Mux(sh > 0, sh, 0))),
                rsh2.eq(Mux(sh < -MAX_SHIFT, MAX_SHIFT, Mux(sh < 0, -sh, 0))),
            ]

        # 3: x = sat32(x << max(shift, 0)): it overflows exactly when the shift exceeds the
        # number of redundant sign bits of x (a priority encoder, not a second shifter)
        sign_change = (x1 ^ (x1 >> 1))[:31]  # bit i: x[i] != x[i+1]
        redundant = leading_zeros(m, sign_change, f"l{lane}_redundant")
        shifted = (x1 << lsh)[:32].as_signed()
        saturated = Mux(x1 < 0, INT32_MIN, INT32_MAX)
        x2, mult, post3 = reg(signed(32), "x2"), reg(signed(32), "mult"), reg(POST, "post3")
        rsh3 = reg(range(MAX_SHIFT + 1), "rsh3")
        with m.If(v2):
            m.d.sync += [x2.eq(Mux(lsh > redundant, saturated, shifted)), mult.eq(mult2),
                         post3.eq(post2), rsh3.eq(rsh2)]

        # 4-6: ab = x * multiplier, and the INT32_MIN * INT32_MIN case
        ab, special = reg(signed(64), "ab"), reg(1, "special")
        post6, rsh6 = reg(POST, "post6"), reg(range(MAX_SHIFT + 1), "rsh6")
        x_hi, x_lo = x2[16:].as_signed(), x2[:16]
        b_hi, b_lo = mult[16:].as_signed(), mult[:16]
        pp_hh, pp_hl = reg(signed(32), "pp_hh"), reg(signed(33), "pp_hl")
        pp_lh, pp_ll = reg(signed(33), "pp_lh"), reg(unsigned(32), "pp_ll")
        special4, post4, rsh4 = reg(1, "special4"), reg(POST, "post4"), reg(range(32), "rsh4")
        with m.If(v3):
            m.d.sync += [
                pp_hh.eq(x_hi * b_hi), pp_hl.eq(x_hi * b_lo), pp_lh.eq(x_lo * b_hi),
                pp_ll.eq(x_lo * b_lo),
                special4.eq((x2 == INT32_MIN) & (mult == INT32_MIN)),
                post4.eq(post3), rsh4.eq(rsh3),
            ]
        mid, hh_ll = reg(signed(34), "mid"), reg(signed(64), "hh_ll")
        special5, post5, rsh5 = reg(1, "special5"), reg(POST, "post5"), reg(range(32), "rsh5")
        with m.If(v4):
            m.d.sync += [mid.eq(pp_hl + pp_lh), hh_ll.eq(Cat(pp_ll, pp_hh)),
                         special5.eq(special4), post5.eq(post4), rsh5.eq(rsh4)]
        with m.If(v5):
            m.d.sync += [ab.eq(hh_ll + (mid << 16)), special.eq(special5), post6.eq(post5),
                         rsh6.eq(rsh5)]

        # 7: SaturatingRoundingDoublingHighMul
        y, post7, rsh7 = reg(signed(32), "y"), reg(POST, "post7"), reg(range(32), "rsh7")
        with m.If(v6):
            m.d.sync += [y.eq(Mux(special, INT32_MAX, (ab + (1 << 30)) >> 31)),
                         post7.eq(post6), rsh7.eq(rsh6)]

        # 8: RoundingDivideByPOT(y, e) with e = max(-shift, 0). For e >= 1 the remainder
        # test `rem > (2^(e-1) - 1) + neg` is `rem >= 2^(e-1) + neg`, so the result is
        # (y + 2^(e-1) - neg) >> e: one add and one arithmetic shift (e = 0: y itself).
        half = (Const(1, 32) << rsh7) >> 1
        neg_round = (y < 0) & (rsh7 != 0)
        z, post8 = reg(signed(32), "z"), reg(POST, "post8")
        with m.If(v7):
            m.d.sync += [z.eq((y + half - neg_round) >> rsh7), post8.eq(post7)]

        # 9: zero point and clamps
        v = z + post8.zero_point
        v = Mux(v < post8.clamp_min, post8.clamp_min, v)
        v = Mux(v > post8.clamp_max, post8.clamp_max, v)
        out = reg(signed(8), "out")
        with m.If(v8):
            m.d.sync += out.eq(v)
        return out


class RequantSerial(wiring.Component):
    """``lanes`` requantizers that work one channel at a time, a few LUTs per bit of state.

    Same ports and results as :class:`RequantPipeline`, for builds where area matters more
    than speed (the iCE40): every lane runs the same fixed schedule, so lanes stay in lockstep
    and an input leaves after exactly ``latency`` cycles; the next input may enter ``interval``
    cycles after the previous one. Schedule: ``sat32(acc + bias)`` (1 cycle); the saturating left
    shift one bit per cycle (31); the 32 x 32 product by shift-and-add, one multiplier bit per
    cycle, least significant first, the sign bit subtracted (32); SRDHM rounding (1); the
    RoundingDivideByPOT add (1) and its arithmetic shift one bit per cycle (31); zero point and
    clamps (1).
    """

    SHIFT_STEPS = MAX_SHIFT
    MUL_STEPS = 32

    def __init__(self, lanes: int, tag_shape=0):
        self.lanes = lanes
        super().__init__({
            "i_stream": In(stream.Signature(data.StructLayout({
                "acc": data.ArrayLayout(signed(32), lanes),
                "params": data.ArrayLayout(ChannelParams, lanes),
                "tag": tag_shape,
            }), always_ready=True)),
            "o_stream": Out(stream.Signature(data.StructLayout({
                "out": data.ArrayLayout(signed(8), lanes),
                "tag": tag_shape,
            }), always_ready=True)),
            "busy": Out(1),
        })

    @property
    def latency(self) -> int:
        return 1 + self.SHIFT_STEPS + self.MUL_STEPS + 1 + 1 + self.SHIFT_STEPS + 1

    @property
    def interval(self) -> int:
        return self.latency

    def elaborate(self, platform):
        m = Module()
        i = self.i_stream.payload
        tag = Signal(i.tag.shape())
        step = Signal(range(max(self.SHIFT_STEPS, self.MUL_STEPS)))
        # 0 idle, 1 bias, 2 left shift, 3 multiply, 4 srdhm, 5 round, 6 right shift, 7 out
        phase = Signal(range(8))
        last_step = Signal()
        m.d.comb += [
            self.busy.eq(phase != 0),
            self.o_stream.valid.eq(phase == 7),
            self.o_stream.payload.tag.eq(tag),
        ]
        with m.Switch(phase):
            with m.Case(2, 6):
                m.d.comb += last_step.eq(step == self.SHIFT_STEPS - 1)
            with m.Case(3):
                m.d.comb += last_step.eq(step == self.MUL_STEPS - 1)
        with m.Switch(phase):
            with m.Case(1, 4, 5):
                m.d.sync += [phase.eq(phase + 1), step.eq(0)]
            with m.Case(2, 3, 6):
                m.d.sync += step.eq(step + 1)
                with m.If(last_step):
                    m.d.sync += [phase.eq(phase + 1), step.eq(0)]
            with m.Case(7):
                m.d.sync += phase.eq(0)
        with m.If(self.i_stream.valid):
            m.d.sync += [phase.eq(1), step.eq(0), tag.eq(i.tag)]

        for lane in range(self.lanes):
            m.d.comb += self.o_stream.payload.out[lane].eq(
                self._lane(m, lane, phase, step, i.acc[lane], i.params[lane]))
        return m

    def _lane(self, m, lane, phase, step, acc_in, params_in):
        def reg(shape, name):
            return Signal(shape, name=f"l{lane}_{name}")

        acc, p = reg(signed(32), "acc"), reg(ChannelParams, "params")
        x = reg(signed(32), "x")
        hi, lo = reg(signed(34), "hi"), reg(32, "lo")  # product {hi, lo}; lo starts as multiplier
        sh = p.shift
        lsh, e = reg(range(MAX_SHIFT + 1), "lsh"), reg(range(MAX_SHIFT + 1), "e")
        m.d.comb += [lsh.eq(Mux(sh > MAX_SHIFT, MAX_SHIFT, Mux(sh > 0, sh, 0))),
                     e.eq(Mux(sh < -MAX_SHIFT, MAX_SHIFT, Mux(sh < 0, -sh, 0)))]
        out = reg(signed(8), "out")

        with m.If(self.i_stream.valid):
            m.d.sync += [acc.eq(acc_in), p.eq(params_in)]
        with m.Switch(phase):
            with m.Case(1):  # x = sat32(acc + bias)
                m.d.sync += [x.eq(_sat32(acc + p.bias)), hi.eq(0), lo.eq(p.multiplier)]
            with m.Case(2):  # one bit of the saturating left shift (saturation is sticky)
                with m.If(step < lsh):
                    with m.If(x[31] != x[30]):
                        m.d.sync += x.eq(Mux(x[31], INT32_MIN, INT32_MAX))
                    with m.Else():
                        m.d.sync += x.eq(x << 1)
            with m.Case(3):  # one multiplier bit: {hi, lo} = ({hi, lo} + bit * x * 2^32) >> 1
                addend = Mux(lo[0], Mux(step == self.MUL_STEPS - 1, -x, x), 0)
                total = hi + addend
                m.d.sync += [hi.eq(total >> 1), lo.eq(Cat(lo[1:], total[0]))]
            with m.Case(4):  # SRDHM: (ab + 2^30) >> 31, INT32_MIN * INT32_MIN saturates
                ab = Cat(lo, hi[:32]).as_signed()
                special = (x == INT32_MIN) & (p.multiplier == INT32_MIN)
                m.d.sync += hi.eq(Mux(special, INT32_MAX, (ab + (1 << 30)) >> 31))
            with m.Case(5):  # RoundingDivideByPOT: y + 2^(e-1) - (y < 0 and e > 0) ...
                half = (Const(1, 32) << e) >> 1
                m.d.sync += hi.eq(hi + half - ((hi < 0) & (e != 0)))
            with m.Case(6):  # ... >> e, one bit per cycle
                with m.If(step < e):
                    m.d.sync += hi.eq(hi >> 1)
            with m.Case(7):
                pass
        v = hi + p.zero_point
        v = Mux(v < p.clamp_min, p.clamp_min, v)
        v = Mux(v > p.clamp_max, p.clamp_max, v)
        m.d.comb += out.eq(v)
        return out


class RequantUnit(wiring.Component):
    """Executes REQUANT: ``count`` ACC words -> OUT words with the parameters of one PARAM word.

    One ACC word is read per ``cols / requant_lanes`` lane groups and held on the read port while
    its groups enter the :class:`RequantPipeline` (or, with ``serial``, the :class:`RequantSerial`
    engine, one group per ``interval`` cycles); the PARAM
    lane group is read with each group from the folded PARAM memory (or, unfolded, once and held).
    Results are shifted into an OUT word that is written when its last group comes out.
    """

    def __init__(self, config: AccelConfig, *, serial: bool = False):
        self._config = config
        self._serial = serial
        g = {buf: geometry(config, buf) for buf in Buffer}
        self._param_geom = g[Buffer.PARAM]
        super().__init__({
            "ctrl": In(UnitControl(RequantOperands)),
            "rd_acc": Out(ReadClient(g[Buffer.ACC])),
            "rd_param": Out(ReadClient(g[Buffer.PARAM])),
            "wr_out": Out(WriteClient(g[Buffer.OUT])),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        lanes = cfg.requant_lanes
        groups = cfg.cols // lanes
        folded = self._param_geom.fold > 1

        tag_layout = data.StructLayout({"addr": unsigned(ADDR_BITS), "last": 1})
        engine = RequantSerial if self._serial else RequantPipeline
        m.submodules.pipe = pipe = engine(lanes, tag_layout)

        cmd = Signal(RequantOperands)
        issuing = Signal()
        n = Signal(COUNT_BITS)
        g = Signal(range(groups))
        first = Signal()
        last_g = g == groups - 1
        gap = Signal(range(pipe.interval))  # cycles until the engine takes the next group
        go = issuing & (gap == 0)
        with m.If(go):
            m.d.sync += gap.eq(pipe.interval - 1)
        with m.Elif(gap != 0):
            m.d.sync += gap.eq(gap - 1)

        v1 = Signal()  # the read ports hold the group issued last cycle
        m.d.comb += [
            self.rd_acc.addr.eq(cmd.acc_addr + n),
            self.rd_param.addr.eq(mul_const(cmd.param_addr, self._param_geom.fold) + g),
            self.ctrl.busy[0].eq(issuing | v1 | pipe.busy),
        ]
        with m.If(go):
            m.d.comb += [
                self.rd_acc.en.eq(g == 0),
                self.rd_param.en.eq(1 if folded else first),
            ]
            m.d.sync += [g.eq(g + 1), first.eq(0)]
            with m.If(last_g):
                m.d.sync += [g.eq(0), n.eq(n + 1)]
                with m.If(n == cmd.count - 1):
                    m.d.sync += issuing.eq(0)
        with m.If(self.ctrl.start):
            m.d.sync += [cmd.eq(self.ctrl.cmd), n.eq(0), g.eq(0), first.eq(1),
                         issuing.eq(self.ctrl.cmd.count != 0)]

        # cycle after issue: the port data are the issued word / lane group
        g1 = Signal.like(g)
        tag1 = Signal(tag_layout)
        m.d.sync += [v1.eq(go), g1.eq(g), tag1.addr.eq(cmd.out_addr + n),
                     tag1.last.eq(last_g)]
        acc_word = self.rd_acc.data
        param_bits = self.rd_param.data if folded else \
            self.rd_param.data.word_select(g1, len(self.rd_param.data) // groups)
        m.d.comb += [
            pipe.i_stream.valid.eq(v1),
            pipe.i_stream.payload.acc.eq(acc_word.word_select(g1, 32 * lanes)),
            pipe.i_stream.payload.params.eq(param_bits),
            pipe.i_stream.payload.tag.eq(tag1),
        ]

        # results -> OUT word (group 0 ends up in the low bytes)
        out_word = Signal(8 * cfg.cols)
        o = pipe.o_stream
        shifted = Cat(out_word[8 * lanes:], o.payload.out) if groups > 1 else o.payload.out
        with m.If(o.valid):
            m.d.sync += out_word.eq(shifted)
        m.d.comb += [
            self.wr_out.addr.eq(o.payload.tag.addr),
            self.wr_out.data.eq(shifted),
            self.wr_out.en.eq(Mux(o.valid & o.payload.tag.last, (1 << len(self.wr_out.en)) - 1,
                                  0)),
        ]
        return m
