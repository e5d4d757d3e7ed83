"""PASS patch-skip unit: compares INP tiles with their references, writes MASK, refreshes refs."""

from amaranth.hdl import Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig
from .control import UnitControl
from .isa import BLOCKS_BITS, Buffer, PatchOperands
from .scratchpads import ReadClient, WriteClient, geometry, mask_bit

__all__ = ["PatchSkipUnit"]


class PatchSkipUnit(wiring.Component):
    """Executes PATCH (section 7), one block of ``k`` INP words at a time.

    1. Compare: the new and the reference word alternate on INP's single read port (two cycles
       per word); all ``rows`` lanes of ``|new - ref| > threshold`` are ORed into ``changed``.
       The compare stops as soon as ``changed`` is set (the rest cannot change the outcome).
    2. MASK read-modify-write of bit ``mask_idx + b``: ``changed or (merge and old)``.
    3. If changed, copy: one word per cycle, read new, write it over the reference.

    A block costs ``2k + 6`` cycles when unchanged and at most ``3k + 7`` when changed.
    """

    def __init__(self, config: AccelConfig, *, held_cmd: bool = False):
        self._config = config
        self._held_cmd = held_cmd
        self._geoms = g = {buf: geometry(config, buf) for buf in Buffer}
        super().__init__({
            "ctrl": In(UnitControl(PatchOperands)),
            "rd_inp": Out(ReadClient(g[Buffer.INP])),
            "wr_inp": Out(WriteClient(g[Buffer.INP])),
            "rd_mask": Out(ReadClient(g[Buffer.MASK])),
            "wr_mask": Out(WriteClient(g[Buffer.MASK])),
        })

    def elaborate(self, platform):
        m = Module()
        rows = self._config.rows
        word_layout = data.ArrayLayout(signed(8), rows)

        # Pointers and counters as wide as what they address: an executed PATCH with blocks
        # stays inside INP and the mask bits (decoder checks), so k <= INP depth.
        cfg = self._config
        addr_bits = self._geoms[Buffer.INP].addr_width
        t_bits = cfg.depth(Buffer.INP).bit_length()
        mask_bits = (cfg.mask_bits - 1).bit_length()
        # `held_cmd` (compact builds): the dispatcher keeps `ctrl.cmd` valid until the unit is
        # idle again, so the block pointers are an offset from its addresses, which only resets
        # and counts (no loads to multiplex)
        cmd = self.ctrl.cmd if self._held_cmd else Signal(PatchOperands)
        k = cmd.k[:t_bits]
        b = Signal(BLOCKS_BITS)
        t = Signal(t_bits)
        if self._held_cmd:
            b_off = Signal(addr_bits)  # b*k
            new_ptr = (cmd.new_addr[:addr_bits] + b_off)[:addr_bits]
            ref_ptr = (cmd.ref_addr[:addr_bits] + b_off)[:addr_bits]
            mask_pos = (cmd.mask_idx + b)[:mask_bits]
        else:
            new_ptr = Signal(addr_bits)
            ref_ptr = Signal(addr_bits)
            mask_pos = Signal(mask_bits)
        mask_word, pos = mask_bit(self._geoms[Buffer.MASK], mask_pos)
        changed = Signal()
        # "last of its loop" flags set along with the counters, not compared from them (the
        # compares would sit on the state logic: too slow for the iCE40)
        last_t = Signal()  # t == k - 1
        last_b = Signal()  # b == blocks - 1

        # what the INP read port shows this cycle (issued last cycle)
        shows_new, shows_ref = Signal(), Signal()
        new_word = Signal(word_layout)
        ref_word = Signal(word_layout)
        compare = Signal()  # new_word and ref_word hold a pair to compare
        port = data.View(word_layout, self.rd_inp.data)
        with m.If(shows_new):
            m.d.sync += new_word.eq(port)
        # The reference word goes into a register before the compare, the differences and then
        # the lanes' results into others before they are ORed into ``changed``: block RAM
        # clock-to-out plus subtract, compare and OR tree does not fit one ECP5 cycle at
        # 100 MHz, nor subtract and compare an iCE40 cycle at 30. The compare of the block's last
        # pair still lands before MASK_WRITE reads ``changed`` (three LAST_COMPARE cycles).
        with m.If(shows_ref):
            m.d.sync += ref_word.eq(port)
        subtracted, compared = Signal(), Signal()
        diff = Signal(data.ArrayLayout(signed(9), rows))  # new - ref of the pair
        over = Signal(rows)  # lanes over the threshold in the pair
        m.d.sync += [compare.eq(shows_ref), subtracted.eq(compare), compared.eq(subtracted)]
        with m.If(compare):
            m.d.sync += [diff[r].eq(new_word[r] - ref_word[r]) for r in range(rows)]
        with m.If(subtracted):
            thr = cmd.threshold
            m.d.sync += [over[r].eq((diff[r] > thr) | (diff[r] < -thr))  # |diff| > thr, no abs
                         for r in range(rows)]
        with m.If(compared & over.any()):
            m.d.sync += changed.eq(1)
        m.d.sync += [shows_new.eq(0), shows_ref.eq(0)]

        # copy write, one cycle behind its read
        copy_valid = Signal()
        copy_addr = Signal(addr_bits)
        m.d.sync += copy_valid.eq(0)
        m.d.comb += [
            self.wr_inp.addr.eq(copy_addr),
            self.wr_inp.data.eq(self.rd_inp.data),
            self.wr_inp.en.eq(Mux(copy_valid, (1 << len(self.wr_inp.en)) - 1, 0)),
            self.rd_mask.addr.eq(mask_word),
            self.wr_mask.addr.eq(mask_word),
        ]

        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy | copy_valid)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    m.d.sync += [b.eq(0), last_b.eq(c.blocks == 1)]
                    if self._held_cmd:
                        m.d.sync += b_off.eq(0)
                    else:
                        m.d.sync += [cmd.eq(c), new_ptr.eq(c.new_addr), ref_ptr.eq(c.ref_addr),
                                     mask_pos.eq(c.mask_idx)]
                    with m.If(c.blocks != 0):
                        m.d.sync += busy.eq(1)
                        m.next = "BLOCK"
            with m.State("BLOCK"):
                m.d.sync += [t.eq(0), last_t.eq(k == 1), changed.eq(0)]
                m.next = "READ_NEW"
            with m.State("READ_NEW"):
                with m.If(changed):  # decided: skip the rest of the compare
                    m.next = "MASK_READ"
                with m.Else():
                    m.d.comb += [self.rd_inp.addr.eq(new_ptr + t), self.rd_inp.en.eq(1)]
                    m.d.sync += shows_new.eq(1)
                    m.next = "READ_REF"
            with m.State("READ_REF"):
                m.d.comb += [self.rd_inp.addr.eq(ref_ptr + t), self.rd_inp.en.eq(1)]
                m.d.sync += [shows_ref.eq(1), t.eq(t + 1), last_t.eq(t + 2 == k)]
                m.next = "READ_NEW"
                with m.If(last_t):
                    m.next = "LAST_COMPARE"
            with m.State("LAST_COMPARE"):  # the last reference word is being registered
                m.next = "LAST_COMPARE_2"
            with m.State("LAST_COMPARE_2"):  # subtracted
                m.next = "LAST_COMPARE_3"
            with m.State("LAST_COMPARE_3"):  # and compared
                m.next = "MASK_READ"
            with m.State("MASK_READ"):
                m.d.comb += self.rd_mask.en.eq(1)
                m.next = "MASK_WRITE"
            with m.State("MASK_WRITE"):
                old = self.rd_mask.data
                bit = changed | (cmd.merge & old.bit_select(pos, 1))
                m.d.comb += [
                    self.wr_mask.data.eq(old & ~(Const(1, len(old)) << pos) | (bit << pos)),
                    self.wr_mask.en.eq((1 << len(self.wr_mask.en)) - 1),
                ]
                m.d.sync += [t.eq(0), last_t.eq(k == 1)]
                m.next = "NEXT"
                with m.If(changed):
                    m.next = "COPY"
            with m.State("COPY"):
                m.d.comb += [self.rd_inp.addr.eq(new_ptr + t), self.rd_inp.en.eq(1)]
                m.d.sync += [copy_valid.eq(1), copy_addr.eq(ref_ptr + t), t.eq(t + 1),
                             last_t.eq(t + 2 == k)]
                with m.If(last_t):
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.sync += [b.eq(b + 1), last_b.eq(b + 2 == cmd.blocks)]
                if self._held_cmd:
                    m.d.sync += b_off.eq(b_off + k)
                else:
                    m.d.sync += [new_ptr.eq(new_ptr + k), ref_ptr.eq(ref_ptr + k),
                                 mask_pos.eq(mask_pos + 1)]
                m.next = "BLOCK"
                with m.If(last_b):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        return m
