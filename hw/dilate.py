"""PASS mask dilation: each output MASK bit the OR of a window of input MASK bits."""

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig
from .control import UnitControl
from .isa import Buffer, DilateOperands
from .scratchpads import ReadClient, WriteClient, geometry

__all__ = ["DilateUnit"]


class DilateUnit(wiring.Component):
    """Executes DILATE (section 7), one MASK read per cycle.

    Output bits are produced in order, each from ``kh`` *slots*, one per window row: the row's
    ``kw`` bits (clipped to the input) lie in one physical MASK word, or two when they straddle
    a word boundary (a second slot), so one read gives the whole row; a row outside the input
    takes a slot without a read. The read word, ANDed with the row's bit range, is ORed into
    the output bit a cycle later (the read latency; the next slot is read meanwhile).
    When the output word is complete (or the last bit is done) it is written read-modify-write
    (two cycles): the new bits, and where merging or outside the output range the old ones.

    About ``kh`` cycles per output bit (plus one per straddling row) and 2 per output word.
    """

    def __init__(self, config: AccelConfig):
        self._config = config
        self._geom = g = geometry(config, Buffer.MASK)
        super().__init__({
            "ctrl": In(UnitControl(DilateOperands)),
            "rd_mask": Out(ReadClient(g)),
            "wr_mask": Out(WriteClient(g)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        geom = self._geom
        width = geom.width
        wbits = width.bit_length() - 1
        word_bits = geom.addr_width
        pos_bits = (cfg.mask_bits - 1).bit_length()
        # input bit index of a window row: src + iy*in_w, iy from -3 to 3*255+7
        row_shape = signed(pos_bits + 2 + 8 + 2)

        cmd = Signal(DilateOperands)
        x, y, ky = Signal(8), Signal(8), Signal(3)
        last_x, last_y, last_ky = Signal(), Signal(), Signal()
        ix0 = Signal(signed(11))  # the window's first input column: x*stride_x - pad_left
        iy0 = Signal(signed(11))  # its first input row: y*stride_y - pad_top
        iy = Signal(signed(11))  # the slot's input row: iy0 + ky
        row0 = Signal(row_shape)  # src + iy0*in_w
        row = Signal(row_shape)  # src + iy*in_w
        lo = Signal(unsigned(8))  # the window's columns inside the input: lo .. hi
        hi = Signal(unsigned(8))
        cols_ok = Signal()  # lo <= hi (some column of the window is inside)

        def columns(first):
            """``(lo, hi, cols_ok)`` of a window starting at input column ``first``."""
            end = first + cmd.kw - 1
            return [lo.eq(Mux(first < 0, 0, first)),
                    hi.eq(Mux(end >= cmd.in_w, cmd.in_w - 1, end)),
                    cols_ok.eq((end >= 0) & (first < cmd.in_w) & (cmd.in_w != 0))]

        def times(value, factor):
            """``value * factor`` for a 2-bit ``factor``: two shifted adds."""
            return Mux(factor[0], value, 0) + Mux(factor[1], value << 1, 0)

        # the slot: the row's bit range [row + lo, row + hi], in one word or two
        a_lo = Signal(row_shape)
        a_hi = Signal(row_shape)
        m.d.comb += [a_lo.eq(row + lo), a_hi.eq(row + hi)]
        w_lo, p_lo = a_lo[wbits:wbits + word_bits], a_lo[:wbits]
        w_hi, p_hi = a_hi[wbits:wbits + word_bits], a_hi[:wbits]
        row_ok = (iy >= 0) & (iy < cmd.in_h) & cols_ok
        straddles = w_lo != w_hi

        # what the read port shows this cycle: the slot read last cycle, its bit range
        shows = Signal()
        shows_last = Signal()
        sel_lo = Signal(wbits)
        sel_hi = Signal(wbits)
        m.d.sync += [shows.eq(0), shows_last.eq(0)]
        sel = Cat(*[(i >= sel_lo) & (i <= sel_hi) for i in range(width)])
        hit = shows & (self.rd_mask.data & sel).any()

        # the output word being built: its bits and which of them are done
        out_bits, out_done = Signal(width), Signal(width)
        out_pos = Signal(wbits)  # the next output bit's place in its word (result side)
        out_word = Signal(word_bits)
        bit_or = Signal()  # the output bit so far
        with m.If(shows_last):  # the output bit's last slot: the bit is complete
            m.d.sync += [out_bits.bit_select(out_pos, 1).eq(bit_or | hit),
                         out_done.bit_select(out_pos, 1).eq(1),
                         out_pos.eq(out_pos + 1), bit_or.eq(0)]
        with m.Elif(hit):
            m.d.sync += bit_or.eq(1)

        issue_pos = Signal(wbits)  # the place of the output bit being read (issue side)
        m.d.comb += [self.wr_mask.addr.eq(out_word)]

        busy = Signal()
        finished = Signal()  # the last output bit has been read
        m.d.comb += self.ctrl.busy[0].eq(busy)

        def read(word, first, last, ends_bit):
            m.d.comb += [self.rd_mask.addr.eq(word), self.rd_mask.en.eq(1)]
            m.d.sync += [shows.eq(1), sel_lo.eq(first), sel_hi.eq(last)]
            if ends_bit is not None:
                m.d.sync += shows_last.eq(ends_bit)

        def next_slot():
            """Move to the next window row, output bit, output row; to FLUSH after a word's
            last bit."""
            m.d.sync += [ky.eq(ky + 1), last_ky.eq(ky + 2 == cmd.kh), iy.eq(iy + 1),
                         row.eq(row + cmd.in_w)]
            m.next = "SLOT"
            with m.If(last_ky):
                nx = ix0 + cmd.stride_x
                m.d.sync += [ky.eq(0), last_ky.eq(cmd.kh == 1), iy.eq(iy0), row.eq(row0),
                             x.eq(x + 1), last_x.eq(x + 2 == cmd.out_w), ix0.eq(nx),
                             *columns(nx), issue_pos.eq(issue_pos + 1)]
                with m.If(last_x):
                    m.d.sync += finished.eq(last_y)
                    ny = iy0 + cmd.stride_y
                    nrow = row0 + times(cmd.in_w, cmd.stride_y)
                    m.d.sync += [x.eq(0), last_x.eq(cmd.out_w == 1), ix0.eq(-cmd.pad_left),
                                 *columns(-cmd.pad_left),
                                 y.eq(y + 1), last_y.eq(y + 2 == cmd.out_h),
                                 iy0.eq(ny), iy.eq(ny), row0.eq(nrow), row.eq(nrow)]
                with m.If((issue_pos == width - 1) | (last_x & last_y)):
                    m.next = "FLUSH_READ"

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    top = -c.pad_top
                    first_row = c.src - times(c.in_w, c.pad_top)
                    m.d.sync += [
                        cmd.eq(c), x.eq(0), y.eq(0), ky.eq(0),
                        last_x.eq(c.out_w == 1), last_y.eq(c.out_h == 1),
                        last_ky.eq(c.kh == 1),
                        iy0.eq(top), iy.eq(top), row0.eq(first_row), row.eq(first_row),
                        ix0.eq(-c.pad_left),
                        out_word.eq(c.dst[wbits:]), out_pos.eq(c.dst[:wbits]),
                        issue_pos.eq(c.dst[:wbits]), out_bits.eq(0), out_done.eq(0),
                        bit_or.eq(0), finished.eq(0),
                    ]
                    with m.If((c.out_w != 0) & (c.out_h != 0)):
                        m.d.sync += busy.eq(1)
                        m.next = "START"
            with m.State("START"):  # (the window's columns from the registered command)
                m.d.sync += columns(ix0)
                m.next = "SLOT"
            with m.State("SLOT"):
                with m.If(row_ok):
                    read(w_lo, p_lo, Mux(straddles, width - 1, p_hi),
                         last_ky & ~straddles)
                    with m.If(straddles):
                        m.next = "SLOT_HI"
                    with m.Else():
                        next_slot()
                with m.Else():  # (no read: nothing to OR in)
                    m.d.sync += shows_last.eq(last_ky)
                    next_slot()
            with m.State("SLOT_HI"):  # the part of the row in the next word
                read(w_hi, 0, p_hi, last_ky)
                next_slot()
            with m.State("FLUSH_READ"):  # (the word's last bit is being completed)
                m.d.comb += [self.rd_mask.addr.eq(out_word), self.rd_mask.en.eq(1)]
                m.next = "FLUSH_WRITE"
            with m.State("FLUSH_WRITE"):
                old = self.rd_mask.data
                keep = ~out_done | Mux(cmd.merge, ~0, 0)
                m.d.comb += [self.wr_mask.data.eq(out_bits | (old & keep)),
                             self.wr_mask.en.eq((1 << len(self.wr_mask.en)) - 1)]
                m.d.sync += [out_bits.eq(0), out_done.eq(0), out_word.eq(out_word + 1)]
                m.next = "SLOT"
                with m.If(finished):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        return m
