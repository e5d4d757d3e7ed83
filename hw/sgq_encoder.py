"""SGQ stripe encoder: one channel group of OUT words -> the section-8 wire format."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .isa import (
    ADDR_BITS,
    COUNT_BITS,
    SGQ_MODE_BITS,
    Buffer,
    SgqMode,
    SgqOperands,
    SgqStripeHeader,
)
from .scratchpads import ReadClient, geometry

__all__ = ["SgqCommand", "BitPacker", "StripeEncoder"]

LENGTH_BITS = 32  # the little-endian payload length that precedes the payload
SHIFT_BITS = data.Layout.cast(SgqStripeHeader)["shift"].shape.width
OFFSET_BITS = data.Layout.cast(SgqStripeHeader)["offset"].shape.width
MODE_BITS = SgqMode.as_shape().width
CODED = sorted(SGQ_MODE_BITS, key=SGQ_MODE_BITS.get)  # narrowest first


def _tree(m, values, better, name):
    """The value for which ``better`` holds against all others, by a balanced tree of
    comparators (a signal per node: a nested expression would double at every level)."""
    level = 0
    while len(values) > 1:
        nxt = []
        for n in range(0, len(values) - 1, 2):
            a, b = values[n], values[n + 1]
            node = Signal(signed(8), name=f"{name}{level}_{n // 2}")
            m.d.comb += node.eq(Mux(better(a, b), a, b))
            nxt.append(node)
        if len(values) % 2:
            nxt.append(values[-1])
        values, level = nxt, level + 1
    return values[0]


class SgqCommand(data.Struct):
    """SGQ operands plus ``zero``: send a zero length instead of encoding (not executed)."""
    operands: SgqOperands
    zero: unsigned(1)


class BitPacker(wiring.Component):
    """Packs fields of up to ``max_bits`` bits, least-significant bit first, into beats.

    Takes a field while fewer than ``width`` bits wait (``i_ready``) and sends a beat while at
    least ``width`` bits wait; the two never happen in the same cycle. Bits of ``value`` above
    ``nbits`` must be zero. ``fill`` says how many bits wait.
    """

    def __init__(self, width: int, max_bits: int):
        self._width, self._max_bits = width, max_bits
        super().__init__({
            "i_valid": In(1),
            "i_ready": Out(1),
            "i_value": In(max_bits),
            "i_nbits": In(range(max_bits + 1)),
            "fill": Out(range(width + max_bits + 1)),
            "o_stream": Out(stream.Signature(unsigned(width))),
        })

    def elaborate(self, platform):
        m = Module()
        w = self._width
        buf = Signal(w + self._max_bits)
        m.d.comb += [
            self.i_ready.eq(self.fill < w),
            self.o_stream.valid.eq(self.fill >= w),
            self.o_stream.payload.eq(buf[:w]),
        ]
        with m.If(self.o_stream.valid & self.o_stream.ready):
            m.d.sync += [buf.eq(buf >> w), self.fill.eq(self.fill - w)]
        with m.If(self.i_valid & self.i_ready):
            m.d.sync += [buf.eq(buf | (self.i_value << self.fill)),
                         self.fill.eq(self.fill + self.i_nbits)]
        return m


class StripeEncoder(wiring.Component):
    """Executes SGQ (section 8) and sends its response on ``o_stream``.

    The group is read from OUT four times, one word per cycle, because every field must be known
    before the first bit is sent: (1) the group minimum ``base``; (2) each stripe's min/max and
    so its mode and size, summed into ``payload_bytes``; then, after the length and ``base``,
    per stripe (3) its min/max again for the header and (4) its codes, ``cols`` per word. Mode
    choice per stripe: for each width b in {2, 4, 8} and shift s in 0..7, in parallel,
    ``(hi - lo + h(s)) >> s <= 2^b - 1``; the narrowest b whose smallest fitting s is at most
    ``max_shift`` wins.
    """

    def __init__(self, config: AccelConfig):
        self._config = config
        self._geom = geometry(config, Buffer.OUT)
        super().__init__({
            "ctrl": In(UnitControl(SgqCommand)),
            "rd_out": Out(ReadClient(self._geom)),
            "o_stream": Out(stream.Signature(unsigned(config.host_width))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        cols, hw = cfg.cols, cfg.host_width
        max_bits = max(LENGTH_BITS, 8 * cols, MODE_BITS + OFFSET_BITS + SHIFT_BITS)
        m.submodules.packer = packer = BitPacker(hw, max_bits)
        wiring.connect(m, packer.o_stream, wiring.flipped(self.o_stream))

        cmd = Signal(SgqOperands)
        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy)

        # -- OUT scanner: reads words [ptr, ptr + left) and holds each until taken ----------
        scan_ptr = Signal(ADDR_BITS + 1)
        scan_left = Signal(COUNT_BITS + 1)
        fetched = Signal()  # the read port holds a word not yet taken
        take = Signal()
        issue = (scan_left != 0) & (~fetched | take)
        scan_done = (scan_left == 0) & ~fetched
        m.d.comb += [self.rd_out.addr.eq(scan_ptr), self.rd_out.en.eq(issue)]
        with m.If(issue):
            m.d.sync += [scan_ptr.eq(scan_ptr + 1), scan_left.eq(scan_left - 1), fetched.eq(1)]
        with m.Elif(take):
            m.d.sync += fetched.eq(0)

        def scan(addr, words):
            return [scan_ptr.eq(addr), scan_left.eq(words)]

        values = data.View(data.ArrayLayout(signed(8), cols), self.rd_out.data)
        word_min = _tree(m, [values[c] for c in range(cols)], lambda a, b: a < b, "min")
        word_max = _tree(m, [values[c] for c in range(cols)], lambda a, b: a > b, "max")

        # -- stripe statistics and decision -------------------------------------------------
        base = Signal(signed(8))
        lo, hi = Signal(signed(8)), Signal(signed(8))
        in_stripe = Signal(8)  # words of the current stripe taken so far
        stripe_ptr = Signal(ADDR_BITS + 1)
        stripes_left = Signal(COUNT_BITS + 1)
        stripe_values = Signal(COUNT_BITS)  # L = stripe_len * cols
        collect = Signal()  # this pass gathers per-stripe min/max
        with m.If(take & collect):
            first = in_stripe == 0
            m.d.sync += [
                lo.eq(Mux(first | (word_min < lo), word_min, lo)),
                hi.eq(Mux(first | (word_max > hi), word_max, hi)),
                in_stripe.eq(Mux(in_stripe == cmd.stripe_len - 1, 0, in_stripe + 1)),
            ]
        stripe_end = take & collect & (in_stripe == cmd.stripe_len - 1)

        # decision from the registered lo/hi of a finished stripe (one cycle after stripe_end)
        mode, shift = Signal(SgqMode), Signal(SHIFT_BITS)
        span = (hi - lo).as_unsigned()[:8]
        # fits(b, s) is monotone in s (larger shifts only shrink the codes), so width b is usable
        # iff it fits at s = max_shift, and its smallest shift is the number of s that do not fit
        usable, smallest = {}, {}
        for b_mode in CODED:
            limit = (1 << SGQ_MODE_BITS[b_mode]) - 1
            # (span + h(s)) >> s <= 2^b - 1  <=>  span < 2^(b+s) - h(s): a constant compare
            fits = Cat(*(span < ((limit + 1) << s) - ((1 << s) >> 1)
                         for s in range(1 << SHIFT_BITS)))
            usable[b_mode] = fits.bit_select(cmd.max_shift, 1)
            smallest[b_mode] = Signal(range((1 << SHIFT_BITS) + 1), name=f"smallest_{b_mode.name}")
            m.d.comb += smallest[b_mode].eq(sum(~fits[s] for s in range(len(fits))))
        with m.If(usable[CODED[0]]):
            m.d.comb += [mode.eq(CODED[0]), shift.eq(smallest[CODED[0]])]
        with m.Elif(usable[CODED[1]]):
            m.d.comb += [mode.eq(CODED[1]), shift.eq(smallest[CODED[1]])]
        with m.Else():  # 8-bit codes with shift 0 always fit
            m.d.comb += [mode.eq(CODED[2]), shift.eq(smallest[CODED[2]])]
        with m.If(hi == base):
            m.d.comb += [mode.eq(SgqMode.BASE), shift.eq(0)]
        coded = mode != SgqMode.BASE
        code_bits = Signal(range(9))
        payload_bits = Signal(COUNT_BITS + 3)  # L * b, as a shift
        with m.Switch(mode):
            for b_mode, bits in SGQ_MODE_BITS.items():
                with m.Case(b_mode):
                    m.d.comb += [code_bits.eq(bits),
                                 payload_bits.eq(stripe_values << (bits.bit_length() - 1))]
        cost = MODE_BITS + Mux(coded, OFFSET_BITS + SHIFT_BITS + payload_bits, 0)
        decided = Signal()  # pulses the cycle after a stripe_end: mode/shift/cost are valid
        m.d.sync += decided.eq(stripe_end)
        # ... and are registered then (the compare bank and the cost are a long path)
        decision = Signal()  # pulses when d_mode/d_shift/d_cost hold the finished stripe's
        d_mode, d_shift, d_cost = Signal(SgqMode), Signal(SHIFT_BITS), Signal(COUNT_BITS + 4)
        m.d.sync += decision.eq(decided)
        with m.If(decided):
            m.d.sync += [d_mode.eq(mode), d_shift.eq(shift), d_cost.eq(cost)]

        # -- codes of one word --------------------------------------------------------------
        half = Signal(8)  # h(s) = 2^s >> 1
        m.d.comb += half.eq((Const(1, 8) << shift) >> 1)
        q = [Signal(9, name=f"q{c}") for c in range(cols)]
        for c in range(cols):
            m.d.comb += q[c].eq(((values[c] - lo).as_unsigned()[:8] + half) >> shift)
        codes = {b_mode: Cat(*(q[c][:bits] for c in range(cols)))
                 for b_mode, bits in SGQ_MODE_BITS.items()}
        code_value = Signal(8 * cols)
        with m.Switch(mode):
            for b_mode in SGQ_MODE_BITS:
                with m.Case(b_mode):
                    m.d.comb += code_value.eq(codes[b_mode])

        total_bits = Signal(32)
        r_mode, r_shift = Signal(SgqMode), Signal(SHIFT_BITS)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    m.d.sync += [cmd.eq(c.operands), busy.eq(1), in_stripe.eq(0),
                                 base.eq(127), total_bits.eq(8),
                                 stripe_values.eq(mul_const(c.operands.stripe_len, cols))]
                    with m.If(c.zero | (c.operands.count == 0)):
                        m.d.sync += total_bits.eq(0)
                        m.next = "SEND_LENGTH"
                    with m.Else():
                        m.d.sync += scan(c.operands.out_addr, c.operands.count)
                        m.next = "BASE"
            with m.State("BASE"):  # pass 1: group minimum
                m.d.comb += take.eq(fetched)
                with m.If(fetched & (word_min < base)):
                    m.d.sync += base.eq(word_min)
                with m.If(scan_done):
                    m.d.sync += scan(cmd.out_addr, cmd.count)
                    m.d.sync += in_stripe.eq(0)
                    m.next = "SIZE"
            with m.State("SIZE"):  # pass 2: per-stripe modes -> payload size
                m.d.comb += [take.eq(fetched), collect.eq(1)]
                with m.If(decision):
                    m.d.sync += total_bits.eq(total_bits + d_cost)
                with m.If(scan_done & ~stripe_end & ~decided & ~decision):
                    m.next = "SEND_LENGTH"
            with m.State("SEND_LENGTH"):
                m.d.comb += [packer.i_valid.eq(1), packer.i_nbits.eq(LENGTH_BITS),
                             packer.i_value.eq((total_bits + 7) >> 3)]
                with m.If(packer.i_ready):
                    m.next = "SEND_BASE"
                    with m.If(total_bits == 0):
                        m.next = "PAD"
            with m.State("SEND_BASE"):
                m.d.comb += [packer.i_valid.eq(1), packer.i_nbits.eq(8),
                             packer.i_value.eq(base.as_unsigned())]
                with m.If(packer.i_ready):
                    m.d.sync += [stripe_ptr.eq(cmd.out_addr),
                                 stripes_left.eq(cmd.count)]  # counted in words
                    m.next = "STRIPE"
            with m.State("STRIPE"):
                with m.If(stripes_left == 0):
                    m.next = "PAD"
                with m.Else():
                    m.d.sync += [scan(stripe_ptr, cmd.stripe_len), in_stripe.eq(0)]
                    m.next = "RANGE"
            with m.State("RANGE"):  # pass 3: this stripe's min/max
                m.d.comb += [take.eq(fetched), collect.eq(1)]
                with m.If(decision):
                    m.d.sync += [r_mode.eq(d_mode), r_shift.eq(d_shift)]
                    m.next = "HEADER"
            with m.State("HEADER"):
                header = Cat(r_mode.as_value(), (lo - base).as_unsigned()[:OFFSET_BITS],
                             r_shift)
                m.d.comb += [
                    packer.i_valid.eq(1),
                    packer.i_value.eq(Mux(r_mode == SgqMode.BASE, r_mode.as_value(), header)),
                    packer.i_nbits.eq(Mux(r_mode == SgqMode.BASE, MODE_BITS, len(header))),
                ]
                with m.If(packer.i_ready):
                    m.d.sync += [stripe_ptr.eq(stripe_ptr + cmd.stripe_len),
                                 stripes_left.eq(stripes_left - cmd.stripe_len)]
                    with m.If(r_mode == SgqMode.BASE):
                        m.next = "STRIPE"
                    with m.Else():
                        m.d.sync += scan(stripe_ptr, cmd.stripe_len)
                        m.next = "CODES"
            with m.State("CODES"):  # pass 4: the codes, one word per packer field
                m.d.comb += [
                    mode.eq(r_mode), shift.eq(r_shift),  # hold the stripe's decision
                    packer.i_valid.eq(fetched),
                    packer.i_value.eq(code_value),
                    packer.i_nbits.eq(mul_const(code_bits, cols)),
                    take.eq(fetched & packer.i_ready),
                ]
                with m.If(scan_done):
                    m.next = "STRIPE"
            with m.State("PAD"):  # zero bits up to a whole beat
                with m.If(packer.i_ready):
                    m.d.comb += [packer.i_valid.eq(packer.fill != 0),
                                 packer.i_nbits.eq(hw - packer.fill)]
                    m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(packer.fill == 0):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        return m
