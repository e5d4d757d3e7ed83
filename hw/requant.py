"""Requantization: INT32 accumulators -> INT8 outputs per output channel (section 6)."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig
from .control import UnitControl
from .isa import ADDR_BITS, COUNT_BITS, Buffer, ChannelParams, RequantOperands
from .scratchpads import ReadClient, WriteClient, geometry

__all__ = ["RequantPipeline", "RequantUnit", "LATENCY"]

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
MAX_SHIFT = 31

#: Cycles from a valid input to its output in :class:`RequantPipeline`.
LATENCY = 9


def _sat32(value):
    return Mux(value > INT32_MAX, INT32_MAX, Mux(value < INT32_MIN, INT32_MIN, value))


class RequantPipeline(wiring.Component):
    """``lanes`` independent requantizers, one channel each per cycle, :data:`LATENCY` deep.

    Stages (one register each): inputs; ``sat32(acc + bias)`` and the clamped shift split into
    left/right amounts; saturating left shift; the four 17x17 partial products of the 32x32
    SRDHM multiply (each one DSP); their middle sum; the 64-bit product; the SRDHM rounding
    ``(ab + 2^30) >> 31`` (equal to gemmlowp's nudge-and-truncate for every ``ab``) with the
    ``INT32_MIN * INT32_MIN`` case; RoundingDivideByPOT; zero point and clamps.
    The ``tag`` rides along unchanged.
    """

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
        valid = [Signal(name=f"v{s}") for s in range(LATENCY)]
        tags = [Signal(i.tag.shape(), name=f"tag{s}") for s in range(LATENCY)]
        m.d.sync += [valid[0].eq(self.i_stream.valid), tags[0].eq(i.tag)]
        for s in range(1, LATENCY):
            m.d.sync += [valid[s].eq(valid[s - 1]), tags[s].eq(tags[s - 1])]
        m.d.comb += [
            self.o_stream.valid.eq(valid[-1]),
            self.o_stream.payload.tag.eq(tags[-1]),
            self.busy.eq(Cat(*valid).any()),
        ]
        for lane in range(self.lanes):
            m.d.comb += self.o_stream.payload.out[lane].eq(
                self._lane(m, lane, i.acc[lane], i.params[lane]))
        return m

    def _lane(self, m, lane, acc_in, params_in):
        def reg(shape, name):
            return Signal(shape, name=f"l{lane}_{name}")

        # 1: inputs
        acc, p = reg(signed(32), "acc"), reg(ChannelParams, "p1")
        m.d.sync += [acc.eq(acc_in), p.eq(params_in)]

        # 2: x = sat32(acc + bias); shift clamped to [-31, 31] and split
        x1, p2 = reg(signed(32), "x1"), reg(ChannelParams, "p2")
        lsh, rsh = reg(range(MAX_SHIFT + 1), "lsh"), reg(range(MAX_SHIFT + 1), "rsh")
        sh = p.shift
        m.d.sync += [
            x1.eq(_sat32(acc + p.bias)), p2.eq(p),
            lsh.eq(Mux(sh > MAX_SHIFT, MAX_SHIFT, Mux(sh > 0, sh, 0))),
            rsh.eq(Mux(sh < -MAX_SHIFT, MAX_SHIFT, Mux(sh < 0, -sh, 0))),
        ]

        # 3: x = sat32(x << max(shift, 0))
        x2, p3, rsh3 = reg(signed(32), "x2"), reg(ChannelParams, "p3"), reg(range(32), "rsh3")
        m.d.sync += [x2.eq(_sat32(x1 << lsh)), p3.eq(p2), rsh3.eq(rsh)]

        # 4: partial products of x * multiplier (signed high halves, unsigned low halves)
        b = p3.multiplier
        x_hi, x_lo = x2[16:].as_signed(), x2[:16]
        b_hi, b_lo = b[16:].as_signed(), b[:16]
        pp_hh, pp_hl = reg(signed(32), "pp_hh"), reg(signed(33), "pp_hl")
        pp_lh, pp_ll = reg(signed(33), "pp_lh"), reg(unsigned(32), "pp_ll")
        special4 = reg(1, "special4")
        p4, rsh4 = reg(ChannelParams, "p4"), reg(range(32), "rsh4")
        m.d.sync += [
            pp_hh.eq(x_hi * b_hi), pp_hl.eq(x_hi * b_lo), pp_lh.eq(x_lo * b_hi),
            pp_ll.eq(x_lo * b_lo),
            special4.eq((x2 == INT32_MIN) & (b == INT32_MIN)), p4.eq(p3), rsh4.eq(rsh3),
        ]

        # 5: middle sum
        mid = reg(signed(34), "mid")
        hh_ll = reg(signed(64), "hh_ll")
        special5, p5, rsh5 = reg(1, "special5"), reg(ChannelParams, "p5"), reg(range(32), "rsh5")
        m.d.sync += [
            mid.eq(pp_hl + pp_lh), hh_ll.eq(Cat(pp_ll, pp_hh)),
            special5.eq(special4), p5.eq(p4), rsh5.eq(rsh4),
        ]

        # 6: the 64-bit product
        ab = reg(signed(64), "ab")
        special6, p6, rsh6 = reg(1, "special6"), reg(ChannelParams, "p6"), reg(range(32), "rsh6")
        m.d.sync += [ab.eq(hh_ll + (mid << 16)), special6.eq(special5), p6.eq(p5),
                     rsh6.eq(rsh5)]

        # 7: SaturatingRoundingDoublingHighMul
        y = reg(signed(32), "y")
        p7, rsh7 = reg(ChannelParams, "p7"), reg(range(32), "rsh7")
        m.d.sync += [
            y.eq(Mux(special6, INT32_MAX, (ab + (1 << 30)) >> 31)), p7.eq(p6), rsh7.eq(rsh6),
        ]

        # 8: RoundingDivideByPOT(y, max(-shift, 0))
        mask = (Const(1, 33) << rsh7) - 1
        remainder = (y.as_unsigned() & mask)[:32]
        threshold = (mask >> 1) + (y < 0)
        z, p8 = reg(signed(32), "z"), reg(ChannelParams, "p8")
        m.d.sync += [z.eq((y >> rsh7) + (remainder > threshold)), p8.eq(p7)]

        # 9: zero point and clamps
        v = z + p8.zero_point
        v = Mux(v < p8.clamp_min, p8.clamp_min, v)
        v = Mux(v > p8.clamp_max, p8.clamp_max, v)
        out = reg(signed(8), "out")
        m.d.sync += out.eq(v)
        return out


class RequantUnit(wiring.Component):
    """Executes REQUANT: ``count`` ACC words -> OUT words with the parameters of one PARAM word.

    One ACC word is read per ``cols / requant_lanes`` cycles and held on the read port while its
    lane groups enter the :class:`RequantPipeline`; the PARAM lane group is read every cycle from
    the folded PARAM memory (or, unfolded, once and held). Results are shifted into an OUT word
    that is written when its last group comes out.
    """

    def __init__(self, config: AccelConfig):
        self._config = config
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
        m.submodules.pipe = pipe = RequantPipeline(lanes, tag_layout)

        cmd = Signal(RequantOperands)
        issuing = Signal()
        n = Signal(COUNT_BITS)
        g = Signal(range(groups))
        first = Signal()
        last_g = g == groups - 1

        v1 = Signal()  # the read ports hold the group issued last cycle
        m.d.comb += [
            self.rd_acc.addr.eq(cmd.acc_addr + n),
            self.rd_param.addr.eq(cmd.param_addr * self._param_geom.fold + g),
            self.ctrl.busy[0].eq(issuing | v1 | pipe.busy),
        ]
        with m.If(issuing):
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
        m.d.sync += [v1.eq(issuing), g1.eq(g), tag1.addr.eq(cmd.out_addr + n),
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
