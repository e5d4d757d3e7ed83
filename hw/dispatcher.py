"""Dispatcher: in-order issue to the units, error state, SYNC records; two designs.

Instructions arrive checked from the :class:`~.decoder.Decoder`. The
:class:`ConcurrentDispatcher` (full builds, ``overlap``) issues each one to its unit when

- the unit can take it (GEMM holds two instructions: one computing, one draining),
- no instruction in flight conflicts with it (:mod:`.hazards`; the conflict is computed into a
  register, so an instruction waits at least one cycle after it arrives), and
- for STORE and SGQ, no earlier response is still being sent: responses leave in order.

The :class:`ExclusiveDispatcher` (compact builds, no ``overlap``) lets an instruction wait until
every unit is idle instead, keeps no access sets, and takes a GEMM, REQUANT, IM2COL, SGQ (or a
PASS instruction) from the decoder only when its unit is done: its operands (``cmd``) stay valid
meanwhile, so the units that rely on it keep no copy. IM2COL is issued as REQUANT is (in the
concurrent design its access set, OUT read and INP write, holds off a GEMM that reads the INP
words it writes). Both have the same ports (the decoded instruction carries an access set only
for the concurrent one, :attr:`Dispatcher.access_sets`); :class:`Dispatcher` holds what they
share.

The PASS units (PATCH, DILATE: ``Implementation.pass_unit``) are issued as REQUANT is, under the
hazard names ``"patch"`` and ``"dilate"`` of :data:`.hazards.UNIT_ACCESSES`; without the PASS
unit they have no ports here, and their opcodes (``ILLEGAL_OPCODE`` from the decoder) are taken
as undefined opcodes are.

Errors (section 5): the first instruction whose status is not OK sets the sticky error with its
index and opcode; from then on nothing executes until SYNC, but a LOAD still has its data consumed
(``discard``) and a STORE or SGQ still sends its documented zero bytes.

SYNC waits until every unit is idle, sends the status record and, when asked, the counter record
(the counters hold still while it is sent; BYTES_OUT grows by the records' size after them, so a
record never counts itself), then, a cycle later (the top's CRC engines take each beat a cycle
late), the link trailer (``rx_crc``, ``tx_crc`` from them, which ``link_restart`` restarts at its
end; BYTES_OUT counts its beats as they leave), then clears as section 5 says (with ``keep``:
only the counters, if ``clear``). The SYNC instruction is taken from the decoder only at the end,
so no byte after it is read before its response is out, and ``rx_crc`` holds still while the
trailer is sent.
"""

from functools import reduce
from operator import or_
from types import SimpleNamespace

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig
from .control import UnitControl
from .decoder import DecodedLayout
from .hazards import UNIT_ACCESSES, AccessLayout, conflict
from .isa import (
    COUNTER_RECORD_BYTES,
    CRC,
    INSTR_BITS,
    LINK_TRAILER_BYTES,
    STATUS_BYTES,
    STATUS_MAGIC,
    DilateOperands,
    GemmOperands,
    Im2colOperands,
    Opcode,
    PatchOperands,
    RequantOperands,
    Status,
    StatusRecord,
)
from .load_unit import LoadCommand
from .sgq_encoder import SgqCommand
from .store_unit import StoreCommand

__all__ = ["Dispatcher", "ConcurrentDispatcher", "ExclusiveDispatcher"]


class Dispatcher(wiring.Component):
    """In-order issue, error state and SYNC records (see the module docstring).

    The issue rules (when a unit may start, and what is recorded about it) differ between the
    two designs: a subclass supplies them, and :attr:`access_sets` says whether it needs the
    decoder's access sets.
    """

    #: The decoder supplies each instruction's access set (``DecodedLayout(access=)``).
    access_sets: bool

    def __init__(self, config: AccelConfig):
        self._config = config
        self._pass_unit = config.impl.pass_unit
        # the PASS units' ports only with the PASS unit (without it, the decoder reports PATCH
        # and DILATE as ILLEGAL_OPCODE and they are taken as undefined opcodes are)
        pass_ports = {
            "patch": Out(UnitControl(PatchOperands)),
            "dilate": Out(UnitControl(DilateOperands)),
        } if self._pass_unit else {}
        super().__init__({
            "i_instr": In(stream.Signature(DecodedLayout(config, access=self.access_sets))),
            "o_stream": Out(stream.Signature(unsigned(config.host_width))),
            "load": Out(UnitControl(LoadCommand)),
            "store": Out(UnitControl(StoreCommand)),
            "gemm": Out(UnitControl(GemmOperands, slots=2)),
            "requant": Out(UnitControl(RequantOperands)),
            **pass_ports,
            "sgq": Out(UnitControl(SgqCommand)),
            "im2col": Out(UnitControl(Im2colOperands)),
            "i_counters": In(stream.Signature(unsigned(config.host_width))),  # counter record
            "acc_saturated": In(1),  # pulse from the GEMM drain
            "count_instruction": Out(1),
            "sending_record": Out(1),  # a SYNC record is being sent (not in BYTES_OUT yet)
            "freeze_counters": Out(1),  # the counter record is being sent (.counters `dump`)
            "record_bytes": Out(range(STATUS_BYTES + COUNTER_RECORD_BYTES + 1)),  # add to BYTES_OUT
            "clear_counters": Out(1),
            "rx_crc": In(CRC.crc_width),  # the link trailer's CRCs (section 9)
            "tx_crc": In(CRC.crc_width),
            "sending_trailer": Out(1),  # the link trailer is being sent (not in tx_crc)
            "link_restart": Out(1),  # the trailer is out: restart both CRCs
            "error": Out(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        hw = cfg.host_width

        instr = self.i_instr.payload
        op = instr.word.opcode
        ops = instr.word.operands

        # -- architectural state reported by SYNC ------------------------------------------
        err = Signal()
        err_status = Signal(Status)
        err_pc = Signal(32)
        err_opcode = Signal(8)
        acc_saturated = Signal()
        window = Signal(32)  # instructions since the last SYNC
        m.d.comb += self.error.eq(err)
        with m.If(self.acc_saturated):
            m.d.sync += acc_saturated.eq(1)

        # -- the units and the issue rules' state (`issue`, for the subclass's methods) ----
        units = {"gemm": (self.gemm, 2), "requant": (self.requant, 1), "store": (self.store, 1)}
        if self._pass_unit:
            units["patch"] = (self.patch, 1)
        units.update({"sgq": (self.sgq, 1), "im2col": (self.im2col, 1)})
        if self._pass_unit:
            units["dilate"] = (self.dilate, 1)
        # (PASS: the one-slot units that take an instruction as REQUANT does)
        issued_like_requant = [("requant", Opcode.REQUANT), ("im2col", Opcode.IM2COL)]
        if self._pass_unit:
            issued_like_requant += [("patch", Opcode.PATCH), ("dilate", Opcode.DILATE)]
        issue = SimpleNamespace(m=m, instr=instr, op=op, units=units)
        issue.hazard = hazard = self.hazard(issue)
        fresh = Signal()  # `hazard` was computed for the instruction now offered
        m.d.sync += fresh.eq(self.i_instr.valid & ~self.i_instr.ready)

        # -- issue --------------------------------------------------------------------------
        issue.execute = execute = (instr.status == Status.OK) & ~err
        issue.clear_to_go = clear_to_go = fresh & ~hazard
        output_free, all_idle, load_free = self.availability(issue)
        accept = Signal()
        accepted = Signal()  # (the exclusive design's) accept, a cycle later: see below on why
        m.d.sync += accepted.eq(accept)
        issue.accept, issue.accepted = accept, accepted

        m.d.comb += [
            self.load.cmd.buf.eq(ops.ldst.buf),
            self.load.cmd.addr.eq(ops.ldst.addr),
            self.load.cmd.count.eq(ops.ldst.count),
            self.load.cmd.discard.eq(~execute),
            self.store.cmd.buf.eq(ops.ldst.buf),
            self.store.cmd.addr.eq(ops.ldst.addr),
            self.store.cmd.count.eq(ops.ldst.count),
            self.store.cmd.zero.eq(~execute),
            self.gemm.cmd.eq(ops.gemm),
            self.requant.cmd.eq(ops.requant),
            self.sgq.cmd.operands.eq(ops.sgq),
            self.sgq.cmd.zero.eq(~execute),
            self.im2col.cmd.eq(ops.im2col),
        ]

        # status and counter records
        status_rec = Signal(StatusRecord)
        m.d.comb += [
            status_rec.magic.eq(STATUS_MAGIC),
            status_rec.status.eq(err_status),
            status_rec.acc_saturated.eq(acc_saturated),
            status_rec.error_pc.eq(err_pc),
            status_rec.instructions.eq(window),
            status_rec.error_opcode.eq(err_opcode),
            status_rec.config_id.eq(cfg.config_id),
        ]
        trailer = Cat(self.rx_crc, self.tx_crc)  # (the LinkTrailer layout)
        assert len(trailer) == LINK_TRAILER_BYTES * 8
        status_beats = INSTR_BITS // hw
        counter_beats = COUNTER_RECORD_BYTES * 8 // hw
        trailer_beats = LINK_TRAILER_BYTES * 8 // hw
        rec_beat = Signal(range(max(status_beats, counter_beats, trailer_beats)))
        sent = self.o_stream.valid & self.o_stream.ready

        # The exclusive design's launch state (:meth:`ExclusiveDispatcher.launch`). It is made for
        # both designs, in this order, so that the Verilog of each is the one it had before the
        # two were split (Amaranth numbers cells in order); the concurrent design never sets it,
        # and synthesis removes it there.
        if self._pass_unit:
            m.d.comb += [self.patch.cmd.eq(ops.patch), self.dilate.cmd.eq(ops.dilate)]
        started = Signal()  # the offered instruction's unit has been started
        start_q = {name: Signal(name=f"{name}_start_q") for name in units if name != "store"}
        started1, settled = [Signal() for _ in range(2)]  # (unnamed in the Verilog)
        m.d.sync += [started1.eq(started), settled.eq(started1 & started)]
        issue.started, issue.start_q, issue.settled = started, start_q, settled
        self.prepare_launch(issue)

        with m.FSM():
            with m.State("ISSUE"):
                with m.If(self.i_instr.valid):
                    with m.Switch(op):
                        with m.Case(Opcode.LOAD):
                            with m.If(load_free & (~execute | clear_to_go)):
                                m.d.comb += [accept.eq(1), self.load.start.eq(instr.buf_ok)]
                        with m.Case(Opcode.STORE):
                            with m.If(output_free & (~execute | clear_to_go)):
                                m.d.comb += [accept.eq(1), self.store.start.eq(instr.buf_ok)]
                                self.claim(issue, "store", execute)
                        with m.Case(Opcode.GEMM):
                            with m.If(~execute):
                                m.d.comb += accept.eq(1)
                            with m.Else():
                                self.launch(issue, "gemm",
                                            clear_to_go & self.unit_free(issue, "gemm"), 1)
                        for name, code in issued_like_requant:
                            with m.Case(code):
                                with m.If(~execute):
                                    m.d.comb += accept.eq(1)
                                with m.Else():
                                    self.launch(issue, name,
                                                clear_to_go & self.unit_free(issue, name), 1)
                        with m.Case(Opcode.SGQ):
                            self.launch(issue, "sgq", output_free & (~execute | clear_to_go),
                                        execute)
                        with m.Case(Opcode.SYNC):
                            m.next = "SYNC_WAIT"
                        with m.Default():  # NOP and undefined opcodes
                            m.d.comb += accept.eq(1)
                faulty = (instr.status != Status.OK) & ~err
                err_fields = [err_status.eq(instr.status), err_pc.eq(window),
                              err_opcode.eq(instr.word.as_value()[:4])]
                self.count_issue(issue, faulty, err, err_fields, window)
                with m.If(accept):
                    m.d.comb += [self.i_instr.ready.eq(1), self.count_instruction.eq(1)]
            with m.State("SYNC_WAIT"):
                with m.If(all_idle):
                    m.d.comb += self.count_instruction.eq(1)
                    m.d.sync += [window.eq(window + 1), rec_beat.eq(0)]
                    m.next = "SYNC_STATUS"
            with m.State("SYNC_STATUS"):
                m.d.comb += [
                    self.sending_record.eq(1),
                    self.o_stream.valid.eq(1),
                    self.o_stream.payload.eq(status_rec.as_value().word_select(rec_beat, hw)),
                ]
                with m.If(sent):
                    m.d.sync += rec_beat.eq(rec_beat + 1)
                    with m.If(rec_beat == status_beats - 1):
                        m.d.sync += rec_beat.eq(0)
                        with m.If(ops.sync.counters):
                            m.next = "SYNC_COUNTERS"
                        with m.Else():
                            m.next = "SYNC_CRC"
            with m.State("SYNC_COUNTERS"):
                m.d.comb += [
                    self.sending_record.eq(1),
                    self.freeze_counters.eq(1),
                    self.o_stream.valid.eq(self.i_counters.valid),
                    self.o_stream.payload.eq(self.i_counters.payload),
                    self.i_counters.ready.eq(self.o_stream.ready),
                ]
                with m.If(sent):
                    m.d.sync += rec_beat.eq(rec_beat + 1)
                    with m.If(rec_beat == counter_beats - 1):
                        m.d.sync += rec_beat.eq(0)
                        m.next = "SYNC_CRC"
            with m.State("SYNC_CRC"):  # the top's CRC engines take each beat a cycle late
                m.next = "SYNC_TRAILER"
            with m.State("SYNC_TRAILER"):  # (tx_crc has taken the records' last beat)
                m.d.comb += [
                    self.sending_trailer.eq(1),
                    self.o_stream.valid.eq(1),
                    self.o_stream.payload.eq(trailer.word_select(rec_beat, hw)),
                ]
                with m.If(sent):
                    m.d.sync += rec_beat.eq(rec_beat + 1)
                    with m.If(rec_beat == trailer_beats - 1):
                        m.d.sync += rec_beat.eq(0)
                        m.next = "SYNC_END"
            with m.State("SYNC_END"):
                m.d.comb += [
                    self.i_instr.ready.eq(1),
                    self.clear_counters.eq(ops.sync.clear),
                    self.record_bytes.eq(STATUS_BYTES + Mux(ops.sync.counters,
                                                            COUNTER_RECORD_BYTES, 0)),
                    self.link_restart.eq(1),
                ]
                with m.If(~ops.sync.keep):
                    m.d.sync += [
                        err.eq(0), err_status.eq(Status.OK), err_pc.eq(0), err_opcode.eq(0),
                        acc_saturated.eq(0), window.eq(0),
                    ]
                m.next = "ISSUE"

        m.d.comb += self.busy.eq(self.i_instr.valid)
        return m

    # -- the issue rules, in which the two designs differ -------------------------------------

    def hazard(self, issue) -> Signal:
        """A register: the offered instruction must wait (computed a cycle after it arrives)."""
        raise NotImplementedError

    def availability(self, issue) -> tuple[Value, Value, Value]:
        """``(output_free, all_idle, load_free)``: no response is being sent (STORE and SGQ may
        issue), every unit is idle (SYNC may proceed), the load unit is idle."""
        raise NotImplementedError

    def prepare_launch(self, issue):
        """Connections that :meth:`launch` needs, made once."""

    def unit_free(self, issue, name: str) -> Value:
        """Unit ``name`` (not LOAD or STORE) can take an instruction."""
        raise NotImplementedError

    def launch(self, issue, name: str, ready: Value, claim_execute):
        """Start unit ``name`` with the offered instruction when ``ready``, and take it."""
        raise NotImplementedError

    def claim(self, issue, name: str, execute, slot: int = 0):
        """Record the access set of the instruction taken by unit ``name`` (with its enables
        gated by ``execute``) in the unit's hazard slot."""

    def count_issue(self, issue, faulty: Value, err: Signal, err_fields: list, window: Signal):
        """The error state and instruction window, for an instruction taken in ISSUE."""
        raise NotImplementedError


class ConcurrentDispatcher(Dispatcher):
    """Units run concurrently; each taken instruction holds an access set in its unit's hazard
    slot until the unit is done, and a new one waits only for conflicting slots (full builds)."""

    access_sets = True

    def hazard(self, issue):
        m, instr, op, units = issue.m, issue.instr, issue.op, issue.units
        slots = {}  # (unit name, slot index) -> access register
        for name, (_port, n) in units.items():
            for s in range(n):
                slots[name, s] = Signal(AccessLayout(self._config), name=f"{name}{s}_access")
        issue.slots = slots

        hazard_terms = []
        for (name, s), held in slots.items():
            busy = units[name][0].busy[s]
            accesses = UNIT_ACCESSES[name]
            if name == "gemm":
                c = Mux(op == Opcode.GEMM,
                        conflict(instr.access, held, accesses, structural=False),
                        conflict(instr.access, held, accesses))
            else:
                c = conflict(instr.access, held, accesses)
            hazard_terms.append(busy & c)
        hazard = Signal(name="hazard")
        m.d.sync += hazard.eq(reduce(or_, hazard_terms))
        return hazard

    def availability(self, issue):
        units = issue.units
        output_free = ~self.store.busy[0] & ~self.sgq.busy[0]
        all_idle = ~reduce(or_, [p.busy.any() for p, _ in units.values()]) & ~self.load.busy[0]
        load_free = ~self.load.busy[0]
        return output_free, all_idle, load_free

    def unit_free(self, issue, name):
        if name == "gemm":
            return self.gemm.ready  # (it holds two instructions: one computing, one draining)
        return ~issue.units[name][0].busy[0]

    def launch(self, issue, name, ready, claim_execute):
        """The instruction is taken at once and its access set recorded."""
        m = issue.m
        port = issue.units[name][0]
        with m.If(ready):
            m.d.comb += [issue.accept.eq(1), port.start.eq(1)]
            if name == "gemm":
                with m.If(self.gemm.slot == 0):
                    self.claim(issue, "gemm", claim_execute, 0)
                with m.Else():
                    self.claim(issue, "gemm", claim_execute, 1)
            else:
                self.claim(issue, name, claim_execute)

    def claim(self, issue, name, execute, slot=0):
        instr = issue.instr
        held = issue.slots[name, slot]
        stmts = []
        for buf, kind in UNIT_ACCESSES[name]:
            src = instr.access[buf.name.lower()][kind]
            dst = held[buf.name.lower()][kind]
            stmts += [dst.en.eq(src.en & execute), dst.lo.eq(src.lo), dst.hi.eq(src.hi)]
        issue.m.d.sync += stmts

    def count_issue(self, issue, faulty, err, err_fields, window):
        m = issue.m
        with m.If(issue.accept):
            m.d.sync += window.eq(window + 1)
            with m.If(faulty):
                m.d.sync += [err.eq(1)] + err_fields


class ExclusiveDispatcher(Dispatcher):
    """One instruction at a time: an instruction waits until every unit is idle, and a GEMM,
    REQUANT, IM2COL, SGQ, PATCH or DILATE is taken only when its unit is done, so that its
    operands stay on offer (``cmd``) while it executes (compact builds).

    Every decision comes from registers (``hazard`` covers every unit), none from a unit's busy
    logic directly: the iCE40 cannot afford busy -> issue -> decoder in one cycle.
    """

    access_sets = False

    def hazard(self, issue):
        # wait until every unit (the load unit too) is idle
        hazard = Signal(name="hazard")
        issue.m.d.sync += hazard.eq(reduce(or_, [p.busy.any() for p, _ in issue.units.values()]) |
                                    self.load.busy[0])
        return hazard

    def availability(self, issue):
        # Each instruction arrives several cycles after its predecessor was taken (fetch and
        # checks), so `hazard` has seen any unit that predecessor started.
        free = ~issue.hazard
        return free, free, free

    def prepare_launch(self, issue):
        # A unit's start is a flop (`start_q`), set with `started`: the decision (opcode,
        # status, hazard) and the unit's reaction to its start are a cycle apart. Its busy
        # shows a cycle after the start, in `hazard` a cycle later: `settled` waits for that.
        m = issue.m
        for name, q in issue.start_q.items():
            m.d.sync += q.eq(0)
            m.d.comb += issue.units[name][0].start.eq(q)

    def unit_free(self, issue, name):
        return Const(1)  # (`hazard` covers every unit)

    def launch(self, issue, name, ready, claim_execute):
        """The instruction is taken only when every unit is idle again, so that it (the unit's
        ``cmd``) stays on offer while it executes and the unit needs no copy of its operands."""
        m = issue.m
        with m.If(issue.started):
            # (`settled`: `hazard` has seen the unit's busy since the start)
            with m.If(issue.settled & ~issue.hazard):
                m.d.comb += issue.accept.eq(1)
                m.d.sync += issue.started.eq(0)
        with m.Elif(ready):
            m.d.sync += [issue.started.eq(1), issue.start_q[name].eq(1)]

    def count_issue(self, issue, faulty, err, err_fields, window):
        m = issue.m
        # The wide registers load from registers only: the error fields while a faulty
        # instruction (not SYNC: it leaves ISSUE untaken) is offered, as they are when it is
        # taken; `window` a cycle after the accept (the next instruction comes several cycles
        # later)
        with m.If(self.i_instr.valid & faulty & (issue.op != Opcode.SYNC)):
            m.d.sync += err_fields
        with m.If(issue.accept & faulty):
            m.d.sync += err.eq(1)
        with m.If(issue.accepted):
            m.d.sync += window.eq(window + 1)
