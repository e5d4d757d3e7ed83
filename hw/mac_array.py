"""The MAC array: an output-stationary outer product of INT8 operands into INT32 accumulators."""

from amaranth.hdl import Cat, Module, ResetSignal, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..errors import ConfigError

__all__ = ["OperandLayout", "RowLayout", "GroupLayout", "MacArray"]


def OperandLayout(rows: int, cols: int, tag_shape) -> data.StructLayout:
    """One K-step: an INP word (a column of A) and a WGT word (a row of B)."""
    return data.StructLayout({
        "inp": data.ArrayLayout(signed(8), rows),
        "wgt": data.ArrayLayout(signed(8), cols),
        "first": 1,  # t = 0: start a new block (load instead of accumulate)
        "last": 1,  # t = k-1: the block is complete after this step
        "tag": tag_shape,  # carried to the block's rows (the GEMM unit puts its ACC address here)
    })


def RowLayout(rows: int, cols: int, tag_shape) -> data.StructLayout:
    """One finished row of a block."""
    return data.StructLayout({
        "row": data.ArrayLayout(signed(32), cols),
        "index": range(rows),
        "tag": tag_shape,
    })


def GroupLayout(rows: int, cols: int, group: int, tag_shape) -> data.StructLayout:
    """``group`` adjacent accumulators of one row of a finished block (without the shadow bank)."""
    return data.StructLayout({
        "value": data.ArrayLayout(signed(32), group),
        "row": range(rows),
        "group": range(cols // group),  # columns group*g .. group*g + g - 1
        "tag": tag_shape,
    })


class MacArray(wiring.Component):
    """``rows x cols`` multiply-accumulators, one outer product per cycle.

    Every cycle with ``i_stream.valid`` does ``acc[r][c] (+)= inp[r] * wgt[c]`` (``first`` loads
    instead of adding). Pipeline: operand registers, product registers (so each multiplier with
    its registers maps to one DSP: SB_MAC16 / MULT18X18D), accumulators. When a block's ``last``
    step has been accumulated, the accumulators are copied into a shadow bank in one cycle, so the
    next block computes at once, and the shadow bank sends the block's rows on ``o_stream``, one
    per cycle, row 0 first.

    Neither stream can stall (``always_ready``): the producer must space the ``last`` steps of
    consecutive blocks by at least ``rows`` cycles (blocks with ``k >= rows`` always are).
    Sums are exact: ``k <= 65535`` INT8 products never leave INT32.

    Without ``shadow`` (compact builds) the block is sent straight from the accumulators, as
    ``rows * cols / group`` :func:`GroupLayout` items of ``group`` adjacent accumulators, one per
    cycle starting the cycle after the ``last`` step was accumulated, row by row. Each item's
    accumulators are cleared as it is sent, so that a block starts from zero accumulators and
    ``first`` is not needed: each multiplier, its registers and its accumulator then fit in one
    iCE40 SB_MAC16 (the clear is the DSP's OLOAD of zero, the hold its OHOLD). The producer must
    start the next block (its ``first`` step) at least ``rows * cols / group + 1`` cycles after
    the previous ``last`` step.

    :attr:`spacing` is the producer's distance, in cycles, between a ``last`` step and the step
    that must wait for it (the next ``last`` with the shadow bank, the next ``first`` without).
    """

    def __init__(self, rows: int, cols: int, tag_shape=0, *, shadow: bool = True,
                 group: int = 1):
        if cols % group:
            raise ConfigError(f"group={group} must divide cols={cols}")
        self.rows, self.cols, self.group = rows, cols, group
        self.shadow = shadow
        self.spacing = rows if shadow else rows * cols // group + 1
        out = (RowLayout(rows, cols, tag_shape) if shadow
               else GroupLayout(rows, cols, group, tag_shape))
        super().__init__({
            "i_stream": In(stream.Signature(OperandLayout(rows, cols, tag_shape),
                                            always_ready=True)),
            "o_stream": Out(stream.Signature(out, always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        rows, cols = self.rows, self.cols
        i = self.i_stream.payload
        tag_shape = i.tag.shape()

        # stage 1: operand registers. The data registers have no reset (only the valid bits
        # matter), so that synthesis can take them into the DSPs.
        a = [Signal(signed(8), name=f"a{r}", reset_less=True) for r in range(rows)]
        b = [Signal(signed(8), name=f"b{c}", reset_less=True) for c in range(cols)]
        v1, first1, last1 = Signal(), Signal(), Signal()
        tag1 = Signal(tag_shape)
        m.d.sync += [v1.eq(self.i_stream.valid), first1.eq(i.first), last1.eq(i.last),
                     tag1.eq(i.tag)]
        m.d.sync += [a[r].eq(i.inp[r]) for r in range(rows)]
        m.d.sync += [b[c].eq(i.wgt[c]) for c in range(cols)]

        # stage 2: product registers
        p = [[Signal(signed(16), name=f"p{r}_{c}", reset_less=True) for c in range(cols)]
             for r in range(rows)]
        v2, first2, last2 = Signal(), Signal(), Signal()
        tag2 = Signal(tag_shape)
        m.d.sync += [v2.eq(v1), first2.eq(first1), last2.eq(last1), tag2.eq(tag1)]
        m.d.sync += [p[r][c].eq(a[r] * b[c]) for r in range(rows) for c in range(cols)]

        # stage 3: accumulators
        acc = [[Signal(signed(32), name=f"acc{r}_{c}", reset_less=not self.shadow)
                for c in range(cols)] for r in range(rows)]
        if self.shadow:
            done = Signal()  # the accumulators hold a finished block
            tag3 = Signal(tag_shape)
            m.d.sync += done.eq(v2 & last2)
            with m.If(v2):
                m.d.sync += tag3.eq(tag2)
            left = Signal(range(rows + 1))  # rows still to send
            index = Signal(range(rows))
            stag = Signal(tag_shape)
            with m.If(v2):
                for r in range(rows):
                    for c in range(cols):
                        with m.If(first2):
                            m.d.sync += acc[r][c].eq(p[r][c])
                        with m.Else():
                            m.d.sync += acc[r][c].eq(acc[r][c] + p[r][c])
            # shadow bank: loaded from the accumulators, shifted out one row per cycle
            shadow = [Signal(data.ArrayLayout(signed(32), cols), name=f"shadow{r}")
                      for r in range(rows)]
            with m.If(done):
                m.d.sync += [left.eq(rows), index.eq(0), stag.eq(tag3)]
                for r in range(rows):
                    m.d.sync += [shadow[r][c].eq(acc[r][c]) for c in range(cols)]
            with m.Elif(left != 0):
                m.d.sync += [left.eq(left - 1), index.eq(index + 1)]
                for r in range(rows - 1):
                    m.d.sync += shadow[r].eq(shadow[r + 1])
            m.d.comb += [
                self.o_stream.valid.eq(left != 0),
                self.o_stream.payload.row.eq(shadow[0]),
                self.o_stream.payload.index.eq(index),
                self.o_stream.payload.tag.eq(stag),
            ]
            return m

        # Items straight from the accumulators, which the producer leaves alone meanwhile; an
        # item's accumulators are zeroed in the cycle it is sent (and all on reset, since they
        # have no reset of their own). Written as "if enabled: clear or add" so that Yosys'
        # ice40_dsp packs the add, the register and the clear into the SB_MAC16.
        g = self.group
        groups = cols // g
        sending = Signal()
        row = Signal(range(rows))
        grp = Signal(range(groups))
        stag = Signal(tag_shape)
        last_item = (row == rows - 1) & (grp == groups - 1)
        for r in range(rows):
            for c in range(cols):
                clear = (sending & (row == r) & (grp == c // g)) | ResetSignal()
                with m.If(v2 | clear):
                    with m.If(clear):
                        m.d.sync += acc[r][c].eq(0)
                    with m.Else():
                        m.d.sync += acc[r][c].eq(acc[r][c] + p[r][c])
        with m.If(v2 & last2):
            m.d.sync += [sending.eq(1), row.eq(0), grp.eq(0), stag.eq(tag2)]
        with m.Elif(sending):
            m.d.sync += grp.eq(grp + 1)
            with m.If(grp == groups - 1):
                m.d.sync += [grp.eq(0), row.eq(row + 1)]
            with m.If(last_item):
                m.d.sync += sending.eq(0)
        item = self.o_stream.payload
        with m.Switch(Cat(grp, row)):
            for r in range(rows):
                for q in range(groups):
                    with m.Case(q | r << len(grp)):
                        m.d.comb += [item.value[i].eq(acc[r][q * g + i]) for i in range(g)]
        m.d.comb += [
            self.o_stream.valid.eq(sending),
            item.row.eq(row),
            item.group.eq(grp),
            item.tag.eq(stag),
        ]
        return m
