"""SGQ stripe encoder, the serial design (compact builds): a value and a bit per cycle.

Same signature and bytes as :class:`~.sgq_encoder.StripeEncoderPipeline` (see
:class:`~.sgq_encoder.StripeEncoder` for the passes and the mode choice), in a fraction of the
logic: no min/max trees, no compare bank, no barrel shifter.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..errors import ConfigError
from .arith import mul_const
from .config import AccelConfig
from .crc import StreamCrc
from .isa import CRC, SGQ_MODE_BITS, SgqMode
from .sgq_encoder import (
    BASE_BITS,
    CODED,
    CRC_BITS,
    HEADER_BITS,
    LENGTH_BITS,
    MODE_BITS,
    NARROW,
    OFFSET_BITS,
    SHIFT_BITS,
    StripeEncoder,
)

__all__ = ["SerialPacker", "StripeEncoderSerial"]


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


class StripeEncoderSerial(StripeEncoder):
    """The serial design: one value per cycle from the held read port passes one comparator
    pair, the decision tries one shift per cycle, and every field leaves one bit per cycle
    through a :class:`SerialPacker`; a bit-serial CRC takes the same bits.

    ``held_cmd``: the dispatcher keeps ``ctrl.cmd`` on offer until the unit is done (builds
    without overlap), so the encoder keeps no copy of the operands.
    """

    def __init__(self, config: AccelConfig, *, held_cmd: bool = False):
        self._held_cmd = held_cmd
        super().__init__(config)

    def elaborate(self, platform):
        m = Module()
        cfg, geom = self._config, self._geom
        cols, hw = cfg.cols, cfg.host_width
        packer = SerialPacker(hw)
        busy = self._respond_through(m, packer)
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
        s = Signal(SHIFT_BITS)
        # per narrow width but the narrowest: it fitted at a shift <= s, the first at s_first
        fitted = {mode: Signal(name=f"fitted_{SGQ_MODE_BITS[mode]}") for mode in NARROW[1:]}
        s_first = {mode: Signal(SHIFT_BITS, name=f"s_first_{SGQ_MODE_BITS[mode]}")
                   for mode in NARROW[1:]}
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
        total = Signal(self._total_shape())  # 15 + payload bits: length = total >> 3
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
        # code_last: bit_idx == code_bits - 1, as a flop (only CODES reads it, and it enters
        # with bit_idx = 0 after the header's field_done, when the mode is known)
        code_last = Signal()
        with m.If(field_done):
            m.d.sync += [bit_idx.eq(0), code_last.eq(code_bits == 1)]
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

        # -- the CRC trailer: a bit-serial CRC over every bit the packer takes (the CRC is
        # reflected: bit by bit, LSB first, equals byte by byte). While the trailer is sent the
        # CRC takes each bit it sends complemented by the output XOR: its feedback is then 0
        # and its register only shifts, so crc[0] is always the next bit to send (no
        # multiplexer over the 32 bits).
        if not CRC.reflect_output or CRC.xor_output not in (0, (1 << CRC_BITS) - 1):
            raise ConfigError(f"{CRC!r}: the serial trailer needs a reflected output and a "
                              f"uniform output XOR")
        m.submodules.crc = crc = StreamCrc(1)
        trailer = Signal()  # the trailer (and the padding after it) is being sent
        m.d.comb += [crc.data.eq(emit_bit ^ (trailer & CRC.xor_output & 1)),
                     crc.valid.eq(took)]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    o = c.operands
                    m.d.comb += crc.start.eq(1)
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
                m.d.sync += [s.eq(0), *(fitted[mode].eq(0) for mode in NARROW[1:])]
                m.next = "DECIDE"
                with m.If(hi == base):  # every value is the base
                    decided(SgqMode.BASE, 0)
            with m.State("DECIDE"):  # the narrowest width wins at its first fitting shift
                with m.If(fits(NARROW[0])):
                    decided(NARROW[0], s)
                with m.Else():
                    for b_mode in NARROW[1:]:
                        with m.If(fits(b_mode) & ~fitted[b_mode]):
                            m.d.sync += [fitted[b_mode].eq(1), s_first[b_mode].eq(s)]
                    with m.If(s == max_shift):
                        # fits(b, s) is monotone in s: width b fits at some shift <= max_shift
                        # iff it fits at max_shift
                        for n, b_mode in enumerate(NARROW[1:]):  # narrowest first
                            with (m.If if n == 0 else m.Elif)(fits(b_mode)):
                                decided(b_mode, Mux(fitted[b_mode], s_first[b_mode], s))
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
            with m.State("PAD"):  # zero bits up to a whole beat; on when it has left
                m.d.comb += [emit.eq(packer.fill != 0), emit_bit.eq(0)]
                with m.If(packer.fill == 0):
                    m.d.comb += field_done.eq(1)
                    m.d.sync += trailer.eq(~trailer)
                    m.next = "TRAILER"
                    with m.If(trailer):
                        m.d.sync += busy.eq(0)
                        m.next = "IDLE"
            with m.State("TRAILER"):  # the CRC of every bit before it, then PAD again
                m.d.comb += [emit.eq(1), emit_bit.eq(crc.crc[0]),
                             field_done.eq(took & (bit_idx == CRC_BITS - 1))]
                with m.If(field_done):
                    m.next = "PAD"
        return m
