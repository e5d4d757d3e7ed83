"""The accelerator top level: host streams in and out, every block wired together."""

from functools import reduce
from operator import or_

from amaranth.back import verilog
from amaranth.hdl import Module, Mux, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .config import AccelConfig, Implementation, get_config
from .counters import PerfCounters
from .crc import StreamCrc
from .decoder import DecoderParallel
from .decoder_serial import DecoderSerial
from .dilate import DilateUnit
from .dispatcher import ConcurrentDispatcher, ExclusiveDispatcher
from .gemm_unit import ConcurrentGemmUnit, ExclusiveGemmUnit
from .im2col import Im2colSerial, Im2colTiled
from .isa import COUNT_BITS, COUNTER_RECORD_BYTES, STATUS_BYTES, Buffer, Counter
from .load_unit import LoadUnit
from .patch_unit import PatchSkipUnit
from .requant import RequantUnit
from .scratchpads import Scratchpad, geometry
from .sgq_encoder import StripeEncoderPipeline
from .sgq_serial import StripeEncoderSerial
from .store_unit import BufferedStoreUnit, ExclusiveStoreUnit

__all__ = ["Accelerator", "generate_verilog", "host_signature"]


def host_signature(config: AccelConfig) -> wiring.Signature:
    """The accelerator's ports, which a board top drives: ``i_stream`` and ``o_stream`` of
    ``host_width``-bit beats, ``busy``, ``error`` and ``in_boundary``."""
    return wiring.Signature({
        "i_stream": In(stream.Signature(unsigned(config.host_width))),
        "o_stream": Out(stream.Signature(unsigned(config.host_width))),
        "busy": Out(1),
        "error": Out(1),
        "in_boundary": Out(1),
    })


class Accelerator(wiring.Component):
    """tinyaccel: an INT8 MAC-array accelerator driven by one host byte stream.

    Parameters
    ----------
    config:
        The :class:`~tinyaccel.hw.config.AccelConfig` that sizes every block and names its
        :class:`~tinyaccel.hw.config.Implementation` profile (``config.impl``), or a preset
        name. Vary the profile with ``dataclasses.replace(config, impl=...)``.

    Ports: ``i_stream`` (host -> accelerator beats, byte 0 in bits 7..0), ``o_stream``
    (responses), ``busy`` (a unit executing or a response pending), ``error`` (sticky until SYNC),
    ``in_boundary`` (the input is at an instruction boundary: no part of an instruction word taken
    and no LOAD data due, discarded data included; 1 after reset). A board's bridge may reset the
    accelerator when the host falls silent while ``in_boundary`` is 0.
    """

    def __init__(self, config: AccelConfig | str):
        self.config = config = get_config(config)
        self.impl: Implementation = config.impl
        super().__init__(host_signature(config))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        impl = self.impl

        decoder = DecoderSerial if impl.serial_decode else DecoderParallel
        m.submodules.decoder = decoder = decoder(cfg, access=impl.access_sets)
        # (one instruction at a time: each block in its exclusive design)
        exclusive = impl.exclusive
        dispatcher = ExclusiveDispatcher if exclusive else ConcurrentDispatcher
        m.submodules.dispatcher = disp = dispatcher(cfg)
        max_add = {c: 1 for c in Counter}
        max_add.update({
            Counter.MACS_ISSUED: cfg.macs,
            Counter.MACS_SKIPPED: cfg.macs * (2**COUNT_BITS - 1),
            Counter.BYTES_IN: cfg.beat_bytes,
            Counter.BYTES_OUT: cfg.beat_bytes + STATUS_BYTES + COUNTER_RECORD_BYTES,
        })
        m.submodules.counters = counters = PerfCounters(cfg.host_width, max_add=max_add,
                                                        ram=impl.ram_counters)
        m.submodules.load = load = LoadUnit(cfg)
        store_unit = ExclusiveStoreUnit if exclusive else BufferedStoreUnit
        m.submodules.store = store = store_unit(cfg)
        gemm_unit = ExclusiveGemmUnit if exclusive else ConcurrentGemmUnit
        m.submodules.gemm = gemm = gemm_unit(cfg, shadow=impl.shadow)
        m.submodules.requant = requant = RequantUnit(cfg, serial=impl.serial_requant)
        m.submodules.sgq = sgq = (StripeEncoderSerial(cfg, held_cmd=impl.sgq_held_cmd)
                                  if impl.serial_sgq else StripeEncoderPipeline(cfg))
        m.submodules.im2col = im2col = (Im2colSerial(cfg, held_cmd=impl.held_cmd)
                                        if impl.serial_im2col else Im2colTiled(cfg))
        units = {"load": load, "store": store, "gemm": gemm, "requant": requant}
        if impl.pass_unit:  # PATCH (OUT and MASK ports) and DILATE (MASK ports)
            m.submodules.patch = units["patch"] = PatchSkipUnit(cfg)
        units.update({"sgq": sgq, "im2col": im2col})
        if impl.pass_unit:
            m.submodules.dilate = units["dilate"] = DilateUnit(cfg)

        # After reset the load unit clears the scratchpads; no input is taken meanwhile.
        m.d.comb += [
            decoder.i_stream.valid.eq(self.i_stream.valid & ~load.clearing),
            decoder.i_stream.payload.eq(self.i_stream.payload),
            self.i_stream.ready.eq(decoder.i_stream.ready & ~load.clearing),
        ]
        wiring.connect(m, decoder.o_instr, disp.i_instr)
        wiring.connect(m, counters.o_record, disp.i_counters)

        # -- the link trailer's CRCs (section 9): every beat taken, every beat sent but the
        # trailer's; both restart when a SYNC's trailer is out. Each engine takes its beat a
        # cycle late, from a register, so that the response multiplexer (or the input) and
        # the CRC's XOR trees are not one path (it was the iCE40's worst); the dispatcher
        # waits a cycle before the trailer for it.
        m.submodules.rx_crc = rx_crc = StreamCrc(cfg.host_width)
        m.submodules.tx_crc = tx_crc = StreamCrc(cfg.host_width)
        for crc, port, took in (
                (rx_crc, self.i_stream, self.i_stream.valid & self.i_stream.ready),
                (tx_crc, self.o_stream,
                 self.o_stream.valid & self.o_stream.ready & ~disp.sending_trailer)):
            m.d.sync += [crc.valid.eq(took), crc.data.eq(port.payload)]
            m.d.comb += crc.start.eq(disp.link_restart)
        m.d.comb += [disp.rx_crc.eq(rx_crc.crc), disp.tx_crc.eq(tx_crc.crc)]
        wiring.connect(m, decoder.o_data, load.i_stream)
        for name, unit in units.items():
            wiring.connect(m, getattr(disp, name), unit.ctrl)

        # -- scratchpads: one read and one write port each, shared by the units -------------
        for buf in Buffer:
            name = buf.name.lower()
            readers = [getattr(u, f"rd_{name}") for u in units.values() if hasattr(u, f"rd_{name}")]
            # (the load unit last: the port's default writer, also while it clears the buffers)
            writers = [getattr(u, f"wr_{name}") for u in units.values()
                       if u is not load and hasattr(u, f"wr_{name}")]
            writers.append(getattr(load, f"wr_{name}"))
            pad = Scratchpad(geometry(cfg, buf), readers=len(readers), writers=len(writers),
                             lanes=impl.scratchpad_lanes)
            m.submodules[f"{name}_mem"] = pad
            for i, client in enumerate(readers):
                wiring.connect(m, client, pad.rd[i])
            for i, client in enumerate(writers):
                wiring.connect(m, client, pad.wr[i])

        # -- response stream: exactly one source is active at a time (in-order issue) -------
        sources = [store.o_stream, sgq.o_stream, disp.o_stream]
        m.d.comb += [
            self.o_stream.valid.eq(reduce(or_, [s.valid for s in sources])),
            self.o_stream.payload.eq(reduce(or_, [Mux(s.valid, s.payload, 0) for s in sources])),
        ]
        for s in sources:
            m.d.comb += s.ready.eq(self.o_stream.ready)

        # -- status and counters ------------------------------------------------------------
        busy = (disp.busy | load.clearing |
                reduce(or_, [u.ctrl.busy.any() for u in units.values()]))
        freeze = disp.freeze_counters
        beat_bytes = cfg.beat_bytes
        bytes_in = Mux(self.i_stream.valid & self.i_stream.ready, beat_bytes, 0)
        sent = self.o_stream.valid & self.o_stream.ready & ~disp.sending_record
        bytes_out = Mux(sent, beat_bytes, 0) + disp.record_bytes
        add = counters.add
        m.d.comb += [
            self.busy.eq(busy),
            self.error.eq(disp.error),
            self.in_boundary.eq(decoder.in_boundary),
            counters.clear.eq(disp.clear_counters),
            counters.dump.eq(freeze),
            add[Counter.CYCLES.value].eq(~freeze),
            add[Counter.BUSY_CYCLES.value].eq(busy & ~freeze),
            add[Counter.BYTES_IN.value].eq(bytes_in),
            add[Counter.BYTES_OUT.value].eq(bytes_out),
            add[Counter.INSTRUCTIONS.value].eq(disp.count_instruction),
            add[Counter.MACS_ISSUED.value].eq(Mux(gemm.computing, cfg.macs, 0)),
            add[Counter.MACS_SKIPPED.value].eq(gemm.skipped_macs),
            add[Counter.COMPUTE_CYCLES.value].eq(gemm.computing),
            disp.acc_saturated.eq(gemm.saturated),
        ]
        return m


def generate_verilog(config: AccelConfig | str) -> str:
    """Verilog of :class:`Accelerator` for ``config``, top module ``tinyaccel_top``."""
    top = Accelerator(config)
    return verilog.convert(top, name="tinyaccel_top")
