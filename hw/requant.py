"""Requantization: INT32 accumulators -> INT8 outputs per output channel (section 6)."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .isa import MASK_IDX_BITS, Buffer, ChannelParams, RequantOperands
from .scratchpads import ReadClient, WriteClient, geometry, mask_bit

__all__ = ["RequantPipeline", "RequantSerial", "RequantUnit"]

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
MAX_SHIFT = 31

#: What the last stages keep of the parameters: the zero point, ``min(clamp_min, clamp_max)``
#: (the result whenever ``v < clamp_min``) and ``clamp_max``.
POST = data.StructLayout({"zero_point": signed(8), "low": signed(8), "clamp_max": signed(8)})
#: The clamps only see ``z + zero_point`` through comparisons with INT8 bounds, so ``z`` may be
#: saturated to this many bits first: ``z >= 255`` gives ``v >= 127 >= clamp_max`` either way,
#: ``z <= -256`` gives ``v <= -129 < clamp_min`` either way.
NARROW = 9


def _engine_ports(lanes, tag_shape):
    return {
        "i_stream": In(stream.Signature(data.StructLayout({
            "acc": data.ArrayLayout(signed(32), lanes),
            "params": data.ArrayLayout(ChannelParams, lanes),
            "tag": tag_shape,
        }), always_ready=True)),
        "o_stream": Out(stream.Signature(data.StructLayout({
            "out": data.ArrayLayout(signed(8), lanes),
            "tag": tag_shape,
        }), always_ready=True)),
        "busy": Out(1),  # some input has not left yet
    }


def _sat32(value):
    """A 33-bit sum saturated to INT32 by its top two bits (no compare chain after the add)."""
    return Mux(value[32] == value[31], value[:32], Mux(value[32], INT32_MIN, INT32_MAX))


def _clamped_shifts(shift):
    """``(max(shift, 0), max(-shift, 0))`` with ``shift`` clamped to [-31, 31], 5 bits each."""
    return (Mux(shift > MAX_SHIFT, MAX_SHIFT, Mux(shift > 0, shift, 0)).as_unsigned()[:5],
            Mux(shift < -MAX_SHIFT, MAX_SHIFT, Mux(shift < 0, -shift, 0)).as_unsigned()[:5])


class RequantPipeline(wiring.Component):
    """``lanes`` independent requantizers, one channel each per cycle.

    Stages (one register each, loaded only with valid data; each keeps only the parameters later
    stages need): (1) inputs; (2) ``sat32(acc + bias)``, the shift split into left/right amounts,
    ``min(clamp_min, clamp_max)``; (3-4) the saturating left shift (it overflows exactly when a
    sign change lies among the bits shifted out, a mask test, not a count), then the choice
    between the shifted and the saturated value; (5-7) the 32 x 32 product: four 17 x 17 partial
    products (one DSP each, fed and read by plain flops), their middle sum, the 64-bit sum;
    (8) SRDHM ``(ab + 2^30) >> 31`` (gemmlowp's nudge-and-truncate for every ``ab``) with the
    ``INT32_MIN * INT32_MIN`` case, and the rounding constants of the next stage; (9-10)
    RoundingDivideByPOT as an add, then an arithmetic shift; (11) ``sat9(z) + zero_point``;
    (12) the clamps, both compares in parallel.

    A channel per cycle per lane; ``latency`` cycles separate an input from its output. The ``tag``
    rides along unchanged.
    """

    latency = 12  #: cycles from a valid input to its output
    interval = 1  #: cycles between inputs

    def __init__(self, lanes: int, tag_shape=0):
        self.lanes = lanes
        super().__init__(_engine_ports(lanes, tag_shape))

    def elaborate(self, platform):
        m = Module()
        i = self.i_stream.payload
        tag_shape = i.tag.shape()
        valids, tags = [self.i_stream.valid], [i.tag]
        for n in range(1, self.latency + 1):
            v, t = Signal(name=f"v{n}"), Signal(tag_shape, name=f"tag{n}")
            m.d.sync += v.eq(valids[-1])
            with m.If(valids[-1]):
                m.d.sync += t.eq(tags[-1])
            valids.append(v)
            tags.append(t)
        m.d.comb += [
            self.o_stream.valid.eq(valids[-1]),
            self.o_stream.payload.tag.eq(tags[-1]),
            self.busy.eq(Cat(*valids[1:]).any()),
        ]
        for lane in range(self.lanes):
            m.d.comb += self.o_stream.payload.out[lane].eq(
                self._lane(m, lane, valids, i.acc[lane], i.params[lane]))
        return m

    def _lane(self, m, lane, v, acc_in, params_in):
        def reg(shape, name):
            return Signal(shape, name=f"l{lane}_{name}")

        def stage(n, *stmts):  # registers of stage n load when stage n - 1 holds valid data
            with m.If(v[n - 1]):
                m.d.sync += stmts

        # 1: inputs
        acc, p = reg(signed(32), "acc"), reg(ChannelParams, "params")
        stage(1, acc.eq(acc_in), p.eq(params_in))

        # 2: x = sat32(acc + bias); shift split; the bits a left shift by lsh pushes out
        x1, mult2 = reg(signed(32), "x1"), reg(signed(32), "mult2")
        post2, rsh2 = reg(POST, "post2"), reg(range(MAX_SHIFT + 1), "rsh2")
        lsh2 = reg(range(MAX_SHIFT + 1), "lsh2")
        out_mask = reg(31, "out_mask")  # bit i set: bit i+1 of x leaves the word (i >= 31 - lsh)
        lsh, rsh = _clamped_shifts(p.shift)
        stage(2,
              x1.eq(_sat32((acc + p.bias)[:33])), mult2.eq(p.multiplier),
              rsh2.eq(rsh), lsh2.eq(lsh),
              out_mask.eq(~(Const(2**31 - 1, 31) >> lsh)),
              post2.zero_point.eq(p.zero_point), post2.clamp_max.eq(p.clamp_max),
              post2.low.eq(Mux(p.clamp_min < p.clamp_max, p.clamp_min, p.clamp_max)))

        # 3-4: x = sat32(x << lsh): it overflows iff x[i] != x[i+1] for some bit i+1 shifted
        # out; the shift and the test, then the choice (the multiplier's inputs are plain flops)
        sign_change = (x1 ^ (x1 >> 1))[:31]
        shifted, overflow, negative = reg(32, "shifted"), reg(1, "overflow"), reg(1, "negative")
        mult3, post3a = reg(signed(32), "mult3"), reg(POST, "post3a")
        rsh3a = reg(range(MAX_SHIFT + 1), "rsh3a")
        stage(3,
              shifted.eq(x1 << lsh2), overflow.eq((sign_change & out_mask).any()),
              negative.eq(x1[31]), mult3.eq(mult2), post3a.eq(post2), rsh3a.eq(rsh2))
        x2, mult, post3 = reg(signed(32), "x2"), reg(signed(32), "mult"), reg(POST, "post3")
        rsh3 = reg(range(MAX_SHIFT + 1), "rsh3")
        stage(4,
              x2.eq(Mux(overflow, Mux(negative, INT32_MIN, INT32_MAX), shifted)),
              mult.eq(mult3), post3.eq(post3a), rsh3.eq(rsh3a))

        # 5-7: ab = x * multiplier, and the INT32_MIN * INT32_MIN case
        x_hi, x_lo = x2[16:].as_signed(), x2[:16]
        b_hi, b_lo = mult[16:].as_signed(), mult[:16]
        pp_hh, pp_hl = reg(signed(32), "pp_hh"), reg(signed(33), "pp_hl")
        pp_lh, pp_ll = reg(signed(33), "pp_lh"), reg(unsigned(32), "pp_ll")
        special4, post4, rsh4 = reg(1, "special4"), reg(POST, "post4"), reg(range(32), "rsh4")
        stage(5,
              pp_hh.eq(x_hi * b_hi), pp_hl.eq(x_hi * b_lo), pp_lh.eq(x_lo * b_hi),
              pp_ll.eq(x_lo * b_lo), special4.eq((x2 == INT32_MIN) & (mult == INT32_MIN)),
              post4.eq(post3), rsh4.eq(rsh3))
        mid, hh_ll = reg(signed(34), "mid"), reg(signed(64), "hh_ll")
        special5, post5, rsh5 = reg(1, "special5"), reg(POST, "post5"), reg(range(32), "rsh5")
        stage(6,
              mid.eq(pp_hl + pp_lh), hh_ll.eq(Cat(pp_ll, pp_hh)),
              special5.eq(special4), post5.eq(post4), rsh5.eq(rsh4))
        ab, special = reg(signed(64), "ab"), reg(1, "special")
        post6, rsh6 = reg(POST, "post6"), reg(range(MAX_SHIFT + 1), "rsh6")
        stage(7, ab.eq(hh_ll + (mid << 16)), special.eq(special5), post6.eq(post5),
              rsh6.eq(rsh5))

        # 8: SaturatingRoundingDoublingHighMul; RoundingDivideByPOT's addends for e = rsh:
        # 2^(e-1) and, for y < 0, 2^(e-1) - 1 (both 0 for e = 0)
        y, post7, rsh7 = reg(signed(32), "y"), reg(POST, "post7"), reg(range(32), "rsh7")
        half, half_neg = reg(31, "half"), reg(31, "half_neg")
        stage(8,
              y.eq(Mux(special, INT32_MAX, (ab + (1 << 30)) >> 31)), post7.eq(post6),
              rsh7.eq(rsh6), half.eq((Const(1, 32) << rsh6) >> 1),
              half_neg.eq(Const(2**31 - 1, 31) >> (MAX_SHIFT + 1 - rsh6).as_unsigned()))

        # 9: RoundingDivideByPOT(y, e): for e >= 1 the remainder test `rem > (2^(e-1) - 1) + neg`
        # is `rem >= 2^(e-1) + neg`, so the result is (y + 2^(e-1) - neg) >> e (e = 0: y)
        r, post8, rsh8 = reg(signed(33), "r"), reg(POST, "post8"), reg(range(32), "rsh8")
        stage(9, r.eq(y + Mux(y[31], half_neg, half)), post8.eq(post7), rsh8.eq(rsh7))

        # 10: ... the shift
        z, post9 = reg(signed(32), "z"), reg(POST, "post9")
        stage(10, z.eq(r >> rsh8), post9.eq(post8))

        # 11: v = sat9(z) + zero_point
        top = z[NARROW - 1:]
        narrow = Mux(top.all() | ~top.any(), z[:NARROW].as_signed(),
                     Mux(z[31], -2**(NARROW - 1), 2**(NARROW - 1) - 1))
        vz, post10 = reg(signed(NARROW + 1), "vz"), reg(POST, "post10")
        stage(11, vz.eq(narrow + post9.zero_point), post10.eq(post9))

        # 12: min(max(v, clamp_min), clamp_max) = low if v < clamp_min, else min(v, clamp_max);
        # v < clamp_min <=> v < low when clamp_min <= clamp_max (else the result is clamp_max
        # = low either way), so both compares use the stored bounds in parallel
        out = reg(signed(8), "out")
        stage(12, out.eq(Mux(vz < post10.low, post10.low,
                             Mux(vz > post10.clamp_max, post10.clamp_max, vz[:8]))))
        return out


class RequantSerial(wiring.Component):
    """``lanes`` requantizers on one 34-bit adder each, a few LUTs per bit of state.

    Same ports and results as :class:`RequantPipeline` for builds where area matters more than
    speed (the iCE40), except that the engine works on the **held** input: ``i_stream.payload``
    must stay unchanged from the cycle with ``valid`` until the result leaves (the requant unit
    keeps both read ports idle meanwhile), so nothing is copied. All lanes run one fixed
    schedule; a result leaves exactly ``latency`` cycles after its input, and the next input may
    come ``interval`` cycles after the previous one (the cycle after the result).

    Schedule, per channel: ``a = acc + bias`` (2 cycles); ``x = a`` with its overflow flag; the
    saturating left shift (64 cycles: ``lsh`` shifts while no sign change is pushed out; an
    overflowed lane instead shifts in ``INT32_MIN``/``INT32_MAX`` bit by bit, no per-bit
    constant load), then a cycle for ``x`` to settle; ``ab = x * multiplier`` by shift-and-add
    over the multiplier's bits (32), keeping only ``ab >> 31`` and bit 30, whose sum is the
    SRDHM result (1); RoundingDivideByPOT as ``t = y - [y < 0]`` (1), ``t >> (e - 1)`` one bit
    per cycle (30), then ``(t + 1) >> 1`` (1); then ``+ zero_point``, ``v - clamp_min`` (its
    sign kept in a flop), ``max(v - clamp_min, 0)`` from that flop, ``+ clamp_min`` and the
    compare with ``clamp_max``, on the same adder (5). Shift amounts are compared through the
    sign of ``step -/+ shift``, never clamped.

    Two stages: the phase counter drives the **operand** stage, which registers the adder's
    operand ``b`` and carry-in (and the step-dependent flags) from the held ports; a cycle later
    the **execute** stage adds them to ``a`` under registered phase flags. So no block-RAM output
    or multiplexer precedes the carry chain, and no sum drives a reset.
    """

    #: (phase, cycles): the fixed schedule (operand stage) after the cycle with ``valid`` (which
    #: clears ``a``); the execute stage follows a cycle behind
    SCHEDULE = (("ACC", 1), ("BIAS", 1), ("LOADX", 1), ("LSH", 64), ("SETTLE", 1), ("MUL", 32),
                ("RND", 1), ("NEG", 1), ("RSH", MAX_SHIFT - 1), ("RSH1", 1), ("ZP", 1),
                ("CMIN", 1), ("FLOOR", 1), ("ADDMIN", 1), ("CMAX", 1), ("OUT", 1))

    #: cycles from the input's ``valid`` to its result (the schedule, then the execute stage)
    LATENCY = sum(n for _, n in SCHEDULE) + 1
    #: cycles from one input to the next (the cycle after the result): per channel per lane
    INTERVAL = LATENCY + 1

    def __init__(self, lanes: int, tag_shape=0):
        self.lanes = lanes
        super().__init__(_engine_ports(lanes, tag_shape))

    @property
    def latency(self) -> int:
        return self.LATENCY

    @property
    def interval(self) -> int:
        return self.INTERVAL

    def elaborate(self, platform):
        m = Module()
        i = self.i_stream.payload
        names = ["IDLE"] + [name for name, _ in self.SCHEDULE]
        phase = Signal(range(len(names)))
        step = Signal(range(max(n for _, n in self.SCHEDULE)))
        tag = Signal(i.tag.shape())
        at = {name: Signal(name=f"at_{name.lower()}") for name in names}  # phase decode
        ex = {name: Signal(name=f"ex_{name.lower()}", init=name == "IDLE")  # ... a cycle later
              for name in names}
        for n, name in enumerate(names):
            m.d.comb += at[name].eq(phase == n)
            m.d.sync += ex[name].eq(at[name])
        step_end = Signal()  # the phase's last cycle
        long = {name: n for name, n in self.SCHEDULE if n > 1}
        ends = [at[name] & (step == n - 1) for name, n in long.items()]
        m.d.comb += step_end.eq(~Cat(*(at[name] for name in long)).any() | Cat(*ends).any())
        # step flags of the execute stage
        last_mul, step32 = Signal(), Signal()
        m.d.sync += [last_mul.eq(step == 31), step32.eq(step == 32)]
        m.d.comb += [
            self.busy.eq(~(at["IDLE"] & ex["IDLE"])),
            self.o_stream.valid.eq(ex["OUT"]),
            self.o_stream.payload.tag.eq(tag),
        ]
        with m.If(self.i_stream.valid):
            m.d.sync += [phase.eq(1), step.eq(0), tag.eq(i.tag)]
        with m.Elif(~at["IDLE"]):
            with m.If(step_end):
                m.d.sync += [phase.eq(Mux(at["OUT"], 0, phase + 1)), step.eq(0)]
            with m.Else():
                m.d.sync += step.eq(step + 1)

        for lane in range(self.lanes):
            m.d.comb += self.o_stream.payload.out[lane].eq(
                self._lane(m, lane, at, ex, step, last_mul, step32, self.i_stream.valid,
                           i.acc[lane], i.params[lane]))
        return m

    def _lane(self, m, lane, at, ex, step, last_mul, step32, start, acc, p):
        def sig(shape, name):
            return Signal(shape, name=f"l{lane}_{name}")

        a = sig(signed(34), "a")  # the accumulator: acc + bias, the high product, y, z, v
        x = sig(signed(32), "x")  # the multiplicand
        sat, sign = sig(1, "sat"), sig(1, "sign")  # x overflowed to INT32_MIN/MAX (sign)
        rnd = sig(1, "rnd")  # the last product bit shifted out: ab[30]
        low = sig(1, "low")  # v < clamp_min
        gt = sig(1, "gt")  # max(v, clamp_min) > clamp_max
        right = p.shift[-1]  # shift < 0: e = min(-shift, 31) >= 1

        # -- operand stage: from the phase counter and the held ports into flops ------------
        # step < min(max(shift, 0), 31) and step + 1 < e, by the sign of a short sum
        lsh_step, rsh_step = sig(signed(9), "lsh_step"), sig(signed(9), "rsh_step")
        m.d.comb += [lsh_step.eq(step - p.shift), rsh_step.eq(step + 1 + p.shift)]
        lsh_on, rsh_on = sig(1, "lsh_on"), sig(1, "rsh_on")
        m.d.sync += [lsh_on.eq((step < MAX_SHIFT) & lsh_step[-1]), rsh_on.eq(rsh_step[-1])]
        # the adder: a + b + cin in one carry chain, as (Cat(1, a) + Cat(cin, b)) >> 1 in 36
        # bits. b is an AND-OR of the sources, then an XOR: ~x + 1 = -x for the multiplier's
        # sign bit, all ones for -1, ~bound + 1 = -bound for the clamp compares. b and cin are
        # registered: x is final a cycle before MUL (SETTLE), rnd a cycle before RND.
        op_last = step == 31
        use_x = sig(1, "use_x")
        m.d.comb += use_x.eq(at["MUL"] & p.multiplier.bit_select(step[:5], 1))
        use_bound = at["ZP"] | at["CMIN"] | at["ADDMIN"] | at["CMAX"]
        bound = Mux(at["ZP"], p.zero_point, Mux(at["CMAX"], p.clamp_max, p.clamp_min))
        invert = (use_x & op_last) | at["NEG"] | at["CMIN"] | at["CMAX"]
        sources = [(acc, at["ACC"]), (p.bias, at["BIAS"]), (x, use_x), (bound, use_bound)]
        wide = [sig(signed(35), f"src{n}") for n in range(len(sources))]  # sign-extended
        m.d.comb += [w.eq(v) for w, (v, _) in zip(wide, sources, strict=True)]
        picked = [w & sel.replicate(35) for w, (_, sel) in zip(wide, sources, strict=True)]
        b, cin = sig(signed(35), "b"), sig(1, "cin")
        m.d.sync += [
            b.eq((picked[0] | picked[1] | picked[2] | picked[3]) ^ invert.replicate(35)),
            cin.eq((use_x & op_last) | at["CMIN"] | (at["RND"] & rnd) | at["RSH1"]),
        ]

        # -- execute stage: registered phase flags, b and cin ---------------------------------
        total = sig(signed(35), "sum")
        m.d.comb += total.eq((Cat(Const(1, 1), a, a[-1]) + Cat(cin, b))[:36].as_signed() >> 1)

        # a: cleared, or loaded with the sum or the sum shifted right by one. Every clear comes
        # from flops: CMIN keeps v - clamp_min and its sign, FLOOR clears a negative one.
        clear = start | ex["LOADX"] | (ex["FLOOR"] & low)
        load = (ex["ACC"] | ex["BIAS"] | ex["MUL"] | ex["RND"] | ex["ZP"] | ex["CMIN"] |
                ex["ADDMIN"] | (ex["NEG"] & right & a[-1]) | (ex["RSH"] & rsh_on) |
                (ex["RSH1"] & right))
        halve = (ex["MUL"] & ~last_mul) | ex["RSH"] | ex["RSH1"]
        with m.If(clear):
            m.d.sync += a.eq(0)
        with m.Elif(load):
            m.d.sync += a.eq(Mux(halve, total >> 1, total))
        with m.If(ex["MUL"] & ~last_mul):
            m.d.sync += rnd.eq(total[0])
        with m.If(ex["CMIN"]):  # a + ~clamp_min + 1 = v - clamp_min
            m.d.sync += low.eq(total[-1])

        # x: loaded with a = acc + bias (its sat32 overflow: a[32] != a[31]), then shifted left
        # lsh times unless a sign change would leave; an overflowed lane shifts in its
        # saturation value, sign bit first: the bit shifted in at step 32 reaches bit 31 at 63
        grow = lsh_on & (x[31] == x[30])
        with m.If(ex["LOADX"] | (ex["LSH"] & (sat | grow))):
            m.d.sync += x.eq(Mux(ex["LOADX"], a[:32],
                                 Cat(sat & (Mux(step32, sign, ~sign)), x[:31])))
        with m.If(ex["LOADX"]):
            m.d.sync += [sat.eq(a[32] != a[31]), sign.eq(a[32])]
        with m.Elif(ex["LSH"] & lsh_on & (x[31] != x[30])):
            m.d.sync += sat.eq(1)
        with m.If(ex["CMAX"]):  # a + ~clamp_max = a - clamp_max - 1
            m.d.sync += gt.eq(~total[-1])
        return Mux(gt, p.clamp_max, a[:8])


class RequantUnit(wiring.Component):
    """Executes REQUANT: ``count`` ACC words -> OUT words with the parameters of one PARAM word.

    One ACC word is read per ``cols / requant_lanes`` lane groups; the PARAM lane group is read
    with each group from the folded PARAM memory (or, unfolded, once per word). With the
    :class:`RequantPipeline` a group enters every cycle, and no logic follows a block-RAM output:
    the ACC word is copied into a register that the lane groups are selected from, and PARAM is
    read a cycle after ACC so that its output meets the selected group at the engine's input
    register. With ``serial``, the :class:`RequantSerial` engine works on the held ports, and the
    next group is read in the cycle its predecessor's result leaves. Results are shifted into a
    register of one host beat (or one OUT word, when a lane group does not divide a beat), which
    is written with that beat's enable when its last group comes out; the write address counts
    on its own, in order, ``out_gap + 1`` words per ACC word (the strided REQUANT). Read enables
    and addresses come from flops.

    With the PASS unit (``rd_mask``) REQUANT has ``gate``: a block of ``rows`` ACC words whose
    MASK bit is 0 is passed over whole in one cycle (its OUT words untouched). The bit of the
    next block is read ahead while the current one issues, so a live block costs nothing more
    and a skipped one 2 cycles (a read, then the next bit in a register). Then the OUT address of
    each word is computed at issue and rides through the engine as its ``tag`` (the write
    address counter above is not built).
    """

    def __init__(self, config: AccelConfig, *, serial: bool = False):
        self._config = config
        self._serial = serial
        self._geom = {buf: geometry(config, buf) for buf in Buffer}
        ports = {
            "ctrl": In(UnitControl(RequantOperands)),
            "rd_acc": Out(ReadClient(self._geom[Buffer.ACC])),
            "rd_param": Out(ReadClient(self._geom[Buffer.PARAM])),
            "wr_out": Out(WriteClient(self._geom[Buffer.OUT])),
        }
        if config.impl.pass_unit:
            ports["rd_mask"] = Out(ReadClient(self._geom[Buffer.MASK]))
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        lanes = cfg.requant_lanes
        groups = cfg.cols // lanes
        pgeom, ogeom = self._geom[Buffer.PARAM], self._geom[Buffer.OUT]
        folded = pgeom.fold > 1

        pas = cfg.impl.pass_unit
        tag_shape = ogeom.addr_width if pas else 0  # (PASS: the OUT address of the word)
        m.submodules.pipe = pipe = (RequantSerial if self._serial else RequantPipeline)(
            lanes, tag_shape)
        o = pipe.o_stream

        # -- issue: ACC word n, lane group g ----------------------------------------------
        issuing = Signal()
        acc_ptr = Signal(self._geom[Buffer.ACC].addr_width)
        left = Signal(range(self._geom[Buffer.ACC].depth + 1))  # words not yet issued
        param_word = Signal(range(pgeom.arch_depth))
        g, g1 = Signal(range(groups)), Signal(range(groups))
        g_first = Signal()  # g == 0 as a register: read enables and addresses come from flops
        v1 = Signal()  # the ACC read port holds the group issued last cycle
        if self._serial:  # the engine reads the held ports until its result leaves
            go = issuing & (o.valid | ~(pipe.busy | v1))
        else:
            go = issuing
        start, cmd = self.ctrl.start, self.ctrl.cmd
        last_group = g == groups - 1
        if pas:
            go, skip = self._gate(m, start, cmd, issuing, go, g_first, last_group)
        m.d.sync += v1.eq(go)
        m.d.comb += [self.rd_acc.addr.eq(acc_ptr), self.rd_acc.en.eq(go & g_first)]
        # every counter loads from one place: at start, or when it moves on
        word_end = go & last_group
        with m.If(start | go):
            m.d.sync += [g.eq(Mux(start | last_group, 0, g + 1)), g_first.eq(start | last_group)]
        with m.If(go):
            m.d.sync += g1.eq(g)
        with m.If(start | word_end):
            m.d.sync += [acc_ptr.eq(Mux(start, cmd.acc_addr, acc_ptr + 1)),
                         left.eq(Mux(start, cmd.count, left - 1))]
        with m.If(start | (word_end & (left == 1))):
            m.d.sync += issuing.eq(start & (cmd.count != 0))
        if pas:  # a skipped block: its rows (all that are left, if fewer) passed over
            rows = cfg.rows
            with m.If(skip):
                m.d.sync += [acc_ptr.eq(acc_ptr + rows), left.eq(left - rows)]
                with m.If(left <= rows):
                    m.d.sync += issuing.eq(0)
        with m.If(start):
            m.d.sync += param_word.eq(cmd.param_addr)
        if not folded:
            param_ptr = param_word
        elif pgeom.fold == 1 << ceil_log2(pgeom.fold):  # physical word param_word * fold + g
            param_ptr = Cat(g, param_word)
        else:
            param_ptr = mul_const(param_word, pgeom.fold) + g
        group_bits = len(self.rd_param.data) // groups

        if pas:  # the OUT address of each word, at issue, then a tag through the engine
            out_next = Signal(ogeom.addr_width)  # of the next word issued
            tag1, tag2 = Signal.like(out_next), Signal.like(out_next)
            step = Signal(len(cmd.out_gap) + 1)  # out_gap + 1: row r goes to out_addr + r*step
            with m.If(start):
                m.d.sync += step.eq(cmd.out_gap + 1)
            with m.If(start | word_end | skip):
                m.d.sync += out_next.eq(Mux(start, cmd.out_addr, out_next + Mux(
                    skip, step << exact_log2(cfg.rows), step)))
            with m.If(go):
                m.d.sync += tag1.eq(out_next)
            m.d.sync += tag2.eq(tag1)
            m.d.comb += pipe.i_stream.payload.tag.eq(tag1 if self._serial else tag2)
        if self._serial:  # both ports read together and held; selection from the ports
            m.d.comb += [
                self.rd_param.addr.eq(param_ptr),
                self.rd_param.en.eq(go & (folded | g_first)),
                self.ctrl.busy[0].eq(issuing | v1 | pipe.busy),
                pipe.i_stream.valid.eq(v1),
                pipe.i_stream.payload.acc.eq(self.rd_acc.data.word_select(g1, 32 * lanes)),
                pipe.i_stream.payload.params.eq(
                    self.rd_param.data if folded else self.rd_param.data.word_select(g1,
                                                                                    group_bits)),
            ]
        else:  # block-RAM outputs go straight into flops: the ACC word into a register (the
            # lane group is selected from there), PARAM read a cycle later into the engine
            v2, g2 = Signal(), Signal.like(g)
            acc_word = Signal(len(self.rd_acc.data))
            param_rd, param_addr = Signal(), Signal(pgeom.addr_width)
            m.d.sync += [v2.eq(v1), g2.eq(g1), param_rd.eq(go & (folded | g_first)),
                         param_addr.eq(param_ptr)]
            with m.If(v1 & (g1 == 0)):
                m.d.sync += acc_word.eq(self.rd_acc.data)
            m.d.comb += [
                self.rd_param.addr.eq(param_addr),
                self.rd_param.en.eq(param_rd),
                self.ctrl.busy[0].eq(issuing | v1 | v2 | pipe.busy),
                pipe.i_stream.valid.eq(v2),
                pipe.i_stream.payload.acc.eq(acc_word.word_select(g2, 32 * lanes)),
                pipe.i_stream.payload.params.eq(
                    self.rd_param.data if folded else self.rd_param.data.word_select(g2,
                                                                                    group_bits)),
            ]

        # -- results -> OUT, one chunk (a host beat, or else the word) at a time ---------
        group_bits = 8 * lanes
        chunk_bits = ogeom.host_width if ogeom.host_width % group_bits == 0 else ogeom.width
        per_chunk = chunk_bits // group_bits  # lane groups per chunk
        chunks = ogeom.width // chunk_bits  # chunks per OUT word
        beats = chunk_bits // ogeom.host_width  # write enables per chunk
        slot = Signal(range(per_chunk))  # of the next result in its chunk
        chunk = Signal(range(chunks))  # of the next result in its word
        buf = Signal(chunk_bits)
        shifted = Cat(buf[group_bits:], o.payload.out) if per_chunk > 1 else o.payload.out
        chunk_done = o.valid & (slot == per_chunk - 1)
        last_chunk = chunk == chunks - 1
        if pas:
            out_ptr = o.payload.tag
        else:
            out_ptr = Signal(ogeom.addr_width)
            step = Signal(len(cmd.out_gap) + 1)  # out_gap + 1: row r goes to out_addr + r*step
            with m.If(start):
                m.d.sync += step.eq(cmd.out_gap + 1)
            with m.If(start | (chunk_done & last_chunk)):
                m.d.sync += out_ptr.eq(Mux(start, cmd.out_addr, out_ptr + step))
        with m.If(start | o.valid):
            m.d.sync += slot.eq(Mux(start | (slot == per_chunk - 1), 0, slot + 1))
        with m.If(start | chunk_done):
            m.d.sync += chunk.eq(Mux(start | last_chunk, 0, chunk + 1))
        with m.If(o.valid):
            m.d.sync += buf.eq(shifted)
        m.d.comb += [
            self.wr_out.addr.eq(out_ptr),
            self.wr_out.data.eq(Cat(*[shifted] * chunks)),
        ]
        with m.If(chunk_done):
            m.d.comb += self.wr_out.en.eq(Const((1 << beats) - 1, beats) << (beats * chunk))
        return m

    def _gate(self, m, start, cmd, issuing, go, g_first, last_group):
        """REQUANT ``gate`` (PASS): ``(go, skip)``, the issue enable with the gate applied and
        the cycle a block is skipped (its first word is next, its MASK bit 0).

        A one-bit look-ahead: the MASK bit ``pos`` of the next block is read (a cycle) into
        ``bit`` (``known``); a block's first word waits for it, then issues or is skipped, and
        in that cycle the read of the bit after it starts (so a skipped block costs 2 cycles,
        and a live one reads its successor's bit while its own words issue)."""
        rows = self._config.rows
        mgeom = self._geom[Buffer.MASK]
        gated = Signal()
        row = Signal(range(rows))  # of the next word in its block
        block_first = Signal()  # row == 0: the next word opens a block
        pos, pos1 = Signal(MASK_IDX_BITS), Signal(MASK_IDX_BITS)  # pos1 = pos + 1
        known, bit, pending = Signal(), Signal(), Signal()
        opening = gated & block_first & g_first
        go_gated = go & (~opening | (known & bit))
        skip = issuing & opening & known & ~bit
        consume = (go_gated & opening) | skip
        fetch = issuing & gated & ~known & ~pending
        word, bit_index = mask_bit(mgeom, pos)
        word1, _ = mask_bit(mgeom, pos1)
        m.d.comb += [
            self.rd_mask.en.eq(fetch | consume),
            self.rd_mask.addr.eq(Mux(consume, word1, word)[:mgeom.addr_width]),
        ]
        m.d.sync += pending.eq(fetch | consume)
        with m.If(pending):
            m.d.sync += [known.eq(1), bit.eq(self.rd_mask.data.bit_select(bit_index, 1))]
        with m.If(consume):
            m.d.sync += [known.eq(0), pos.eq(pos1), pos1.eq(pos1 + 1)]
        with m.If(start | (go_gated & last_group)):
            m.d.sync += [row.eq(Mux(start, 0, row + 1)), block_first.eq(start | (row == rows - 1))]
        with m.If(start):
            m.d.sync += [gated.eq(cmd.gate), pos.eq(cmd.mask_idx), pos1.eq(cmd.mask_idx + 1),
                         known.eq(0), pending.eq(0)]
        return go_gated, skip
