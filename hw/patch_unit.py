"""PASS change detection: compares OUT tiles with their references, writes MASK, refreshes refs."""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig
from .control import UnitControl
from .isa import BLOCKS_BITS, Buffer, PatchOperands
from .scratchpads import ReadClient, WriteClient, geometry, mask_bit

__all__ = ["PatchSkipUnit"]

#: Tiles the copy scan passes in one cycle when none of them changed.
SCAN_SKIP = 8


class PatchSkipUnit(wiring.Component):
    """Executes PATCH (section 7) on OUT, streaming, one *group* at a time: the tiles whose MASK
    bits lie in one physical MASK word (``host_width`` bits).

    1. Compare (not with ``given``): the new and the reference word alternate on OUT's single
       read port, two cycles per word, tile after tile with no pause between tiles. A tile's
       ``changed`` bit comes out of the compare pipeline while the next tile is read and goes
       into ``changed_bits``, the group's bits where they sit in the MASK word.
    2. MASK: the group's word is read (during the pipeline's drain) and written once:
       ``changed | (old and merge)`` on the group's bits, the others kept. With ``given`` the
       word is only read: its bits of the group are the changed tiles.
    3. Copy: a scan over the group's bits copies each changed tile over its reference, one word
       per cycle (the next changed tile at once); it passes up to ``SCAN_SKIP`` unchanged
       tiles per cycle (runs of 8, 4, 2, 1) and stops after the last changed one.

    Per group of ``n`` tiles: ``2nk`` compare cycles, 8 more, ``k`` per changed tile, and
    for each run of unchanged tiles before a changed one about ``run/8 + 3`` (see
    ``tests/test_hw_patch.py``).
    """

    def __init__(self, config: AccelConfig):
        self._config = config
        self._geoms = g = {buf: geometry(config, buf) for buf in (Buffer.OUT, Buffer.MASK)}
        super().__init__({
            "ctrl": In(UnitControl(PatchOperands)),
            "rd_out": Out(ReadClient(g[Buffer.OUT])),
            "wr_out": Out(WriteClient(g[Buffer.OUT])),
            "rd_mask": Out(ReadClient(g[Buffer.MASK])),
            "wr_mask": Out(WriteClient(g[Buffer.MASK])),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        lanes = cfg.cols
        word_layout = data.ArrayLayout(signed(8), lanes)
        g_mask = self._geoms[Buffer.MASK]
        width = g_mask.width  # MASK bits per physical word: the tiles of a group
        wbits = width.bit_length() - 1
        addr_bits = self._geoms[Buffer.OUT].addr_width
        mask_bits = (cfg.mask_bits - 1).bit_length()
        skip = min(SCAN_SKIP, width)

        cmd = Signal(PatchOperands)
        k = cmd.k[:addr_bits + 1]  # an executed PATCH has blocks*k <= OUT depth
        off = Signal(addr_bits)  # compare: word offset of the pair being read (b*k + t)
        t = Signal(addr_bits + 1)  # word in the tile (compare and copy)
        last_t = Signal()  # t == k - 1 (set along with t: no compare on the state logic)
        b = Signal(BLOCKS_BITS)
        last_b = Signal()  # b == blocks - 1
        bit = Signal(wbits)  # compare: the MASK bit (in its word) of the tile being read
        group_word = Signal(g_mask.addr_width)  # the group's MASK word
        last_word = Signal(g_mask.addr_width)  # the word of the instruction's last bit
        first_pos = Signal(wbits)  # the group's first bit in its word
        final_pos = Signal(wbits)  # the instruction's last bit in its word
        final = group_word == last_word

        changed_bits = Signal(width)  # the group's changed tiles, at their MASK bits
        covered = Signal(width)  # scan: the group's bits not passed yet
        scan_bits = Signal(width)  # scan: changed_bits, shifted as the scan passes bits
        cp = Signal(addr_bits)  # scan: word offset of the tile at bit 0 of scan_bits

        # -- compare pipeline: read (issue) -> port -> registers -> subtract -> threshold -> OR
        shows_new, shows_ref, ref_last = Signal(), Signal(), Signal()
        new_word = Signal(word_layout)
        ref_word = Signal(word_layout)
        port = data.View(word_layout, self.rd_out.data)
        with m.If(shows_new):
            m.d.sync += new_word.eq(port)
        # The reference word goes into a register before the compare, the differences and then
        # the lanes' results into others before they are ORed (block RAM clock-to-out plus
        # subtract, compare and OR tree does not fit one cycle). `*_last` marks the pair that
        # ends a tile; its bit lands in `changed_bits` 4 cycles after its reference was read.
        with m.If(shows_ref):
            m.d.sync += ref_word.eq(port)
        compare, subtracted, compared = Signal(), Signal(), Signal()
        cmp_last, sub_last, cmpd_last = Signal(), Signal(), Signal()
        diff = Signal(data.ArrayLayout(signed(9), lanes))  # new - ref of the pair
        over = Signal(lanes)  # lanes over the threshold in the pair
        m.d.sync += [compare.eq(shows_ref), subtracted.eq(compare), compared.eq(subtracted),
                     cmp_last.eq(ref_last), sub_last.eq(cmp_last), cmpd_last.eq(sub_last)]
        with m.If(compare):
            m.d.sync += [diff[r].eq(new_word[r] - ref_word[r]) for r in range(lanes)]
        with m.If(subtracted):
            thr = cmd.threshold
            m.d.sync += [over[r].eq((diff[r] > thr) | (diff[r] < -thr))  # |diff| > thr, no abs
                         for r in range(lanes)]
        tile_changed = Signal()  # some earlier pair of the tile in the pipeline's output
        res_bit = Signal(wbits)  # the MASK bit (in its word) of the next tile to come out
        with m.If(compared):
            changed = tile_changed | over.any()
            m.d.sync += tile_changed.eq(changed)
            with m.If(cmpd_last):
                m.d.sync += [changed_bits.bit_select(res_bit, 1).eq(changed),
                             tile_changed.eq(0), res_bit.eq(res_bit + 1)]
        m.d.sync += [shows_new.eq(0), shows_ref.eq(0)]

        # -- copy: the write is one cycle behind its read ------------------------------------
        copy_valid = Signal()
        copy_addr = Signal(addr_bits)
        m.d.sync += copy_valid.eq(0)
        m.d.comb += [
            self.wr_out.addr.eq(copy_addr),
            self.wr_out.data.eq(self.rd_out.data),
            self.wr_out.en.eq(Mux(copy_valid, (1 << len(self.wr_out.en)) - 1, 0)),
            self.rd_mask.addr.eq(group_word),
            self.wr_mask.addr.eq(group_word),
        ]

        busy = Signal()
        m.d.comb += self.ctrl.busy[0].eq(busy | copy_valid)

        def next_t():
            """Advance ``t`` in a tile of ``k`` words (``last_t``: this is its last word)."""
            return [t.eq(Mux(last_t, 0, t + 1)), last_t.eq(Mux(last_t, k == 1, t + 2 == k))]

        drain = Signal(range(4))
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ctrl.start):
                    c = self.ctrl.cmd
                    first = c.mask_idx[:mask_bits]
                    last = (c.mask_idx + c.blocks - 1)[:mask_bits]
                    first_word, first_bit = mask_bit(g_mask, first)
                    end_word, end_bit = mask_bit(g_mask, last)
                    m.d.sync += [
                        cmd.eq(c), off.eq(0), t.eq(0), last_t.eq(c.k == 1),
                        b.eq(0), last_b.eq(c.blocks == 1),
                        group_word.eq(first_word), last_word.eq(end_word),
                        first_pos.eq(first_bit), final_pos.eq(end_bit),
                        bit.eq(first_bit), res_bit.eq(first_bit),
                    ]
                    with m.If(c.blocks != 0):
                        m.d.sync += busy.eq(1)
                        m.next = "GROUP"
            with m.State("GROUP"):
                # the group's bits: first_pos .. (final_pos in the last word, else the word's end)
                hi = Mux(final, final_pos, width - 1)
                m.d.sync += [
                    cp.eq(off), changed_bits.eq(0), tile_changed.eq(0),
                    covered.eq(Cat(*[(i >= first_pos) & (i <= hi) for i in range(width)])),
                ]
                with m.If(cmd.given):
                    m.d.comb += self.rd_mask.en.eq(1)
                    m.next = "GIVEN"
                with m.Else():
                    m.next = "READ_NEW"
            with m.State("READ_NEW"):
                m.d.comb += [self.rd_out.addr.eq(cmd.new_addr + off), self.rd_out.en.eq(1)]
                m.d.sync += shows_new.eq(1)
                m.next = "READ_REF"
            with m.State("READ_REF"):
                m.d.comb += [self.rd_out.addr.eq(cmd.ref_addr + off), self.rd_out.en.eq(1)]
                m.d.sync += [shows_ref.eq(1), ref_last.eq(last_t), off.eq(off + 1), *next_t()]
                m.next = "READ_NEW"
                with m.If(last_t):  # the tile's last pair: on to the next tile
                    m.d.sync += [b.eq(b + 1), last_b.eq(b + 2 == cmd.blocks), bit.eq(bit + 1)]
                    with m.If(last_b | (bit == width - 1)):  # and the group's last tile
                        m.d.sync += drain.eq(0)
                        m.next = "DRAIN"
            with m.State("DRAIN"):  # the group's last bits are still in the compare pipeline
                m.d.comb += self.rd_mask.en.eq(drain == 0)  # (held until MASK_WRITE)
                m.d.sync += drain.eq(drain + 1)
                with m.If(drain == 3):
                    m.next = "MASK_WRITE"
            with m.State("MASK_WRITE"):
                old = self.rd_mask.data
                m.d.comb += [
                    self.wr_mask.data.eq(changed_bits |
                                         (old & (~covered | Mux(cmd.merge, ~0, 0)))),
                    self.wr_mask.en.eq((1 << len(self.wr_mask.en)) - 1),
                ]
                m.d.sync += scan_bits.eq(changed_bits)
                m.next = "SCAN"
            with m.State("GIVEN"):
                m.d.sync += scan_bits.eq(self.rd_mask.data & covered)
                m.next = "SCAN"
            with m.State("SCAN"):
                # bit 0 of scan_bits/covered is the tile at offset `cp` (when covered; the bits
                # below the first group's first bit are passed without moving `cp`)
                # (without `given` the compare has put `off` at the group's end already)
                done = (covered == 0) | ((scan_bits == 0) & (~cmd.given | final))
                with m.If(done):
                    with m.If(cmd.given):
                        m.d.sync += off.eq(cp)
                    m.next = "NEXT"
                with m.Elif(~covered[0]):
                    far = covered[:skip] == 0
                    m.d.sync += [covered.eq(Mux(far, covered >> skip, covered >> 1)),
                                 scan_bits.eq(Mux(far, scan_bits >> skip, scan_bits >> 1))]
                with m.Elif(scan_bits[0]):
                    m.next = "COPY"
                # pass the longest run of unchanged tiles of `skip`, `skip/2`, ... 2, 1 tiles
                step = skip
                while step > 1:
                    low = (1 << step) - 1
                    with m.Elif((scan_bits[:step] == 0) & (covered[:step] == low)):
                        m.d.sync += [covered.eq(covered >> step),
                                     scan_bits.eq(scan_bits >> step),
                                     cp.eq(cp + (k << (step.bit_length() - 1)))]
                    step //= 2
                with m.Else():
                    m.d.sync += [covered.eq(covered >> 1), scan_bits.eq(scan_bits >> 1),
                                 cp.eq(cp + k)]
            with m.State("COPY"):
                src = cp + t[:addr_bits]
                m.d.comb += [self.rd_out.addr.eq(cmd.new_addr + src), self.rd_out.en.eq(1)]
                m.d.sync += [copy_valid.eq(1), copy_addr.eq(cmd.ref_addr + src), *next_t()]
                with m.If(last_t):
                    m.d.sync += [covered.eq(covered >> 1), scan_bits.eq(scan_bits >> 1),
                                 cp.eq(cp + k)]
                    with m.If(~(scan_bits[1] & covered[1])):  # (else: the next tile at once)
                        m.next = "SCAN"
            with m.State("NEXT"):
                m.d.sync += [group_word.eq(group_word + 1), first_pos.eq(0), bit.eq(0),
                             res_bit.eq(0)]
                m.next = "GROUP"
                with m.If(final):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        return m
