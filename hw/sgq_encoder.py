"""SGQ stripe encoder: one channel group of OUT words -> the section-8 wire format.

Two designs with one signature, :class:`StripeEncoder`: :class:`StripeEncoderPipeline` (here)
works on whole words at block-RAM speed; :class:`~.sgq_serial.StripeEncoderSerial` (compact
builds) works on one value and one bit per cycle. Both send the same bytes. This module also
holds what both share: the wire-format widths, the command and the signature.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from ..errors import ConfigError
from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .crc import StreamCrc
from .isa import (
    CRC_BYTES,
    SGQ_MODE_BITS,
    Buffer,
    SgqMode,
    SgqOperands,
    SgqStripeHeader,
)
from .scratchpads import ReadClient, geometry

__all__ = ["SgqCommand", "StripeEncoder", "BitPacker", "StripeEncoderPipeline"]

LENGTH_BITS = 32  # the little-endian payload length that precedes the payload
CRC_BITS = 8 * CRC_BYTES  # the trailer: CRC-32 of every byte before it, little-endian
SHIFT_BITS = data.Layout.cast(SgqStripeHeader)["shift"].shape.width
OFFSET_BITS = data.Layout.cast(SgqStripeHeader)["offset"].shape.width
MODE_BITS = SgqMode.as_shape().width
HEADER_BITS = MODE_BITS + OFFSET_BITS + SHIFT_BITS
BASE_BITS = 8  # the group base, one INT8 value
CODED = sorted(SGQ_MODE_BITS, key=SGQ_MODE_BITS.get)  # narrowest first
NARROW = CODED[:-1]  # the widths that may not fit; the widest fits every span at shift 0


class SgqCommand(data.Struct):
    """SGQ operands plus ``zero``: send a zero length instead of encoding (not executed)."""
    operands: SgqOperands
    zero: unsigned(1)


class StripeEncoder(wiring.Component):
    """Executes SGQ (section 8) and sends its response on ``o_stream``: the signature and the
    algorithm of both designs (:class:`StripeEncoderPipeline`,
    :class:`~.sgq_serial.StripeEncoderSerial`).

    The group is read from OUT in passes, because every field must be known before the first
    bit is sent: (1) the group minimum ``base``; (2) each stripe's min/max and so its mode and
    size, summed into ``payload_bytes``; then, after the length and ``base``, per stripe (3) its
    min/max again for the header and (4) its codes. Mode choice per stripe: the narrowest width
    b in {1, 2, 4, 8} for which some shift s <= ``max_shift`` has ``(hi - lo + h(s)) >> s <=
    2^b - 1``, with the smallest such s. The response ends with a CRC-32 trailer
    (:data:`~.isa.CRC`) over every beat sent before it, padded to a whole beat.
    """

    def __init__(self, config: AccelConfig):
        self._config = config
        self._geom = geometry(config, Buffer.OUT)
        super().__init__({
            "ctrl": In(UnitControl(SgqCommand)),
            "rd_out": Out(ReadClient(self._geom)),
            "o_stream": Out(stream.Signature(unsigned(config.host_width))),
        })

    def _total_shape(self):
        """Enough bits for 15 + the payload bits of any group that fits OUT."""
        geom, cols = self._geom, self._config.cols
        stripes = geom.arch_depth
        most = 2 * BASE_BITS - 1 + stripes * HEADER_BITS + geom.arch_depth * cols * 8
        return unsigned(most.bit_length())

    def _respond_through(self, m, packer):
        """Adds ``packer`` (as ``packer``), whose beats are the response; returns the flop that
        drives ``ctrl.busy``."""
        m.submodules.packer = packer
        wiring.connect(m, packer.o_stream, wiring.flipped(self.o_stream))

        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy)
        return busy


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


class StripeEncoderPipeline(StripeEncoder):
    """The word design: works on whole words, pipelined for block-RAM speed.

    The read data go straight into a register, min/max trees have a register per level, the
    stripe decision is a four-stage pipeline, and pass 4 runs ahead of the :class:`BitPacker`
    into a FIFO under credit control, so the read enable is always a flop. A beat-wide CRC
    takes the beats as they leave.
    """

    def elaborate(self, platform):
        m = Module()
        cfg, geom = self._config, self._geom
        cols, hw = cfg.cols, cfg.host_width
        levels = ceil_log2(cols)
        packer = BitPacker(hw, max(LENGTH_BITS, CRC_BITS, 8 * cols, HEADER_BITS))
        busy = self._respond_through(m, packer)
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
            for b_mode in NARROW:  # narrowest first
                with m.Elif(fits[b_mode].bit_select(max_shift, 1)):
                    m.d.sync += [mode3.eq(b_mode), shift3.eq(_first_set(fits[b_mode]))]
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
        hdr_valid, hdr_value = Signal(), Signal(max(LENGTH_BITS, CRC_BITS))
        hdr_bits = Signal.like(packer.i_nbits)
        m.d.comb += [
            packer.i_valid.eq(Mux(from_fifo, fifo.r_rdy, hdr_valid)),
            packer.i_value.eq(Mux(from_fifo, fifo.r_data, hdr_value)),
            packer.i_nbits.eq(Mux(from_fifo, code_bits, hdr_bits)),
        ]

        total = Signal(self._total_shape())  # 15 + payload bits: length = total >> 3
        stripe_ptr, stripes_left = Signal(geom.addr_width), Signal(range(geom.depth + 1))
        empty = Signal()
        # a pass is over when every word was read and nothing was in flight a cycle ago (a
        # read, a word, a stripe decision): flops, not a wide OR, in front of the next scan
        quiet = Signal()
        m.d.sync += quiet.eq(~Cat(*valid, rd, ended, d1, d2, d3).any())
        drained = quiet & left_zero

        # -- the CRC trailer: a beat-wide CRC over every beat sent before it (``trailer`` is
        # set once they have all left)
        m.submodules.crc = crc = StreamCrc(hw)
        trailer = Signal()
        m.d.comb += [crc.data.eq(self.o_stream.payload),
                     crc.valid.eq(self.o_stream.valid & self.o_stream.ready & ~trailer)]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    o = c.operands
                    m.d.comb += crc.start.eq(1)
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
            with m.State("DRAIN"):  # every beat has left (and so entered the CRC)
                with m.If(packer.settled & (packer.fill == 0)):
                    m.d.sync += trailer.eq(~trailer)
                    m.next = "SEND_CRC"
                    with m.If(trailer):
                        m.d.sync += busy.eq(0)
                        m.next = "IDLE"
            with m.State("SEND_CRC"):  # the trailer, then padding to a whole beat again
                m.d.comb += [hdr_valid.eq(1), hdr_bits.eq(CRC_BITS), hdr_value.eq(crc.crc)]
                with m.If(packer.i_ready):
                    m.next = "PAD"
        return m
