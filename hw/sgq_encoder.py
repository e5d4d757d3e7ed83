"""SGQ stripe encoder: one channel group of OUT words -> the section-8 wire format."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from ..errors import ConfigError
from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .isa import SGQ_MODE_BITS, Buffer, SgqMode, SgqOperands, SgqStripeHeader
from .scratchpads import ReadClient, geometry

__all__ = ["SgqCommand", "BitPacker", "SerialPacker", "StripeEncoder"]

LENGTH_BITS = 32  # the little-endian payload length that precedes the payload
SHIFT_BITS = data.Layout.cast(SgqStripeHeader)["shift"].shape.width
OFFSET_BITS = data.Layout.cast(SgqStripeHeader)["offset"].shape.width
MODE_BITS = SgqMode.as_shape().width
HEADER_BITS = MODE_BITS + OFFSET_BITS + SHIFT_BITS
BASE_BITS = 8  # the group base, one INT8 value
CODED = sorted(SGQ_MODE_BITS, key=SGQ_MODE_BITS.get)  # narrowest first
NARROW = CODED[:-1]  # the widths that may not fit; the widest fits every span at shift 0


def _fits(span, bits):
    """Per shift s (a bit each): ``(span + h(s)) >> s <= 2^bits - 1``, i.e. the constant compare
    ``span < 2^(bits+s) - h(s)`` with ``h(s) = 2^s >> 1``."""
    return Cat(*(span < (1 << (bits + s)) - ((1 << s) >> 1) for s in range(1 << SHIFT_BITS)))


def _first_set(bits):
    """Index of the lowest set bit of a *monotone* vector (set from some index upward), for
    indices below ``len(bits) - 1``: a thermometer decode, not a priority chain."""
    t = ~bits  # t[s] set for every s below the index
    n = len(bits)
    width = ceil_log2(n)
    out = []
    for j in range(width):  # bit j: t ends inside a run where index bit j is 1
        terms = [t[i - 1] & ~t[i + (1 << j) - 1] if i + (1 << j) - 1 < n else t[i - 1]
                 for i in range(1 << j, n, 1 << (j + 1))]
        out.append(Cat(*terms).any())
    return Cat(*out)


def _stripe_costs(stripe_len, cols):
    """Payload bits of a coded stripe per width (mode, offset, shift and ``L * b`` code bits)."""
    return {mode: HEADER_BITS + mul_const(stripe_len, cols * bits)
            for mode, bits in SGQ_MODE_BITS.items()}


def _total_shape(geom, cols):
    """Enough bits for 15 + the payload bits of any group that fits OUT."""
    stripes = geom.arch_depth
    most = 2 * BASE_BITS - 1 + stripes * HEADER_BITS + geom.arch_depth * cols * 8
    return unsigned(most.bit_length())


class SgqCommand(data.Struct):
    """SGQ operands plus ``zero``: send a zero length instead of encoding (not executed)."""
    operands: SgqOperands
    zero: unsigned(1)


class BitPacker(wiring.Component):
    """Packs fields of up to ``max_bits`` bits, least-significant bit first, into beats.

    A field (``i_value``, ``i_nbits``; bits above ``i_nbits`` must be zero) enters an input
    register when ``i_ready``, then two shift stages move it to where it will land: by whole
    bytes, then by bits, to ``tail``, the number of bits buffered or on the way, modulo
    ``width`` (beats leave ``width`` bits at a time, so a field's landing position is known
    when it enters the shifts). It is ORed into the buffer when fewer than ``width`` bits wait
    there; a beat is sent while at least ``width`` bits wait (never both in one cycle).
    ``settled``: no field is on the way, so ``fill`` counts every bit taken.
    """

    def __init__(self, width: int, max_bits: int):
        if width & (width - 1) or width < 8:
            raise ConfigError(f"width={width} must be a power of two, at least 8")
        self._width, self._max_bits = width, max_bits
        super().__init__({
            "i_valid": In(1),
            "i_ready": Out(1),
            "i_value": In(max_bits),
            "i_nbits": In(range(max_bits + 1)),
            "fill": Out(range(width + max_bits + 1)),
            "settled": Out(1),
            "o_stream": Out(stream.Signature(unsigned(width))),
        })

    def elaborate(self, platform):
        m = Module()
        w, bits = self._width, self._max_bits
        sw = ceil_log2(w)
        nbits_shape = self.i_nbits.shape()
        # the input register (0), the byte shift (1) and the bit shift (2)
        pend = [Signal(name=f"pend{n}") for n in range(3)]
        value = [Signal(bits, name="value0"), Signal(bits + w - 8, name="value1"),
                 Signal(bits + w - 1, name="value2")]
        nbits = [Signal(nbits_shape, name=f"nbits{n}") for n in range(3)]
        fine = Signal(3)  # the bit shift of stage 1's field
        tail = Signal(sw)
        below = Signal(init=1)  # fill < w, kept as a flop
        buf = Signal(w + bits)
        land = pend[2] & below
        free2 = ~pend[2] | below
        free1 = ~pend[1] | free2
        free0 = ~pend[0] | free1
        send = ~below & self.o_stream.ready
        m.d.comb += [
            self.i_ready.eq(free0),
            self.settled.eq(~Cat(*pend).any()),
            self.o_stream.valid.eq(~below),
            self.o_stream.payload.eq(buf[:w]),
        ]
        with m.If(free0):  # loads whenever it may; holds a field when i_valid was set
            m.d.sync += [pend[0].eq(self.i_valid), value[0].eq(self.i_value),
                         nbits[0].eq(self.i_nbits)]
        with m.If(free1):
            m.d.sync += [pend[1].eq(pend[0]), value[1].eq(value[0] << (tail[3:] * 8)),
                         fine.eq(tail[:3]), nbits[1].eq(nbits[0])]
            with m.If(pend[0]):
                m.d.sync += tail.eq(tail + nbits[0])
        with m.If(free2):
            m.d.sync += [pend[2].eq(pend[1]), value[2].eq(value[1] << fine),
                         nbits[2].eq(nbits[1])]
        fill = Signal.like(self.fill)
        m.d.comb += fill.eq(self.fill)
        with m.If(send):
            m.d.comb += fill.eq(self.fill - w)
            m.d.sync += buf.eq(buf >> w)
        with m.If(land):
            m.d.comb += fill.eq(self.fill + nbits[2])
            m.d.sync += buf.eq(buf | value[2])
        m.d.sync += [self.fill.eq(fill), below.eq(fill[sw:] == 0)]
        return m


class SerialPacker(wiring.Component):
    """Packs a bit stream, first bit least significant, into ``width``-bit beats: one bit per
    cycle into a shift register, whose beat is sent when full (no bit is taken meanwhile).
    ``fill`` counts the bits of the beat being assembled."""

    def __init__(self, width: int):
        self._width = width
        super().__init__({
            "i_valid": In(1),
            "i_ready": Out(1),
            "i_bit": In(1),
            "fill": Out(range(width + 1)),
            "o_stream": Out(stream.Signature(unsigned(width))),
        })

    def elaborate(self, platform):
        m = Module()
        w = self._width
        beat = Signal(w)
        full = Signal()  # fill == w, as a flop: i_ready gates the encoder's reads
        m.d.comb += [
            self.i_ready.eq(~full),
            self.o_stream.valid.eq(full),
            self.o_stream.payload.eq(beat),
        ]
        with m.If(self.i_valid & ~full):  # the newest bit enters at the top
            m.d.sync += [beat.eq(Cat(beat[1:], self.i_bit)), self.fill.eq(self.fill + 1),
                         full.eq(self.fill == w - 1)]
        with m.If(self.o_stream.valid & self.o_stream.ready):
            m.d.sync += [self.fill.eq(0), full.eq(0)]
        return m


class StripeEncoder(wiring.Component):
    """Executes SGQ (section 8) and sends its response on ``o_stream``.

    The group is read from OUT in passes, because every field must be known before the first
    bit is sent: (1) the group minimum ``base``; (2) each stripe's min/max and so its mode and
    size, summed into ``payload_bytes``; then, after the length and ``base``, per stripe (3) its
    min/max again for the header and (4) its codes. Mode choice per stripe: the narrowest width
    b in {2, 4, 8} for which some shift s <= ``max_shift`` has ``(hi - lo + h(s)) >> s <=
    2^b - 1``, with the smallest such s.

    Two datapaths with the same ports and responses. The default works on whole words,
    pipelined for block-RAM speed: the read data go straight into a register, min/max trees
    have a register per level, the stripe decision is a four-stage pipeline, and pass 4 runs
    ahead of the :class:`BitPacker` into a FIFO under credit control, so the read enable is
    always a flop. With ``serial`` (compact builds) one value per cycle from the held read port
    passes one comparator pair, the decision tries one shift per cycle, and every field leaves
    one bit per cycle through a :class:`SerialPacker`; with ``held_cmd`` (the dispatcher keeps
    ``ctrl.cmd`` on offer until the unit is done) it keeps no copy of the operands.
    """

    def __init__(self, config: AccelConfig, *, serial: bool = False, held_cmd: bool = False):
        if held_cmd and not serial:
            raise ConfigError("held_cmd is a choice of the serial datapath")
        self._config = config
        self._serial = serial
        self._held_cmd = held_cmd
        self._geom = geometry(config, Buffer.OUT)
        super().__init__({
            "ctrl": In(UnitControl(SgqCommand)),
            "rd_out": Out(ReadClient(self._geom)),
            "o_stream": Out(stream.Signature(unsigned(config.host_width))),
        })

    def elaborate(self, platform):
        m = Module()
        if self._serial:
            self._serial_datapath(m)
        else:
            self._word_datapath(m)
        return m

    # -- the pipelined word datapath ----------------------------------------------------------

    def _word_datapath(self, m):
        cfg, geom = self._config, self._geom
        cols, hw = cfg.cols, cfg.host_width
        levels = ceil_log2(cols)
        m.submodules.packer = packer = BitPacker(hw, max(LENGTH_BITS, 8 * cols, HEADER_BITS))
        wiring.connect(m, packer.o_stream, wiring.flipped(self.o_stream))

        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy)
        out_addr, count = Signal(geom.addr_width), Signal(range(geom.depth + 1))
        stripe_len, last_k = Signal(8), Signal(8)  # last_k = stripe_len - 1
        max_shift = Signal(SHIFT_BITS)
        costs = {mode: Signal(range(HEADER_BITS + 255 * cols * bits + 1), name=f"cost_{bits}")
                 for mode, bits in SGQ_MODE_BITS.items()}
        m.d.sync += [last_k.eq(stripe_len - 1)]
        for mode, cost in _stripe_costs(stripe_len, cols).items():
            m.d.sync += costs[mode].eq(cost)

        # -- scanner: reads [ptr, ptr + left), a word per cycle; `rd` (the read enable) is a
        # flop, computed a cycle ahead, because its fan-out reaches every block RAM of OUT
        ptr, left = Signal(geom.addr_width), Signal(range(geom.depth + 1))
        left_zero = Signal(init=1)  # left == 0, as a flop (then rd is 0 as well)
        rd = Signal()
        k = Signal(8)  # word in its stripe
        scan_first = Signal()
        per_stripe = Signal()  # tags mark stripes (pass 2) rather than the whole scan
        coding = Signal()  # pass 4: words go to the FIFO; reads need credit
        fifo_depth = 10  # more than the read-to-pop latency: a word per cycle while packing
        credit = Signal(range(fifo_depth + 1))  # reads allowed before a pop
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=8 * cols, depth=fifo_depth)
        # the FIFO holds codes only in pass 4: outside it, a pop finds it empty
        m.d.comb += fifo.r_en.eq(packer.i_ready)
        pop = fifo.r_rdy & fifo.r_en
        m.d.comb += [self.rd_out.addr.eq(ptr), self.rd_out.en.eq(rd)]
        more = left > rd  # words left after this cycle
        m.d.sync += [rd.eq(more & (~coding | (credit > rd))),  # this cycle's pop counts later
                     credit.eq(credit + pop - rd)]
        with m.If(rd):
            m.d.sync += [ptr.eq(ptr + 1), left.eq(left - 1), left_zero.eq(left == 1),
                         scan_first.eq(0),
                         k.eq(Mux(k == last_k, 0, k + 1))]

        def scan(addr, words, stripes=0, codes=0):  # `words` is never 0
            return [ptr.eq(addr), left.eq(words), left_zero.eq(0), scan_first.eq(1), k.eq(0),
                    per_stripe.eq(stripes), coding.eq(codes), credit.eq(fifo_depth),
                    rd.eq(words != 0)]

        # -- the word pipeline: B the read port, C the word register, then a level per stage
        tag = data.StructLayout({"first": 1, "last": 1})
        valid, tags = [Signal(name="v_port")], [Signal(tag, name="t_port")]
        m.d.sync += valid[0].eq(rd)
        with m.If(rd):
            m.d.sync += [tags[0].first.eq(Mux(per_stripe, k == 0, scan_first)),
                         tags[0].last.eq(Mux(per_stripe, k == last_k, left == 1))]
        word = Signal(8 * cols)
        for n in range(1, max(levels + 1, 4) + 1):
            valid.append(Signal(name=f"v{n}"))
            tags.append(Signal(tag, name=f"t{n}"))
            m.d.sync += valid[n].eq(valid[n - 1])
            with m.If(valid[n - 1]):
                m.d.sync += tags[n].eq(tags[n - 1])
        with m.If(valid[0]):  # straight off the block RAM into a flop
            m.d.sync += word.eq(self.rd_out.data)
        values = data.View(data.ArrayLayout(signed(8), cols), word)
        lows, highs = [values[c] for c in range(cols)], [values[c] for c in range(cols)]
        for level in range(levels):  # min/max trees, a register per level
            nxt_lo, nxt_hi = [], []
            for n in range(0, len(lows), 2):
                if n + 1 < len(lows):
                    lo_n = Signal(signed(8), name=f"min{level}_{n // 2}")
                    hi_n = Signal(signed(8), name=f"max{level}_{n // 2}")
                    a, b = lows[n], lows[n + 1]
                    c, d = highs[n], highs[n + 1]
                    with m.If(valid[level + 1]):
                        m.d.sync += [lo_n.eq(Mux(a < b, a, b)), hi_n.eq(Mux(c > d, c, d))]
                    nxt_lo.append(lo_n)
                    nxt_hi.append(hi_n)
                else:  # an odd one out waits a stage
                    lo_n = Signal(signed(8), name=f"min{level}_{n // 2}")
                    hi_n = Signal(signed(8), name=f"max{level}_{n // 2}")
                    with m.If(valid[level + 1]):
                        m.d.sync += [lo_n.eq(lows[n]), hi_n.eq(highs[n])]
                    nxt_lo.append(lo_n)
                    nxt_hi.append(hi_n)
            lows, highs = nxt_lo, nxt_hi
        word_lo, word_hi = lows[0], highs[0]
        tree_valid, tree_tag = valid[levels + 1], tags[levels + 1]

        # -- stripe statistics: running min/max; `ended` pulses when lo/hi hold a stripe's
        base, lo, hi = Signal(signed(8)), Signal(signed(8)), Signal(signed(8))
        ended = Signal()
        finding_base = Signal()  # pass 1: no stripe decisions
        accumulate = tree_valid & ~coding
        m.d.sync += ended.eq(accumulate & tree_tag.last & ~finding_base)
        with m.If(accumulate):
            m.d.sync += [lo.eq(Mux(tree_tag.first | (word_lo < lo), word_lo, lo)),
                         hi.eq(Mux(tree_tag.first | (word_hi > hi), word_hi, hi))]

        # -- the stripe decision, a register per stage: span; the compare bank; mode and
        # shift; cost, offset and the code bias. Stripes may end every cycle (pass 2).
        d1, d2, d3, d4 = (Signal(name=f"decide{n}") for n in range(1, 5))
        m.d.sync += [d1.eq(ended), d2.eq(d1), d3.eq(d2), d4.eq(d3)]
        span, is_base1, lo1 = Signal(8), Signal(), Signal(signed(8))
        with m.If(ended):
            m.d.sync += [span.eq(hi - lo), is_base1.eq(hi == base), lo1.eq(lo)]
        fits = {mode: Signal(1 << SHIFT_BITS, name=f"fits_{SGQ_MODE_BITS[mode]}")
                for mode in NARROW}
        is_base2, lo2 = Signal(), Signal(signed(8))
        with m.If(d1):
            m.d.sync += [is_base2.eq(is_base1), lo2.eq(lo1)]
            m.d.sync += [fits[mode].eq(_fits(span, SGQ_MODE_BITS[mode])) for mode in NARROW]
        mode3, shift3, lo3 = Signal(SgqMode), Signal(SHIFT_BITS), Signal(signed(8))
        with m.If(d2):
            m.d.sync += lo3.eq(lo2)
            # fits(b, s) is monotone in s, so width b is usable iff it fits at max_shift, and
            # its smallest shift is where its fits vector turns on
            with m.If(is_base2):
                m.d.sync += [mode3.eq(SgqMode.BASE), shift3.eq(0)]
            with m.Elif(fits[NARROW[0]].bit_select(max_shift, 1)):
                m.d.sync += [mode3.eq(NARROW[0]), shift3.eq(_first_set(fits[NARROW[0]]))]
            with m.Elif(fits[NARROW[1]].bit_select(max_shift, 1)):
                m.d.sync += [mode3.eq(NARROW[1]), shift3.eq(_first_set(fits[NARROW[1]]))]
            with m.Else():  # the widest codes fit at shift 0
                m.d.sync += [mode3.eq(CODED[-1]), shift3.eq(0)]
        mode, shift = Signal(SgqMode), Signal(SHIFT_BITS)
        cost = Signal.like(costs[CODED[-1]])
        offset, bias = Signal(OFFSET_BITS), Signal(signed(10))  # bias = h(s) - lo
        with m.If(d3):
            m.d.sync += [mode.eq(mode3), shift.eq(shift3), offset.eq(lo3 - base),
                         bias.eq(((Const(1, 8) << shift3) >> 1) - lo3)]
            with m.Switch(mode3):
                with m.Case(SgqMode.BASE):
                    m.d.sync += cost.eq(MODE_BITS)
                for b_mode in CODED:
                    with m.Case(b_mode):
                        m.d.sync += cost.eq(costs[b_mode])

        # -- codes of one word: q = (v - lo + h(s)) >> s, a stage for the add and one for the
        # shift, then the mode's fields -> FIFO
        t = [Signal(9, name=f"t{c}") for c in range(cols)]
        with m.If(valid[1]):
            m.d.sync += [t[c].eq(values[c] + bias) for c in range(cols)]
        q = [Signal(8, name=f"q{c}") for c in range(cols)]
        with m.If(valid[2]):
            m.d.sync += [q[c].eq(t[c] >> shift) for c in range(cols)]
        field = Signal(8 * cols)
        with m.If(valid[3]):
            with m.Switch(mode):
                for b_mode, bits in SGQ_MODE_BITS.items():
                    with m.Case(b_mode):
                        m.d.sync += field.eq(Cat(*(q[c][:bits] for c in range(cols))))
        m.d.comb += [fifo.w_data.eq(field), fifo.w_en.eq(valid[4] & coding)]
        code_bits = Signal(range(8 * cols + 1))

        # the packer takes pass 4's codes from the FIFO, every other field from the FSM; the
        # choice is a flop (it fans out to every bit of the packer's input register)
        from_fifo = Signal()
        hdr_valid, hdr_value = Signal(), Signal(LENGTH_BITS)
        hdr_bits = Signal.like(packer.i_nbits)
        m.d.comb += [
            packer.i_valid.eq(Mux(from_fifo, fifo.r_rdy, hdr_valid)),
            packer.i_value.eq(Mux(from_fifo, fifo.r_data, hdr_value)),
            packer.i_nbits.eq(Mux(from_fifo, code_bits, hdr_bits)),
        ]

        total = Signal(_total_shape(geom, cols))  # 15 + payload bits: length = total >> 3
        stripe_ptr, stripes_left = Signal(geom.addr_width), Signal(range(geom.depth + 1))
        empty = Signal()
        # a pass is over when every word was read and nothing was in flight a cycle ago (a
        # read, a word, a stripe decision): flops, not a wide OR, in front of the next scan
        quiet = Signal()
        m.d.sync += quiet.eq(~Cat(*valid, rd, ended, d1, d2, d3).any())
        drained = quiet & left_zero

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    o = c.operands
                    m.d.sync += [busy.eq(1), out_addr.eq(o.out_addr), count.eq(o.count),
                                 stripe_len.eq(o.stripe_len), max_shift.eq(o.max_shift),
                                 empty.eq(c.zero | (o.count == 0)),
                                 total.eq(2 * BASE_BITS - 1)]
                    with m.If(c.zero | (o.count == 0)):
                        m.d.sync += total.eq(0)
                        m.next = "SEND_LENGTH"
                    with m.Else():
                        m.d.sync += [scan(o.out_addr, o.count), finding_base.eq(1)]
                        m.next = "BASE"
            with m.State("BASE"):  # pass 1: the group minimum
                with m.If(drained):
                    m.d.sync += [base.eq(lo), scan(out_addr, count, stripes=1),
                                 finding_base.eq(0)]
                    m.next = "SIZE"
            with m.State("SIZE"):  # pass 2: per-stripe modes -> payload size
                with m.If(d4):
                    m.d.sync += total.eq(total + cost)
                with m.If(drained):
                    m.next = "SEND_LENGTH"
            with m.State("SEND_LENGTH"):
                m.d.comb += [hdr_valid.eq(1), hdr_bits.eq(LENGTH_BITS), hdr_value.eq(total >> 3)]
                with m.If(packer.i_ready):
                    m.next = "SEND_BASE"
                    with m.If(empty):
                        m.next = "PAD"
            with m.State("SEND_BASE"):
                m.d.comb += [hdr_valid.eq(1), hdr_bits.eq(BASE_BITS),
                             hdr_value.eq(base.as_unsigned())]
                with m.If(packer.i_ready):
                    m.d.sync += [stripe_ptr.eq(out_addr), stripes_left.eq(count)]
                    m.next = "STRIPE"
            with m.State("STRIPE"):
                with m.If(stripes_left == 0):
                    m.next = "PAD"
                with m.Else():
                    m.d.sync += scan(stripe_ptr, stripe_len)
                    m.next = "RANGE"
            with m.State("RANGE"):  # pass 3: this stripe's min/max -> its decision
                with m.If(d4):
                    m.next = "HEADER"
            with m.State("HEADER"):
                header = Cat(mode.as_value(), offset, shift)
                is_base = mode == SgqMode.BASE
                m.d.comb += [
                    hdr_valid.eq(1),
                    hdr_value.eq(Mux(is_base, mode.as_value(), header)),
                    hdr_bits.eq(Mux(is_base, MODE_BITS, HEADER_BITS)),
                ]
                with m.If(packer.i_ready):
                    m.d.sync += stripes_left.eq(stripes_left - stripe_len)
                    with m.Switch(mode):
                        for b_mode, bits in SGQ_MODE_BITS.items():
                            with m.Case(b_mode):
                                m.d.sync += code_bits.eq(bits * cols)
                    m.next = "CODES_START"
                    with m.If(is_base):
                        m.d.sync += stripe_ptr.eq(ptr)  # the RANGE scan ended after the stripe
                        m.next = "STRIPE"
            with m.State("CODES_START"):  # a state of its own: keeps the scan start off i_ready
                m.d.sync += [scan(stripe_ptr, stripe_len, codes=1), stripe_ptr.eq(ptr),
                             from_fifo.eq(1)]
                m.next = "CODES"
            with m.State("CODES"):  # pass 4: the codes, a word per packer field
                with m.If(left_zero & (credit == fifo_depth)):
                    m.d.sync += from_fifo.eq(0)
                    m.next = "STRIPE"
            with m.State("PAD"):  # zero bits up to a whole beat
                with m.If(packer.settled & ~packer.o_stream.valid):
                    m.d.comb += [hdr_valid.eq(packer.fill != 0), hdr_bits.eq(hw - packer.fill)]
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(packer.settled & (packer.fill == 0)):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"

    # -- the serial datapath (compact builds) -------------------------------------------------

    def _serial_datapath(self, m):
        cfg, geom = self._config, self._geom
        cols, hw = cfg.cols, cfg.host_width
        m.submodules.packer = packer = SerialPacker(hw)
        wiring.connect(m, packer.o_stream, wiring.flipped(self.o_stream))

        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy)
        o = self.ctrl.cmd.operands
        if self._held_cmd:  # the dispatcher keeps cmd on offer until the unit is done
            count, stripe_len, max_shift = o.count, o.stripe_len, o.max_shift
        else:
            count = Signal(range(geom.depth + 1), name="count")
            stripe_len = Signal(8, name="stripe_len")
            max_shift = Signal(SHIFT_BITS)
            with m.If(self.ctrl.start):
                m.d.sync += [count.eq(o.count), stripe_len.eq(o.stripe_len),
                             max_shift.eq(o.max_shift)]
        empty = Signal()

        # -- values: a word is read, then its columns are used one at a time from the held
        # read port; the next word is read in the cycle the last column is used. A scan covers
        # the whole group (`left` words) or one stripe (`k` words). Every counter is loaded
        # from one place, under a strobe, so that none needs a mux per state.
        stripe_ptr = Signal(geom.addr_width, name="stripe_ptr")
        ptr = Signal(geom.addr_width, name="ptr")
        left = Signal(range(geom.depth + 1))  # group words not yet read (not counting rereads)
        k = Signal(8)  # stripe words not yet fully used, the current one included
        col = Signal(range(cols))
        whole, recount = Signal(), Signal()  # the scan is the group; its words were counted
        start_read, have = Signal(), Signal()  # the scan's first read is due; the port holds
        first = Signal()  # the current value is the first of its stripe (or scan)
        sizing = Signal()  # pass 2: stripes within the scan; decisions go to the size
        start_scan = Signal()  # strobes: a scan starts (of the group / again),
        scan_whole, scan_again = Signal(), Signal()
        rewind = Signal()  # ptr <- stripe_ptr, and for a group scan left <- count
        value = self.rd_out.data.word_select(col, 8).as_signed()
        step = Signal()  # the current value is used up this cycle
        stripe_word = k == 1  # the current word is its stripe's last
        last_col = col == cols - 1
        word_done = step & last_col
        read = start_read | (word_done & Mux(whole, left != 0, ~stripe_word))
        stripe_last = stripe_word & last_col
        scan_last = last_col & Mux(whole, left == 0, stripe_word)
        m.d.comb += [self.rd_out.addr.eq(ptr), self.rd_out.en.eq(read)]
        m.d.sync += start_read.eq(start_scan)
        with m.If(start_scan):
            m.d.sync += [whole.eq(scan_whole), recount.eq(scan_again), first.eq(1)]
        with m.Elif(step):
            m.d.sync += first.eq(stripe_last & sizing)
        with m.If(start_scan | word_done):
            m.d.sync += col.eq(0)
        with m.Elif(step):
            m.d.sync += col.eq(col + 1)
        with m.If(start_scan | (word_done & stripe_word)):
            m.d.sync += k.eq(stripe_len)
        with m.Elif(word_done):
            m.d.sync += k.eq(k - 1)
        with m.If(start_scan | (word_done & ~read)):
            m.d.sync += have.eq(0)
        with m.Elif(read):
            m.d.sync += have.eq(1)
        with m.If(rewind):
            m.d.sync += ptr.eq(stripe_ptr)
        with m.Elif(read):
            m.d.sync += ptr.eq(ptr + 1)
        with m.If(rewind & scan_whole):
            m.d.sync += left.eq(count)
        with m.Elif(read & ~recount):
            m.d.sync += left.eq(left - 1)

        def scan(group=0, again=0, reload=1):  # from stripe_ptr (or, reload=0, from ptr)
            m.d.comb += [start_scan.eq(1), scan_whole.eq(group), scan_again.eq(again),
                         rewind.eq(reload)]

        # -- statistics
        base, lo, hi = Signal(signed(8)), Signal(signed(8)), Signal(signed(8))
        gather = [lo.eq(Mux(first | (value < lo), value, lo)),
                  hi.eq(Mux(first | (value > hi), value, hi))]

        # -- decision, one shift per cycle from s = 0: with u = span >> s and r = span[s-1],
        # (span + h(s)) >> s = u + r, so width b fits iff u + r <= 2^b - 1
        u, r = Signal(8), Signal()
        s, s_wide = Signal(SHIFT_BITS), Signal(SHIFT_BITS)
        wide_fit = Signal()  # the wider narrow width fitted at shift s_wide <= s
        mode, shift = Signal(SgqMode), Signal(SHIFT_BITS)
        coded = mode != SgqMode.BASE

        def fits_of(u, r, mode):
            bits = SGQ_MODE_BITS[mode]
            return (u >> bits == 0) & ~(r & (u[:bits] == (1 << bits) - 1))

        # fits(mode) for the current u and r, as flops loaded together with u and r (the
        # decision then drives the FSM from registers)
        fit = {mode: Signal(name=f"fit_{SGQ_MODE_BITS[mode]}") for mode in NARROW}

        def set_u(u_value, r_value):
            m.d.sync += [u.eq(u_value), r.eq(r_value)]
            m.d.sync += [fit[mode].eq(fits_of(u_value, r_value, mode)) for mode in NARROW]

        def fits(mode):
            return fit[mode]

        def decided(mode_value, shift_value):  # mode_value: a constant
            n_adds = 0 if mode_value == SgqMode.BASE else SGQ_MODE_BITS[mode_value]
            m.d.sync += [mode.eq(mode_value), shift.eq(shift_value), adds.eq(n_adds),
                         add_first.eq(1), add_last.eq(n_adds == 0)]
            m.next = "HEADER"
            with m.If(sizing):
                m.next = "SIZE_ADD"

        # -- size: total += mode bits [+ header bits + L * b, as b additions of L]
        total = Signal(_total_shape(geom, cols))  # 15 + payload bits: length = total >> 3
        adds = Signal(range(9))  # additions of L still due after this one
        add_first, add_last = Signal(), Signal()  # flags: this add is the mode bits / the last
        group_end = Signal()  # the stripe just sized was the group's last
        code_bits = Signal(range(9))
        with m.Switch(mode):
            for b_mode, bits in SGQ_MODE_BITS.items():
                with m.Case(b_mode):
                    m.d.comb += code_bits.eq(bits)

        # -- emission, a bit per cycle: bit `bit_idx` of the current field
        preamble = Cat(total[3:], Const(0, LENGTH_BITS - len(total) + 3), base)
        bit_idx = Signal(range(len(preamble)))
        emit, emit_bit = Signal(), Signal()
        took = emit & packer.i_ready
        field_done = Signal()  # strobe: the field's last bit is taken
        m.d.comb += [packer.i_valid.eq(emit), packer.i_bit.eq(emit_bit)]
        # code_last: bit_idx == code_bits - 1, as a flop (codes have 2 bits or more; only CODES
        # reads it, and it enters with bit_idx = 0)
        code_last = Signal()
        with m.If(field_done):
            m.d.sync += [bit_idx.eq(0), code_last.eq(0)]
        with m.Elif(took):
            m.d.sync += [bit_idx.eq(bit_idx + 1), code_last.eq(bit_idx == code_bits - 2)]

        def field(value, bits):  # sends `value`; true in the cycle its last bit is taken
            m.d.comb += [emit.eq(1), emit_bit.eq(value.bit_select(bit_idx, 1)),
                         field_done.eq(took & (bit_idx == bits - 1))]
            return field_done

        # -- codes, LSB first: q = (t + h(s)) >> s with t = value - lo; adding h(s) = 2^(s-1)
        # carries t[s-1] into bit s, then the carry ripples up one code bit per cycle
        # t is a register, loaded in a cycle of its own before the value's first bit (the
        # read port's column multiplexer and the subtraction stay off the bit path)
        t_r, t_ok = Signal(8), Signal()
        t = Cat(t_r, Const(0, 8))
        carry = Signal()
        c_in = Mux(bit_idx == 0, (shift != 0) & t.bit_select((shift - 1)[:SHIFT_BITS], 1), carry)
        t_bit = t.bit_select(shift + bit_idx, 1)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    o = c.operands
                    m.d.sync += [busy.eq(1), stripe_ptr.eq(o.out_addr),
                                 empty.eq(c.zero | (o.count == 0)),
                                 total.eq(2 * BASE_BITS - 1)]
                    m.next = "START"
                    with m.If(c.zero | (o.count == 0)):
                        m.d.sync += total.eq(0)
                        m.next = "PREAMBLE"
            with m.State("START"):
                scan(group=1)
                m.next = "BASE"
            with m.State("BASE"):  # pass 1: the group minimum
                m.d.comb += step.eq(have)
                with m.If(have):
                    m.d.sync += gather
                    with m.If(scan_last):
                        m.next = "BASE_DONE"
            with m.State("BASE_DONE"):
                m.d.sync += [base.eq(lo), sizing.eq(1)]
                scan(group=1)
                m.next = "SIZE"
            with m.State("SIZE"):  # pass 2: per-stripe modes -> payload size
                m.d.comb += step.eq(have)
                with m.If(have):
                    m.d.sync += gather
                    with m.If(stripe_last):
                        m.d.sync += group_end.eq(scan_last)
                        m.next = "DECIDE_START"
            with m.State("DECIDE_START"):
                set_u((hi - lo)[:8], 0)
                m.d.sync += [s.eq(0), wide_fit.eq(0)]
                m.next = "DECIDE"
                with m.If(hi == base):  # every value is the base
                    decided(SgqMode.BASE, 0)
            with m.State("DECIDE"):
                with m.If(fits(NARROW[0])):
                    decided(NARROW[0], s)
                with m.Else():
                    with m.If(fits(NARROW[1]) & ~wide_fit):
                        m.d.sync += [wide_fit.eq(1), s_wide.eq(s)]
                    with m.If(s == max_shift):
                        with m.If(wide_fit):
                            decided(NARROW[1], s_wide)
                        with m.Elif(fits(NARROW[1])):
                            decided(NARROW[1], s)
                        with m.Else():  # the widest codes fit at shift 0
                            decided(CODED[-1], 0)
                    with m.Else():
                        set_u(u >> 1, u[0])
                        m.d.sync += s.eq(s + 1)
            with m.State("SIZE_ADD"):  # mode bits [+ header bits], then b times L
                m.d.sync += [total.eq(total + Mux(add_first, Mux(coded, HEADER_BITS, MODE_BITS),
                                                  mul_const(stripe_len, cols))),
                             adds.eq(adds - 1), add_first.eq(0), add_last.eq(adds == 1)]
                with m.If(add_last):
                    m.next = "SIZE"
                    with m.If(group_end):
                        m.d.sync += sizing.eq(0)
                        m.next = "PREAMBLE"
            with m.State("PREAMBLE"):  # the length, then the base
                with m.If(field(preamble, Mux(empty, LENGTH_BITS, len(preamble)))):
                    m.d.comb += [rewind.eq(1), scan_whole.eq(1)]
                    m.next = "STRIPE"
                    with m.If(empty):
                        m.next = "PAD"
            with m.State("STRIPE"):
                with m.If(left == 0):
                    m.next = "PAD"
                with m.Else():
                    m.d.sync += stripe_ptr.eq(ptr)
                    scan(reload=0)
                    m.next = "RANGE"
            with m.State("RANGE"):  # pass 3: this stripe's min/max
                m.d.comb += step.eq(have)
                with m.If(have):
                    m.d.sync += gather
                    with m.If(scan_last):
                        m.next = "DECIDE_START"
            with m.State("HEADER"):
                header = Cat(mode.as_value(), (lo - base)[:OFFSET_BITS], shift)
                with m.If(field(header, Mux(coded, HEADER_BITS, MODE_BITS))):
                    m.next = "STRIPE"
                    with m.If(coded):
                        scan(again=1)
                        m.next = "CODES"
            with m.State("CODES"):  # pass 4: t = value - lo (a cycle), then b bits per value
                with m.If(~t_ok):
                    with m.If(have):
                        m.d.sync += [t_r.eq((value - lo)[:8]), t_ok.eq(1)]
                with m.Else():
                    m.d.comb += [emit.eq(1), emit_bit.eq(t_bit ^ c_in)]
                    with m.If(took):
                        m.d.sync += carry.eq(t_bit & c_in)
                        with m.If(code_last):
                            m.d.comb += [step.eq(1), field_done.eq(1)]
                            m.d.sync += t_ok.eq(0)
                            with m.If(scan_last):
                                m.next = "STRIPE"
            with m.State("PAD"):  # zero bits up to a whole beat; done when it has left
                m.d.comb += [emit.eq(packer.fill != 0), emit_bit.eq(0)]
                with m.If(packer.fill == 0):
                    m.d.comb += field_done.eq(1)
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
