"""GEMM: sequences one instruction's m_blocks x n_blocks x k loops through the MAC array and
drains finished blocks into ACC, in two designs with one signature.

:class:`ConcurrentGemmUnit` (full builds) copies its operands and runs beside other units;
:class:`ExclusiveGemmUnit` (compact builds, one instruction at a time) reads its operands from
the dispatcher's held command and owns the ACC read port while it drains.
"""

from dataclasses import dataclass
from functools import reduce
from operator import or_

from amaranth.hdl import Cat, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .arith import mul_const
from .config import AccelConfig
from .control import UnitControl
from .counters import ADD_BITS
from .isa import BLOCKS_BITS, Buffer, GemmOperands
from .mac_array import MacArray
from .scratchpads import ReadClient, WriteClient, geometry, mask_bit

__all__ = ["GemmUnit", "ConcurrentGemmUnit", "ExclusiveGemmUnit", "drain_group"]

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def drain_group(config: AccelConfig, *, shadow: bool, exclusive: bool) -> int:
    """Accumulators per item the MAC array sends, one item per cycle (its ``group``).

    With the shadow bank a whole row; without, the exclusive design (ACC in per-beat lanes)
    drains one host-beat-aligned group at a time, so that only one group needs an adder and
    saturation, the concurrent one whole rows. The sequencer leaves ``rows * cols / group``
    idle cycles between blocks without the shadow bank (:class:`~.mac_array.MacArray`).
    """
    if shadow or not exclusive:
        return config.cols
    return max(1, config.host_width // 32)


class GemmUnit(wiring.Component):
    """Executes GEMM instructions (section 5) on a :class:`~.mac_array.MacArray`.

    **Sequencer.** For block (i, j) it streams the ``k`` INP words ``inp_addr + i*k + t`` and WGT
    words ``wgt_addr + j*k + t`` into the array, one pair per cycle, with no gap between blocks;
    the addresses are running pointers (no multiplier). With ``gate`` it reads MASK bit
    ``mask_idx + i`` before row ``i`` and skips the row's blocks (one cycle each, counted in
    ``skipped_macs``) when the bit is 0. A block's last step waits until ``rows`` cycles after
    the previous block's (only matters for ``k < rows``), which is what the array needs; without
    the array's shadow bank, a block's first step waits ``rows + 1`` cycles after the previous
    block's last one instead (``rows`` idle cycles).

    **Drain.** Rows leaving the array's shadow bank are written to ACC through a 3-stage pipeline:
    read the old row (only with ``accumulate``), add (33 bits), saturate and write. A saturating
    lane pulses ``saturated``.

    **Two slots.** The unit takes the next GEMM as soon as the sequencer is free, while the
    previous instruction's blocks still drain; each instruction keeps its slot (its hazard entry in
    the dispatcher) until its last row is written.

    This class holds what both designs share; :class:`ConcurrentGemmUnit` and
    :class:`ExclusiveGemmUnit` supply the address generation (from a copy of the operands or from
    the held ``ctrl.cmd``), the drain's reads of the old ACC rows and the drain group
    (:func:`drain_group`). ``shadow`` selects the MAC array's shadow bank
    (:class:`~.mac_array.MacArray`).
    """

    #: The design for builds that execute one instruction at a time.
    exclusive: bool

    def __init__(self, config: AccelConfig, *, shadow: bool = True):
        self._config = config
        self._shadow = shadow
        self._geoms = {buf: geometry(config, buf) for buf in Buffer}
        g = self._geoms
        super().__init__({
            "ctrl": In(UnitControl(GemmOperands, slots=2)),
            "rd_inp": Out(ReadClient(g[Buffer.INP])),
            "rd_wgt": Out(ReadClient(g[Buffer.WGT])),
            "rd_mask": Out(ReadClient(g[Buffer.MASK])),
            "rd_acc": Out(ReadClient(g[Buffer.ACC])),
            "wr_acc": Out(WriteClient(g[Buffer.ACC])),
            "computing": Out(1),  # one K-step entered the array this cycle (rows*cols MACs)
            "skipped_macs": Out(ADD_BITS),  # MACs of a block skipped this cycle
            "saturated": Out(1),  # an accumulate saturated this cycle
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        rows, cols = cfg.rows, cfg.cols
        ctrl = self.ctrl

        # Pointers and counters are as wide as the buffers they address: the decoder's range
        # checks guarantee that an executed GEMM with any block stays inside them (k <= INP
        # and WGT depth, and so on); a GEMM without blocks never uses them.
        g = self._geoms
        acc_bits = g[Buffer.ACC].addr_width
        t_bits = min(cfg.depth(Buffer.INP), cfg.depth(Buffer.WGT)).bit_length()
        mask_pos_bits = (cfg.mask_bits - 1).bit_length()
        tag_layout = data.StructLayout({"acc_addr": unsigned(acc_bits), "accumulate": 1, "slot": 1})
        group = drain_group(cfg, shadow=self._shadow, exclusive=self.exclusive)
        m.submodules.array = array = MacArray(rows, cols, tag_layout, shadow=self._shadow,
                                              group=group)

        # -- instruction registers and loop state ------------------------------------------
        cmd = self.operands()
        slot = Signal()
        active = Signal()  # the sequencer holds an instruction
        i = Signal(BLOCKS_BITS)
        j = Signal(BLOCKS_BITS)
        t = Signal(t_bits)
        k = cmd.k[:t_bits]
        addr = self.addresses(cmd, i, t, mask_pos_bits)
        inp_ptr, wgt_ptr, acc_ptr, mask_pos = addr.inp, addr.wgt, addr.acc, addr.mask_pos
        mask_word, mask_pos_bit = mask_bit(g[Buffer.MASK], mask_pos)
        block_macs = mul_const(k, rows * cols)
        cool = Signal(range(array.spacing))  # cycles until the waiting step may issue
        pending = [Signal(4, name=f"pending{s}") for s in range(2)]  # blocks of slot s in flight

        with m.If(cool != 0):
            m.d.sync += cool.eq(cool - 1)

        # -- slots ---------------------------------------------------------------------------
        for s in range(2):
            m.d.comb += ctrl.busy[s].eq((active & (slot == s)) | (pending[s] != 0))
        m.d.comb += [
            ctrl.ready.eq(~active & ~(ctrl.busy[0] & ctrl.busy[1])),
            ctrl.slot.eq(ctrl.busy[0]),
        ]

        # -- sequencer -----------------------------------------------------------------------
        issue = Signal()  # a K-step enters the pipeline this cycle
        t_next = t + 1
        # "first step" and "last of its loop" are flags set along with the counters (from the
        # value they are about to take), not compared from them: the compares would sit on the
        # sequencer's issue and advance logic (too slow for the iCE40)
        first_t = Signal(init=1)  # t == 0
        last_t = Signal()  # t == k - 1
        last_j = Signal()  # j == n_blocks - 1
        last_i = Signal()  # i == m_blocks - 1
        k_is_1 = Signal()  # (held from the start, so the flags need no compares of k)
        k_minus_2 = Signal(t_bits)
        op = array.i_stream.payload
        s1_first, s1_last = Signal(), Signal()
        s1_tag = Signal(tag_layout)
        m.d.sync += array.i_stream.valid.eq(issue)
        m.d.comb += [
            op.inp.eq(self.rd_inp.data),
            op.wgt.eq(self.rd_wgt.data),
            op.first.eq(s1_first), op.last.eq(s1_last), op.tag.eq(s1_tag),
            self.rd_inp.addr.eq(inp_ptr),
            self.rd_wgt.addr.eq(wgt_ptr),
            self.rd_inp.en.eq(issue),
            self.rd_wgt.en.eq(issue),
            self.rd_mask.addr.eq(mask_word),
            self.computing.eq(issue),
        ]
        with m.If(issue):
            m.d.sync += [
                s1_first.eq(first_t), s1_last.eq(last_t),
                s1_tag.acc_addr.eq(acc_ptr), s1_tag.accumulate.eq(cmd.accumulate),
                s1_tag.slot.eq(slot),
            ]

        def next_block():
            """Advance (i, j) after a block; returns to ROW at a row end, IDLE after the last."""
            self.next_block(m, addr, cmd, k, last_j, i, j)
            with m.If(last_j):
                m.d.sync += [last_j.eq(cmd.n_blocks == 1), last_i.eq(i + 2 == cmd.m_blocks)]
                with m.If(last_i):
                    m.d.sync += active.eq(0)
                    m.next = "IDLE"
                with m.Else():
                    m.next = "ROW"
            with m.Else():
                m.d.sync += last_j.eq(j + 2 == cmd.n_blocks)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(ctrl.start):
                    c = ctrl.cmd
                    m.d.sync += [slot.eq(ctrl.slot), i.eq(0), j.eq(0), t.eq(0), first_t.eq(1),
                                 last_t.eq(c.k[:t_bits] == 1), k_is_1.eq(c.k[:t_bits] == 1),
                                 k_minus_2.eq(c.k[:t_bits] - 2),
                                 last_j.eq(c.n_blocks == 1), last_i.eq(c.m_blocks == 1)]
                    self.first_block(m, addr, cmd, c)
                    with m.If((c.m_blocks != 0) & (c.n_blocks != 0)):
                        m.d.sync += active.eq(1)
                        m.next = "ROW"
            with m.State("ROW"):
                with m.If(cmd.gate):
                    m.d.comb += self.rd_mask.en.eq(1)
                    m.next = "MASK"
                with m.Else():
                    m.next = "RUN"
            with m.State("MASK"):
                with m.If(self.rd_mask.data.bit_select(mask_pos_bit, 1)):
                    m.next = "RUN"
                with m.Else():
                    m.next = "SKIP"
            with m.State("RUN"):
                waits = last_t if self._shadow else first_t  # the step that must wait
                m.d.comb += issue.eq(~waits | (cool == 0))
                with m.If(issue):
                    m.d.sync += [t.eq(t_next), first_t.eq(0), last_t.eq(t == k_minus_2)]
                    self.next_step(m, addr)
                    with m.If(last_t):
                        m.d.sync += [t.eq(0), first_t.eq(1), last_t.eq(k_is_1),
                                     cool.eq(array.spacing - 1)]
                        next_block()
            with m.State("SKIP"):
                m.d.comb += self.skipped_macs.eq(block_macs)
                next_block()

        # -- drain: rows (or groups of a row) -> ACC ------------------------------------------
        # Three stages: read the old row (its group's beats, the others read as zero), add in
        # 33 bits, saturate and write the group's beats.
        item = array.o_stream.payload
        if self._shadow:
            value, item_row, item_group = item.row, item.index, 0
        else:
            value, item_row, item_group = item.value, item.row, item.group
        groups = cols // group
        beats_per_group = len(self.wr_acc.en) // groups
        d1_valid = Signal()
        d1_value = Signal(data.ArrayLayout(signed(32), group))
        d1_addr = Signal(acc_bits)
        d1_group = Signal(range(groups))
        d1_last = Signal()
        d1_slot = Signal()
        d1_acc = Signal()
        row_addr = (item.tag.acc_addr + item_row)[:acc_bits]
        valid = array.o_stream.valid
        m.d.comb += self.rd_acc.addr.eq(row_addr)
        self.read_old_rows(m, valid, item.tag.accumulate, item_group, beats_per_group)
        m.d.sync += [
            d1_valid.eq(valid), d1_value.eq(value), d1_addr.eq(row_addr),
            d1_group.eq(item_group),
            d1_last.eq((item_row == rows - 1) & (item_group == groups - 1)),
            d1_slot.eq(item.tag.slot), d1_acc.eq(item.tag.accumulate),
        ]

        old = data.View(data.ArrayLayout(signed(32), group),
                        reduce(or_, [self.rd_acc.data.word_select(q, 32 * group)
                                     for q in range(groups)]))
        d2_valid = Signal()
        d2_sum = Signal(data.ArrayLayout(signed(33), group))
        d2_addr = Signal(acc_bits)
        d2_group = Signal(range(groups))
        d2_last = Signal()
        d2_slot = Signal()
        m.d.sync += [d2_valid.eq(d1_valid), d2_addr.eq(d1_addr), d2_group.eq(d1_group),
                     d2_last.eq(d1_last), d2_slot.eq(d1_slot)]
        for c in range(group):
            addend = self.old_addend(old[c], d1_acc)
            m.d.sync += d2_sum[c].eq(d1_value[c] + addend)

        result = Signal(data.ArrayLayout(signed(32), group))
        lane_sat = []
        for c in range(group):
            top = d2_sum[c][31:]  # the 33-bit sum leaves INT32 iff its top two bits differ
            hi, lo = top == 0b01, top == 0b10
            lane_sat.append(hi | lo)
            m.d.comb += result[c].eq(Mux(hi, INT32_MAX, Mux(lo, INT32_MIN, d2_sum[c])))
        m.d.comb += [
            self.wr_acc.addr.eq(d2_addr),
            self.wr_acc.data.eq(result.as_value().replicate(groups)),
            self.wr_acc.en.eq(Mux(d2_valid, ((1 << beats_per_group) - 1)
                                  << (beats_per_group * d2_group), 0)),
            self.saturated.eq(d2_valid & Cat(*lane_sat).any()),
        ]

        # -- blocks in flight per slot: +1 when a block starts, -1 when its last row is written
        for s in range(2):
            inc = issue & first_t & (slot == s)
            dec = d2_valid & d2_last & (d2_slot == s)
            m.d.sync += pending[s].eq(pending[s] + inc - dec)
        return m

    # -- the parts in which the two designs differ --------------------------------------------

    def operands(self) -> Value:
        """The GEMM operands the sequencer reads while it runs."""
        raise NotImplementedError

    def addresses(self, cmd, i, t, mask_pos_bits) -> "_Addresses":
        """INP, WGT and ACC addresses of the current step and the MASK bit of the current row."""
        raise NotImplementedError

    def first_block(self, m, addr, cmd, c):
        """At ``ctrl.start`` (operands ``c``): the address state of block (0, 0)."""
        raise NotImplementedError

    def next_step(self, m, addr):
        """After each K step of a block."""
        raise NotImplementedError

    def next_block(self, m, addr, cmd, k, last_j, i, j):
        """After each block: the loop counters ``i`` and ``j`` and the address state of the
        next one (the next row's first after the row's last block, ``last_j``)."""
        raise NotImplementedError

    def read_old_rows(self, m, valid, accumulate, item_group, beats_per_group):
        """Drive ``rd_acc.en`` (and ``zero``) to read the old ACC row of the drained item."""
        raise NotImplementedError

    def old_addend(self, old, accumulate) -> Value:
        """The drain adds this to a finished accumulator (its old value, or 0)."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Addresses:
    """The sequencer's addresses (``inp``, ``wgt``, ``acc``, ``mask_pos``) and the registers
    they come from (``regs``, by name)."""
    inp: Value
    wgt: Value
    acc: Value
    mask_pos: Value
    regs: dict


class ConcurrentGemmUnit(GemmUnit):
    """The GEMM unit of full builds: it runs beside other units under the dispatcher's hazard
    tracking, so it copies its operands at ``start`` (the dispatcher may take the next
    instruction at once) and keeps running pointers, and it reads ACC only for a GEMM with
    ``accumulate`` (only those claim ACC reads)."""

    exclusive = False

    def operands(self):
        return Signal(GemmOperands, name="cmd")

    def addresses(self, cmd, i, t, mask_pos_bits):
        g = self._geoms
        inp_bits, wgt_bits = g[Buffer.INP].addr_width, g[Buffer.WGT].addr_width
        acc_bits = g[Buffer.ACC].addr_width
        inp_base = Signal(inp_bits, name="inp_base")  # INP address of the row's first step
        inp_ptr = Signal(inp_bits, name="inp_ptr")
        wgt_ptr = Signal(wgt_bits, name="wgt_ptr")
        acc_ptr = Signal(acc_bits, name="acc_ptr")
        mask_pos = Signal(mask_pos_bits, name="mask_pos")
        return _Addresses(inp_ptr, wgt_ptr, acc_ptr, mask_pos, {"inp_base": inp_base})

    def first_block(self, m, addr, cmd, c):
        inp_base = addr.regs["inp_base"]
        m.d.sync += [
            cmd.eq(c),
            inp_base.eq(c.inp_addr), addr.inp.eq(c.inp_addr),
            addr.wgt.eq(c.wgt_addr), addr.acc.eq(c.acc_addr),
            addr.mask_pos.eq(c.mask_idx),
        ]

    def next_step(self, m, addr):
        m.d.sync += [addr.inp.eq(addr.inp + 1), addr.wgt.eq(addr.wgt + 1)]

    def next_block(self, m, addr, cmd, k, last_j, i, j):
        inp_base = addr.regs["inp_base"]
        m.d.sync += addr.acc.eq(addr.acc + self._config.rows)
        with m.If(last_j):
            m.d.sync += [
                j.eq(0), i.eq(i + 1), addr.mask_pos.eq(addr.mask_pos + 1),
                inp_base.eq(inp_base + k), addr.inp.eq(inp_base + k),
                addr.wgt.eq(cmd.wgt_addr),
            ]
        with m.Else():
            m.d.sync += [j.eq(j + 1), addr.inp.eq(inp_base)]

    def read_old_rows(self, m, valid, accumulate, item_group, beats_per_group):
        # With overlap a GEMM without `accumulate` does not claim ACC reads (the dispatcher
        # may run a STORE or REQUANT on the ACC read port meanwhile): it must not touch it.
        m.d.comb += self.rd_acc.en.eq(valid & accumulate)

    def old_addend(self, old, accumulate):
        return Mux(accumulate, old, 0)


class ExclusiveGemmUnit(GemmUnit):
    """The GEMM unit of compact builds, where one instruction executes at a time.

    The dispatcher keeps ``ctrl.cmd`` valid until the unit is idle, and the unit reads its
    operands there instead of from a copy: its address registers are offsets that only reset
    or count. No other unit runs while it drains, so it reads the ACC read port for every row
    and lets the port zero what it must not add; without the shadow bank it drains one
    host-beat-aligned group at a time (ACC in per-beat lanes), so that only one group needs an
    adder and saturation.
    """

    exclusive = True

    def operands(self):
        return self.ctrl.cmd

    def addresses(self, cmd, i, t, mask_pos_bits):
        # Offsets from the instruction's base addresses, which stay on `ctrl.cmd`: the
        # registers only reset or count (no loads to multiplex), the addresses are sums.
        g = self._geoms
        inp_bits, wgt_bits = g[Buffer.INP].addr_width, g[Buffer.WGT].addr_width
        acc_bits = g[Buffer.ACC].addr_width
        i_off = Signal(inp_bits, name="i_off")  # i*k
        j_off = Signal(wgt_bits, name="j_off")  # j*k
        acc_off = Signal(acc_bits, name="acc_off")  # (i*n_blocks + j)*rows
        return _Addresses(
            inp=(cmd.inp_addr[:inp_bits] + i_off + t)[:inp_bits],
            wgt=(cmd.wgt_addr[:wgt_bits] + j_off + t)[:wgt_bits],
            acc=(cmd.acc_addr[:acc_bits] + acc_off)[:acc_bits],
            mask_pos=(cmd.mask_idx + i)[:mask_pos_bits],
            regs={"i_off": i_off, "j_off": j_off, "acc_off": acc_off})

    def first_block(self, m, addr, cmd, c):
        m.d.sync += [r.eq(0) for r in addr.regs.values()]

    def next_step(self, m, addr):
        pass  # the addresses follow `t`

    def next_block(self, m, addr, cmd, k, last_j, i, j):
        i_off, j_off, acc_off = addr.regs["i_off"], addr.regs["j_off"], addr.regs["acc_off"]
        m.d.sync += acc_off.eq(acc_off + self._config.rows)
        with m.If(last_j):
            m.d.sync += [j.eq(0), j_off.eq(0), i.eq(i + 1), i_off.eq(i_off + k)]
        with m.Else():
            m.d.sync += [j.eq(j + 1), j_off.eq(j_off + k)]

    def read_old_rows(self, m, valid, accumulate, item_group, beats_per_group):
        # No other unit runs meanwhile: read even without `accumulate` and let the read
        # port's zero supply the 0 (free beside Yosys' initial-value gate); it also zeroes
        # the other groups' beats, so the old group is the OR of all groups.
        keep = Mux(accumulate, ((1 << beats_per_group) - 1) << (beats_per_group * item_group), 0)
        m.d.comb += [
            self.rd_acc.en.eq(valid),
            self.rd_acc.zero.eq(Mux(valid, ~keep, 0)),
        ]

    def old_addend(self, old, accumulate):
        return old  # (zeroed by the read port without `accumulate`)
