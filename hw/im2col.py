"""IM2COL unit: the window of a convolution, read from an activation tensor in OUT, written as
GEMM input words to INP (section 5, :class:`~.isa.Im2colOperands`); two designs, one signature.

Both walk the output pixels of a block with a *walker* instead of dividing: pixel ``p + 1`` is
``(oy, ox + 1)``, or ``(oy + 1, 0)`` after the row's last column. The walker holds ``ox``,
``iy0 = oy*stride - pad_top`` and ``ix0 = ox*stride - pad_left``; a tap adds ``dy = ky*dilation``
and ``dx = kx*dilation``. A block's first pixel is kept (``bs_*``): each INP word (or tile)
walks the block's pixels again from it, and the block after starts one step after its last
pixel. The first block starts at ``(oy0, 0)``.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..errors import ConfigError
from .config import AccelConfig
from .control import UnitControl
from .isa import BLOCKS_BITS, MASK_IDX_BITS, MASK_WORD_BITS, Buffer, Im2colOperands
from .scratchpads import ReadClient, WriteClient, geometry, mask_bit

__all__ = ["Im2col", "Im2colTiled", "Im2colSerial"]

#: Low bits of the input pixel index ``q = iy*in_w + ix``: a pixel inside the tensor has
#: ``q < 2**16`` (``in_h, in_w <= 255``), so arithmetic modulo ``2**16`` gives it exactly.
Q_BITS = 16


class Im2col(wiring.Component):
    """What both designs share: the ports (``ctrl``, ``rd_out``, ``wr_inp``; with the PASS unit
    ``rd_mask``, the gate bits, used by :class:`Im2colTiled` only) and the widths.

    ``held_cmd``: the dispatcher keeps ``ctrl.cmd`` valid until the unit is idle again, so the
    unit keeps no copy of it (compact builds; only :class:`Im2colSerial` uses it).
    """

    def __init__(self, config: AccelConfig, *, held_cmd: bool = False):
        if config.cols & (config.cols - 1):
            raise ConfigError(f"config {config.name!r}: the IM2COL unit needs a power-of-two "
                              f"cols, not {config.cols}")
        self._config = config
        self._held_cmd = held_cmd
        self._out = geometry(config, Buffer.OUT)
        self._inp = geometry(config, Buffer.INP)
        self._mask = geometry(config, Buffer.MASK)
        ports = {
            "ctrl": In(UnitControl(Im2colOperands)),
            "rd_out": Out(ReadClient(self._out)),
            "wr_inp": Out(WriteClient(self._inp)),
        }
        if config.impl.pass_unit:
            ports["rd_mask"] = Out(ReadClient(self._mask))
        super().__init__(ports)

    #: ``iy0`` and ``ix0`` stop growing once they reach this: every pixel from there on is
    #: outside the tensor (``in_h, in_w <= 255``), so they need not be exact beyond it.
    FAR = 256

    def _widths(self):
        """Signed widths of ``iy`` and ``ix``: ``iy0, ix0`` lie in ``[-15, FAR + 7*step)`` (they
        stop at ``FAR``; a step is one pixel, or with the PASS unit up to a patch), a tap adds up
        to ``31*7``."""
        step = max(self._config.patch_shape) if self._config.impl.pass_unit else 1
        top = self.FAR + 7 * step + 31 * 7
        return top.bit_length() + 1, top.bit_length() + 1

    def _walker(self, cmd, wrap=None):
        """Walker registers ``(ox, iy0, ix0)`` and their step (the next pixel's values); ``wrap``:
        ``ox`` is the row's last column (computed here unless given)."""
        iyw, ixw = self._widths()
        ox = Signal(8, name="ox")
        iy0 = Signal(signed(iyw), name="iy0")
        ix0 = Signal(signed(ixw), name="ix0")
        if wrap is None:
            wrap = ox == cmd.out_w - 1
        step = (Mux(wrap, 0, ox + 1)[:8],
                Mux(wrap & (iy0 < self.FAR), iy0 + cmd.stride, iy0)[:iyw].as_signed(),
                Mux(wrap, -cmd.pad_left,
                    Mux(ix0 < self.FAR, ix0 + cmd.stride, ix0))[:ixw].as_signed())
        return (ox, iy0, ix0), step

    @staticmethod
    def _lane(pack, q_low, log2_cols):
        """First lane of pixel ``q`` in its OUT word: ``(q mod 2**pack) * (cols >> pack)``."""
        lane = Const(0, log2_cols)
        for p in range(1, 4):
            if p <= log2_cols:
                mask = (1 << p) - 1
                lane = Mux(pack == p, (q_low & mask) << (log2_cols - p), lane)
        return lane[:log2_cols] if log2_cols else Const(0, 1)


class Im2colTiled(Im2col):
    """IM2COL in tiles, overlapping other units (full builds).

    A tile is ``rows`` output pixels (a block) by one OUT word of channels (``g``, up to ``cols``
    of them) of one tap: ``rows`` OUT reads, one a cycle, each rotated so that the tile row's lane
    ``j`` is channel ``g*cols + j`` (or ``pad_value`` everywhere outside the tensor), then one INP
    word per channel of it, one a cycle: lane ``r`` of the word is tile row ``r``. Two tile banks:
    one fills while the other drains, so a tile costs ``max(rows, channels in it)`` cycles in
    steady state (one INP word a cycle whenever a pixel's OUT word holds at least ``rows``
    channels). Tiles go in INP order (block, tap, channel group), so the INP address only counts.

    Read pipeline: (1) walker + tap offsets -> ``iy, ix`` and the row's ``q``; (2) inside test,
    ``q``; (3) ``(q >> pack) * pitch``; (4) read OUT at ``src + that + g``; (5) the tile row.
    Setup: 4 cycles after the start.

    With ``pool`` the taps are the innermost loop (block, channel group, tap): a tile is read
    ``kh*kw`` times into the same bank, the first tap written, each later one lane by lane the
    larger (signed) of it and what the row holds; the bank is full after the last tap. A pooled
    tile costs ``kh*kw*rows`` read cycles (its drain overlaps the next tile's reads).
    """

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        rows, cols = cfg.rows, cfg.cols
        lc = exact_log2(cols)
        iyw, ixw = self._widths()
        out_aw, inp_aw = self._out.addr_width, self._inp.addr_width

        cmd = Signal(Im2colOperands)
        (ox, iy0, ix0), step = self._walker(cmd)
        qrow = Signal(Q_BITS)  # iy0 * in_w (mod 2**16)
        bs_ox, bs_iy0, bs_ix0, bs_qrow = (Signal.like(s, name=f"bs_{s.name}")
                                           for s in (ox, iy0, ix0, qrow))
        srow = Signal(Q_BITS)  # stride * in_w: qrow's step to the next output row
        drow = Signal(Q_BITS)  # dilation * in_w: the step of dyw to the next tap row
        step_qrow = Mux(ox == cmd.out_w - 1, qrow + srow, qrow)[:Q_BITS]
        t1 = Signal(11)  # oy0 * stride (setup)
        pas = cfg.impl.pass_unit
        if pas:  # tiled and gate (PASS)
            ph, pw = cfg.patch_shape
            lph, lpw = exact_log2(ph), exact_log2(pw)
            tiled = cmd.tiled
            last_bx = Signal(8)  # out_w - pw: bs_ox of a row's last patch
            first_patch = Signal(16)  # oy0*out_w/rows (setup)
            kk = Signal(8)  # kh*kw (setup)
            k_words = Signal(inp_aw)  # INP words of a block (setup)
            # gate: MASK bit mpos is the current block's; mnext = mpos + 1 is the one read
            mpos, mnext = Signal(MASK_IDX_BITS), Signal(MASK_IDX_BITS)

        # tap, channel group, block, pixel
        ky, kx = Signal(5), Signal(5)
        last_kx = kx == cmd.kw - 1
        last_ky = ky == cmd.kh - 1
        first_tap, last_tap = (kx == 0) & (ky == 0), last_kx & last_ky
        dy, dx = Signal(8), Signal(8)
        dyw = Signal(Q_BITS)  # dy * in_w
        g = Signal(10)
        c_left = Signal(11)  # channels not in earlier groups
        ccount = Mux(c_left > cols, cols, c_left)[:lc + 1]
        i = Signal(BLOCKS_BITS)
        r = Signal(range(rows))
        wptr = Signal(inp_aw)

        # two tile banks: used from the tile's first read until its last INP write; full once
        # its last row has landed
        tile = data.ArrayLayout(data.ArrayLayout(8, cols), rows)
        banks = [Signal(tile, name=f"bank{b}") for b in range(2)]
        used, full = Signal(2), Signal(2)
        base = [Signal(inp_aw, name=f"base{b}") for b in range(2)]
        count = [Signal(lc + 1, name=f"count{b}") for b in range(2)]
        fs, ds = Signal(), Signal()  # bank being filled, bank being drained

        # -- read pipeline -----------------------------------------------------------------
        issue = Signal()
        last_row = r == rows - 1
        p1 = Signal(data.StructLayout({
            "valid": 1, "iy": signed(iyw), "ix": signed(ixw), "qr": Q_BITS, "g": 10,
            "r": range(rows), "bank": 1, "last": 1, "fresh": 1}))
        if pas:  # (1m) tiled: the row base's multiply; ix with its patch bits moved
            p1m = Signal(data.StructLayout({
                "valid": 1, "inside": 1, "qr": Q_BITS, "ix": Q_BITS, "g": 10,
                "r": range(rows), "bank": 1, "last": 1, "fresh": 1}))
        p2 = Signal(data.StructLayout({
            "valid": 1, "inside": 1, "q": Q_BITS, "g": 10, "r": range(rows), "bank": 1,
            "last": 1, "fresh": 1}))
        p3 = Signal(data.StructLayout({
            "valid": 1, "inside": 1, "word": Q_BITS + 6, "q_low": 3, "g": 10, "r": range(rows),
            "bank": 1, "last": 1, "fresh": 1}))
        p4 = Signal(data.StructLayout({
            "valid": 1, "inside": 1, "q_low": 3, "r": range(rows), "bank": 1, "last": 1,
            "fresh": 1}))
        m.d.sync += [
            p1.valid.eq(issue), p1.iy.eq(iy0 + dy), p1.ix.eq(ix0 + dx),
            p1.qr.eq(qrow + dyw), p1.g.eq(g), p1.r.eq(r), p1.bank.eq(fs),
            # (pool: the bank is full after the last tap; the first tap overwrites its rows)
            p1.last.eq(last_row & (~cmd.pool | last_tap)), p1.fresh.eq(~cmd.pool | first_tap),
        ]
        inside1 = (p1.iy >= 0) & (p1.iy < cmd.in_h) & (p1.ix >= 0) & (p1.ix < cmd.in_w)
        if pas:
            # tiled q = ((iy & ~(ph-1)) * in_w) + ((ix & ~(pw-1)) << lph) + ((iy & (ph-1)) <<
            # lpw) + (ix & (pw-1)): a multiply (a stage of its own), then the adder of stage 2;
            # the second term is ix with iy's low bits put between its own (wiring)
            row_base = Cat(Const(0, lph), p1.iy[lph:8] * cmd.in_w)[:Q_BITS]
            ix_tiled = Cat(p1.ix[:lpw], p1.iy[:lph], p1.ix[lpw:8])
            m.d.sync += [
                p1m.valid.eq(p1.valid), p1m.inside.eq(inside1),
                p1m.qr.eq(Mux(tiled, row_base, p1.qr)),
                p1m.ix.eq(Mux(tiled, ix_tiled, p1.ix[:Q_BITS])),
                p1m.g.eq(p1.g), p1m.r.eq(p1.r), p1m.bank.eq(p1.bank), p1m.last.eq(p1.last),
                p1m.fresh.eq(p1.fresh),
            ]
            s1, inside = p1m, p1m.inside
        else:
            s1, inside = p1, inside1
        m.d.sync += [
            p2.valid.eq(s1.valid), p2.inside.eq(inside),
            p2.q.eq(s1.qr + s1.ix[:Q_BITS]), p2.g.eq(s1.g), p2.r.eq(s1.r),
            p2.bank.eq(s1.bank), p2.last.eq(s1.last), p2.fresh.eq(s1.fresh),
            p3.valid.eq(p2.valid), p3.inside.eq(p2.inside),
            p3.word.eq((p2.q >> cmd.pack) * cmd.pitch), p3.q_low.eq(p2.q[:3]), p3.g.eq(p2.g),
            p3.r.eq(p2.r), p3.bank.eq(p2.bank), p3.last.eq(p2.last), p3.fresh.eq(p2.fresh),
            p4.valid.eq(p3.valid), p4.inside.eq(p3.inside), p4.q_low.eq(p3.q_low),
            p4.r.eq(p3.r), p4.bank.eq(p3.bank), p4.last.eq(p3.last), p4.fresh.eq(p3.fresh),
        ]
        m.d.comb += [
            self.rd_out.addr.eq((cmd.src + p3.word + p3.g)[:out_aw]),
            self.rd_out.en.eq(p3.valid & p3.inside),
        ]
        # (5) the word read lands in its tile row, rotated to the pixel's first lane
        shift = self._lane(cmd.pack, p4.q_low, lc)
        rotated = self.rd_out.data >> Cat(Const(0, 3), shift)
        pad = Cat(*[cmd.pad_value] * cols)
        row_value = Mux(p4.inside, rotated, pad)[:8 * cols]
        # pool, after the first tap: lane by lane the larger of the tap and the row so far
        held = Mux(p4.bank, banks[1][p4.r].as_value(), banks[0][p4.r].as_value())
        larger = []
        for lane in range(cols):
            new, old = row_value[8 * lane:8 * lane + 8], held[8 * lane:8 * lane + 8]
            larger.append(Mux(new.as_signed() > old.as_signed(), new, old))
        larger = Cat(*larger)
        row_new = Mux(p4.fresh, row_value, larger)
        with m.If(p4.valid):
            for b in range(2):
                with m.If(p4.bank == b):
                    with m.Switch(p4.r):
                        for rr in range(rows):
                            with m.Case(rr):
                                m.d.sync += banks[b][rr].as_value().eq(row_new)
            with m.If(p4.last):
                m.d.sync += full.bit_select(p4.bank, 1).eq(1)

        # -- drain: one INP word a cycle from the full bank ---------------------------------
        j = Signal(lc + 1)
        drain = Mux(ds, banks[1].as_value(), banks[0].as_value())
        drain = data.View(tile, drain)
        column = Cat(*[drain[rr][j[:lc] if lc else 0] for rr in range(rows)])
        draining = full.bit_select(ds, 1)
        m.d.comb += [
            self.wr_inp.addr.eq((Mux(ds, base[1], base[0]) + j)[:inp_aw]),
            self.wr_inp.data.eq(column),
            self.wr_inp.en.eq(Mux(draining, (1 << len(self.wr_inp.en)) - 1, 0)),
        ]
        with m.If(draining):
            m.d.sync += j.eq(j + 1)
            with m.If(j == Mux(ds, count[1], count[0]) - 1):
                m.d.sync += [j.eq(0), ds.eq(~ds), full.bit_select(ds, 1).eq(0),
                             used.bit_select(ds, 1).eq(0)]

        # -- the tile sequencer ---------------------------------------------------------------
        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy)
        last_g = c_left <= cols
        last_i = i == cmd.m_blocks - 1
        block_end = last_g & last_tap
        # a tile's first read claims a bank (pool: at its first tap only)
        opening = (r == 0) & (~cmd.pool | first_tap)
        far = self.FAR
        walker = (ox, iy0, ix0)
        block_start = (bs_ox, bs_iy0, bs_ix0)
        next_pixel = step  # the pixel after this one in the block, and the next block's first
        next_block = step
        if pas:
            # tiled: within a patch the next column, or at the end of a patch row the patch's
            # first column one row down; the next block is the next patch (from the block's
            # first pixel: bs_iy0 only grows, so it may stop at FAR)
            row_end = r[:lpw].all() if lpw else Const(1)
            tiled_pixel = (
                Mux(row_end, bs_ox, ox + 1)[:8],
                Mux(row_end & (iy0 < far), iy0 + cmd.stride, iy0)[:iyw].as_signed(),
                Mux(row_end, bs_ix0, Mux(ix0 < far, ix0 + cmd.stride, ix0))[:ixw].as_signed())
            wrap = bs_ox == last_bx
            next_patch = (
                Mux(wrap, 0, bs_ox + pw)[:8],
                Mux(wrap & (bs_iy0 < far), bs_iy0 + (cmd.stride << lph), bs_iy0)[:iyw].as_signed(),
                Mux(wrap, -cmd.pad_left,
                    Mux(bs_ix0 < far, bs_ix0 + (cmd.stride << lpw), bs_ix0))[:ixw].as_signed())
            next_pixel = tuple(Mux(tiled, t, s) for t, s in zip(tiled_pixel, step, strict=True))
            next_block = tuple(Mux(tiled, t, s) for t, s in zip(next_patch, step, strict=True))
            mask_word, _ = mask_bit(self._mask, mnext)
            _, mask_pos_bit = mask_bit(self._mask, mpos)
            m.d.comb += self.rd_mask.addr.eq(mask_word[:self._mask.addr_width])

            def next_gate_bit():
                """Read MASK bit ``mnext`` (in the gate register next cycle: ``mpos``)."""
                m.d.comb += self.rd_mask.en.eq(1)
                m.d.sync += [mpos.eq(mnext), mnext.eq(mnext + 1)]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    m.d.sync += cmd.eq(c)
                    with m.If(c.m_blocks != 0):
                        m.d.sync += busy.eq(1)
                        m.next = "SETUP"
            with m.State("SETUP"):
                m.d.sync += [
                    t1.eq(cmd.oy0 * cmd.stride),
                    srow.eq(cmd.stride * cmd.in_w), drow.eq(cmd.dilation * cmd.in_w),
                    bs_ox.eq(0), bs_ix0.eq(-cmd.pad_left),
                    ky.eq(0), kx.eq(0), dy.eq(0), dx.eq(0), dyw.eq(0),
                    g.eq(0), c_left.eq(cmd.channels), i.eq(0), r.eq(0), wptr.eq(cmd.dst),
                    fs.eq(0), ds.eq(0), j.eq(0),
                ]
                if pas:
                    m.d.sync += [
                        last_bx.eq(cmd.out_w - pw), kk.eq(cmd.kh * cmd.kw),
                        first_patch.eq((cmd.oy0 >> lph) * (cmd.out_w >> lpw)),
                    ]
                m.next = "SETUP_IY"
            with m.State("SETUP_IY"):
                first = t1 - cmd.pad_top
                m.d.sync += bs_iy0.eq(Mux(first > self.FAR, self.FAR, first))
                if pas:
                    m.d.sync += [
                        k_words.eq(Mux(cmd.pool, cmd.channels, kk * cmd.channels)),
                        mnext.eq(cmd.mask_word * MASK_WORD_BITS + first_patch),
                    ]
                m.next = "SETUP_Q"
            with m.State("SETUP_Q"):
                m.d.sync += [bs_qrow.eq(bs_iy0 * cmd.in_w), ox.eq(bs_ox), iy0.eq(bs_iy0),
                             ix0.eq(bs_ix0)]
                m.next = "LOAD"
            with m.State("LOAD"):
                m.d.sync += qrow.eq(bs_qrow)
                m.next = "RUN"
                if pas:
                    with m.If(cmd.gate):
                        next_gate_bit()
                        m.next = "GATE"
            with m.State("RUN"):
                with m.If(~opening | ~used.bit_select(fs, 1)):
                    m.d.comb += issue.eq(1)
                    with m.If(opening):
                        m.d.sync += [
                            used.bit_select(fs, 1).eq(1), wptr.eq(wptr + ccount),
                        ]
                        for b in range(2):
                            with m.If(fs == b):
                                m.d.sync += [base[b].eq(wptr), count[b].eq(ccount)]
                    m.d.sync += [r.eq(r + 1), qrow.eq(step_qrow)]
                    m.d.sync += [w.eq(n) for w, n in zip(walker, next_pixel, strict=True)]
                    with m.If(last_row):
                        m.d.sync += r.eq(0)
                        with m.If(~cmd.pool | last_tap):
                            m.d.sync += fs.eq(~fs)
                        with m.If(~block_end):  # the block again, for the next tile
                            m.d.sync += [ox.eq(bs_ox), iy0.eq(bs_iy0), ix0.eq(bs_ix0),
                                         qrow.eq(bs_qrow)]
                        with m.Else():  # the next block starts after this one's last pixel
                            m.d.sync += [w.eq(n) for w, n in zip(walker, next_block,
                                                                  strict=True)]
                            m.d.sync += [w.eq(n) for w, n in zip(block_start, next_block,
                                                                  strict=True)]
                            m.d.sync += [bs_qrow.eq(step_qrow), i.eq(i + 1)]
                            with m.If(last_i):
                                m.next = "FINISH"
                            if pas:
                                with m.Elif(cmd.gate):
                                    next_gate_bit()
                                    m.next = "GATE"
                        # the next channel group (pool: after the last tap), the next tap
                        # (without pool: after the last group)
                        with m.If(~cmd.pool | last_tap):
                            with m.If(~last_g):
                                m.d.sync += [g.eq(g + 1), c_left.eq(c_left - cols)]
                            with m.Else():
                                m.d.sync += [g.eq(0), c_left.eq(cmd.channels)]
                        with m.If(cmd.pool | last_g):
                            with m.If(~last_kx):
                                m.d.sync += [kx.eq(kx + 1), dx.eq(dx + cmd.dilation)]
                            with m.Else():
                                m.d.sync += [kx.eq(0), dx.eq(0)]
                                with m.If(~last_ky):
                                    m.d.sync += [ky.eq(ky + 1), dy.eq(dy + cmd.dilation),
                                                 dyw.eq(dyw + drow)]
                                with m.Else():
                                    m.d.sync += [ky.eq(0), dy.eq(0), dyw.eq(0)]
            if pas:
                with m.State("GATE"):
                    # MASK bit mpos (read last cycle) gates block i: set, run it; clear, skip it
                    # in this cycle (walker to the next patch, its INP words passed over) and
                    # look at the next bit, read meanwhile (wasted when this one is set)
                    m.d.comb += self.rd_mask.en.eq(1)
                    with m.If(self.rd_mask.data.bit_select(mask_pos_bit, 1)):
                        m.next = "RUN"
                    with m.Else():
                        next_gate_bit()
                        m.d.sync += [w.eq(n) for w, n in zip(walker, next_patch, strict=True)]
                        m.d.sync += [w.eq(n) for w, n in zip(block_start, next_patch,
                                                              strict=True)]
                        m.d.sync += [i.eq(i + 1), wptr.eq(wptr + k_words)]
                        with m.If(last_i):
                            m.next = "FINISH"
            with m.State("FINISH"):  # every tile read: wait for the banks to drain
                stages = [p1, p1m, p2, p3, p4] if pas else [p1, p2, p3, p4]
                with m.If(~used.any() & ~Cat(*(p.valid for p in stages)).any()):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        return m


class Im2colSerial(Im2col):
    """IM2COL one value at a time, for area (compact builds).

    For each INP word (block, tap, channel) and each lane ``r`` of it: the walker's pixel plus
    the tap gives ``iy, ix``; outside the tensor the value is ``pad_value`` (3 cycles); inside,
    one adder computes ``q = ix + iy*in_w`` (8 cycles) and then the OUT address ``src + g +
    (q >> pack)*pitch`` (6 cycles), shift-and-add from the least significant bit of ``in_w`` and
    of ``pitch``; the value read (lane ``(q mod 2**pack)*(cols >> pack) + c mod cols``) is
    shifted into the word, which is written when it has ``rows`` values: 20 cycles a value.
    Setup: the walker steps from row 0 down to row ``oy0`` (``oy0 + 2`` cycles, no multiplier).

    With ``pool`` the taps are the innermost loop (block, channel, lane, tap): the first tap's
    value is shifted into the word, each later one replaces the word's newest value if larger
    (signed); per pooled value ``kh*kw`` taps of 20 cycles (3 if padding).
    """

    #: Cycles of one value (one tap of one lane) inside the tensor, and of a padding value.
    VALUE_CYCLES = 20
    PAD_CYCLES = 3

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        rows, cols = cfg.rows, cfg.cols
        lc = exact_log2(cols)
        out_aw, inp_aw = self._out.addr_width, self._inp.addr_width

        cmd = self.ctrl.cmd if self._held_cmd else Signal(Im2colOperands)
        # The ends of the loops are compared into flags in PIXEL, two cycles or more before NEXT
        # uses them: compares on the state logic do not fit an iCE40 cycle at 30 MHz.
        wrap_q, last_r_q, last_c, last_kx, last_ky, last_i = (
            Signal(name=n) for n in ("wrap_q", "last_r_q", "last_c", "last_kx", "last_ky",
                                     "last_i"))
        (ox, iy0, ix0), step = self._walker(cmd, wrap=wrap_q)
        bs = [Signal.like(s, name=f"bs_{s.name}") for s in (ox, iy0, ix0)]
        ky, kx = Signal(5), Signal(5)
        dy, dx = Signal(8), Signal(8)
        c = Signal(10)
        i = Signal(BLOCKS_BITS)
        r = Signal(range(rows))
        wptr = Signal(inp_aw)
        word = Signal(8 * rows)  # values shift in at the top: lane r ends in bits 8r..8r+7
        first_tap = Signal(init=1)  # (pool: the tap opens a value; else always set)
        tap = Signal(8)  # the tap's value: the value read (CAPTURE) or padding (CHECK)
        # the counters' increments, shared by their loop-end compares (no subtractors)
        ox1, c1, kx1, ky1, i1 = ox + 1, c + 1, kx + 1, ky + 1, i + 1

        # shift-and-add: acc += mcand while the multiplier bit `bit` is set; mcand <<= 1
        acc = Signal(Q_BITS)
        mcand = Signal(Q_BITS)
        n = Signal(3)  # multiplier bit
        q_low = Signal(3)
        iy = iy0 + dy
        ix = ix0 + dx
        lane = self._lane(cmd.pack, q_low, lc)
        lane = (lane | c[:lc]) if lc else Const(0, 1)
        value = self.rd_out.data.word_select(lane, 8) if cols > 1 else self.rd_out.data[:8]

        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy)
        last_r = r == rows - 1
        nox, niy0, nix0 = step

        # the word with the tap taken (in NEXT): shifted in, or with pool after the first tap
        # the larger (signed) of it and the word's newest value (the tap is registered first: a
        # compare after the OUT read and its lane multiplexer does not fit an iCE40 cycle)
        top = word[-8:]
        larger = Mux(tap.as_signed() > top.as_signed(), tap, top)
        taken = Mux(first_tap, Cat(word[8:], tap), Cat(word[:-8], larger)) if rows > 1 else \
            Mux(first_tap, tap, larger)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    if not self._held_cmd:
                        m.d.sync += cmd.eq(self.ctrl.cmd)
                    with m.If(self.ctrl.cmd.m_blocks != 0):
                        m.d.sync += busy.eq(1)
                        m.next = "SETUP"
            with m.State("SETUP"):
                m.d.sync += [
                    ox.eq(0), iy0.eq(-cmd.pad_top), ix0.eq(-cmd.pad_left), wrap_q.eq(1),
                    ky.eq(0), kx.eq(0), dy.eq(0), dx.eq(0), c.eq(0), i.eq(0), r.eq(0),
                    wptr.eq(cmd.dst),
                ]
                m.next = "SETUP_ROWS"
            with m.State("SETUP_ROWS"):  # the walker steps down oy0 rows (no multiplier)
                with m.If(i == cmd.oy0):
                    m.d.sync += [bs[0].eq(ox), bs[1].eq(iy0), bs[2].eq(ix0), i.eq(0)]
                    m.next = "PIXEL"
                with m.Else():
                    m.d.sync += [ox.eq(nox), iy0.eq(niy0), ix0.eq(nix0), i.eq(i1)]
            with m.State("PIXEL"):
                # iy, ix into the multiplier's registers; the loop ends for NEXT into flags
                m.d.sync += [acc.eq(ix[:Q_BITS]), mcand.eq(iy[:Q_BITS]), n.eq(0),
                             wrap_q.eq(ox1 == cmd.out_w), last_r_q.eq(last_r),
                             last_c.eq(c1 == cmd.channels), last_kx.eq(kx1 == cmd.kw),
                             last_ky.eq(ky1 == cmd.kh), last_i.eq(i1 == cmd.m_blocks)]
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += tap.eq(cmd.pad_value)  # (replaced in CAPTURE when inside)
                # (as unsigned 16-bit values a negative iy or ix is beyond any in_h, in_w)
                with m.If((mcand < cmd.in_h) & (acc < cmd.in_w)):
                    m.next = "MUL_Q"
                with m.Else():
                    m.next = "NEXT"
            with m.State("MUL_Q"):  # q = ix + iy*in_w
                with m.If(cmd.in_w.bit_select(n, 1)):
                    m.d.sync += acc.eq(acc + mcand)
                m.d.sync += [mcand.eq(mcand << 1), n.eq(n + 1)]
                with m.If(n == 7):
                    m.next = "Q"
            with m.State("Q"):
                m.d.sync += [acc.eq(cmd.src + (c >> lc)), mcand.eq(acc >> cmd.pack),
                             q_low.eq(acc[:3]), n.eq(0)]
                m.next = "MUL_ADDR"
            with m.State("MUL_ADDR"):  # src + g + (q >> pack)*pitch
                with m.If(cmd.pitch.bit_select(n, 1)):
                    m.d.sync += acc.eq(acc + mcand)
                m.d.sync += [mcand.eq(mcand << 1), n.eq(n + 1)]
                with m.If(n == 5):
                    m.next = "READ"
            with m.State("READ"):
                m.d.comb += [self.rd_out.addr.eq(acc[:out_aw]), self.rd_out.en.eq(1)]
                m.next = "CAPTURE"
            with m.State("CAPTURE"):
                m.d.sync += tap.eq(value)
                m.next = "NEXT"
            with m.State("NEXT"):
                last_tap = last_kx & last_ky
                m.d.sync += word.eq(taken)
                m.next = "PIXEL"
                with m.If(Mux(cmd.pool, 1, last_r_q & last_c)):  # the next tap
                    with m.If(~last_kx):
                        m.d.sync += [kx.eq(kx1), dx.eq(dx + cmd.dilation)]
                    with m.Else():
                        m.d.sync += [kx.eq(0), dx.eq(0)]
                        with m.If(~last_ky):
                            m.d.sync += [ky.eq(ky1), dy.eq(dy + cmd.dilation)]
                        with m.Else():
                            m.d.sync += [ky.eq(0), dy.eq(0)]
                with m.If(cmd.pool & ~last_tap):  # pool: the same pixel's next tap
                    m.d.sync += first_tap.eq(0)
                with m.Else():
                    m.d.sync += [first_tap.eq(1),
                                 r.eq(r + 1), ox.eq(nox), iy0.eq(niy0), ix0.eq(nix0)]
                with m.If(last_r_q & (~cmd.pool | last_tap)):
                    m.d.comb += [
                        self.wr_inp.addr.eq(wptr), self.wr_inp.data.eq(taken),
                        self.wr_inp.en.eq((1 << len(self.wr_inp.en)) - 1),
                    ]
                    m.d.sync += [r.eq(0), wptr.eq(wptr + 1),
                                 ox.eq(bs[0]), iy0.eq(bs[1]), ix0.eq(bs[2])]
                    with m.If(~last_c):
                        m.d.sync += c.eq(c1)
                    with m.Else():
                        m.d.sync += c.eq(0)
                        with m.If(cmd.pool | last_tap):
                            # next block: one step after this one's last pixel
                            m.d.sync += [i.eq(i1),
                                         bs[0].eq(nox), bs[1].eq(niy0), bs[2].eq(nix0),
                                         ox.eq(nox), iy0.eq(niy0), ix0.eq(nix0)]
                            with m.If(last_i):
                                m.d.sync += busy.eq(0)
                                m.next = "IDLE"
        return m
