"""The golden model: the executable form of ``docs/architecture.md``.

:class:`GoldenMachine` holds the scratchpads as NumPy arrays and executes instructions strictly in
order with the functions of :mod:`tinyaccel.sim.numerics`. :meth:`GoldenMachine.run` is
hardware-faithful: it consumes a host byte stream and returns exactly the bytes the accelerator
must send back, following the error rules of section 5. The RTL is verified against it with zero
tolerance; timing counters (``CYCLES``, ``BUSY_CYCLES``, ``COMPUTE_CYCLES``) stay 0 here::

    m = GoldenMachine("sim")
    m.load_buffer(Buffer.INP, 0, a_words)          # int8 (m_blocks*k, rows), section 4 layout
    m.load_buffer(Buffer.WGT, 0, b_words)          # int8 (n_blocks*k, cols)
    m.execute(Instruction(Opcode.GEMM, k=64, m_blocks=1, n_blocks=1))
    replies = m.run(program.to_bytes())            # or a whole host stream
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import (
    AddressError,
    FieldError,
    OpcodeError,
    ProtocolError,
    ShapeError,
    TinyAccelError,
)
from ..hw.config import MASK_WORD_BITS, AccelConfig, get_config
from ..hw.decode_rules import (
    PASS_OPCODES,
    RULES,
    DefinedBuffer,
    Disjoint,
    GateInRange,
    Multiple,
    NeedsPassUnit,
    NonZero,
    PixelFits,
    Rule,
    StridedInRange,
    TensorInRange,
    TiledFits,
    extent_name,
    extent_value,
    gate_span,
    limit_name,
    limit_value,
    pixel_fits,
    strided_span,
    tensor_span,
    tiled_fits,
)
from ..hw.isa import INSTR_BYTES, Buffer, Counter, Instruction, Opcode, Status
from ..protocol import (
    PARAM_DTYPE,
    RawInstruction,
    StatusReport,
    as_word,
    data_length,
    decode_fields,
    iter_stream,
    lane_dtype,
    lanes,
    link_crc,
    pack_link_trailer,
    pack_words,
    response_length,
    sgq_frame,
    unpack_words,
)
from .numerics import (
    INT32_MAX,
    INT32_MIN,
    GemmWorkspace,
    dilate_mask,
    exact_gemm,
    patch_skip,
    requantize,
    sgq_encode,
    window_gather,
)

__all__ = ["GoldenMachine", "Fault", "check_instruction", "STATUS_EXCEPTIONS"]

#: The exception strict execution raises for each error status.
STATUS_EXCEPTIONS: dict[Status, type[TinyAccelError]] = {
    Status.ILLEGAL_OPCODE: OpcodeError,
    Status.BAD_BUFFER: FieldError,
    Status.ADDR_RANGE: AddressError,
    Status.BAD_SHAPE: ShapeError,
    Status.BAD_FIELD: FieldError,
}


@dataclass(frozen=True)
class Fault:
    """Why an instruction is illegal: the status it sets, its opcode code, a message and the
    operand of the rule it breaks (``"opcode"`` for an undefined opcode)."""

    status: Status
    opcode: int
    message: str
    field: str | None = None

    def exception(self, pc: int | None = None) -> TinyAccelError:
        """The matching exception (see :data:`STATUS_EXCEPTIONS`)."""
        where = "" if pc is None else f" (instruction {pc})"
        return STATUS_EXCEPTIONS[self.status](f"{self.message}{where}")


def check_instruction(config: AccelConfig, instr) -> Fault | None:
    """The error an instruction raises at decode (section 5), or ``None`` when it is legal.

    The rules are those of :data:`tinyaccel.hw.decode_rules.RULES`, the table the RTL decoders
    are built from, evaluated on integers. When several are broken the first is reported:
    ``ILLEGAL_OPCODE``, then the opcode's rules in the table's order (``BAD_BUFFER``; GEMM/PATCH
    ``k = 0``, PATCH overlap, SGQ ``stripe_len = 0``, SGQ ``count % stripe_len``), ``ADDR_RANGE``
    last. :attr:`Fault.field` names the operand of the broken rule.
    """
    config = get_config(config)
    code, f = decode_fields(as_word(instr))
    try:
        op = Opcode(code)
    except ValueError:
        return Fault(Status.ILLEGAL_OPCODE, code, f"opcode={code} is not defined", "opcode")
    if op in PASS_OPCODES and not config.impl.pass_unit:
        return Fault(Status.ILLEGAL_OPCODE, code, f"{op.name} needs the PASS unit, which "
                     f"config {config.name!r} ({config.impl.name}) does not have", "opcode")
    for rule in RULES[op]:
        broken = _broken(config, op, rule, f)
        if broken is not None:
            field, message = broken
            return Fault(rule.status, code, message, field)
    return None


def _broken(config: AccelConfig, op: Opcode, rule: Rule, f: dict) -> tuple[str, str] | None:
    """``(operand, message)`` when the operand values ``f`` break ``rule``, else ``None``."""
    name = op.name
    if isinstance(rule, DefinedBuffer):
        if f[rule.field] not in {buf.value for buf in Buffer}:
            return rule.field, f"{name}: {rule.field}={f[rule.field]} is not a Buffer"
    elif isinstance(rule, NonZero):
        if f[rule.field] == 0:
            return rule.field, f"{name}: {rule.field}=0; {rule.need.format(op=name)}"
    elif isinstance(rule, Multiple):
        if f[rule.field] % f[rule.of]:
            return rule.field, (f"{name}: {rule.field}={f[rule.field]} is not a multiple of "
                                f"{rule.of}={f[rule.of]}")
    elif isinstance(rule, Disjoint):
        if rule.overlap(config, f):
            n = extent_value(config, rule.extent, f)
            m = extent_value(config, rule.extent_b or rule.extent, f)
            a, b = f[rule.a], f[rule.b]
            label = {side: side.removesuffix("_addr") for side in (rule.a, rule.b)}
            return rule.a, (f"{name}: {label[rule.a]} range {a}..{a + n - 1} overlaps "
                            f"{label[rule.b]} range {b}..{b + m - 1}")
    elif isinstance(rule, NeedsPassUnit):
        if f[rule.field] and not config.impl.pass_unit:
            return rule.field, (f"{name}: {rule.field}=1 needs the PASS unit, which config "
                                f"{config.name!r} ({config.impl.name}) does not have")
    elif isinstance(rule, TiledFits):
        if not tiled_fits(config, f):
            if not f["tiled"]:
                return "gate", f"{name}: gate=1 needs tiled=1 (the gate bits are per patch)"
            ph, pw = config.patch_shape
            return "tiled", (f"{name}: tiled=1 needs whole {ph}x{pw} patches: in_h={f['in_h']}"
                             f" and oy0={f['oy0']} multiples of {ph}, in_w={f['in_w']} and "
                             f"out_w={f['out_w']} multiples of {pw}")
    elif isinstance(rule, GateInRange):
        first, n = gate_span(config, op, f)
        if f["gate"] and first + n > config.mask_bits:
            return "mask_word" if op == Opcode.IM2COL else "mask_idx", (
                f"{name}: gated MASK bits {first}..{first + n - 1} exceed mask_bits "
                f"{config.mask_bits}")
    elif isinstance(rule, PixelFits):
        if not pixel_fits(config.cols, f):
            room = (f"cols >> pack = {config.cols >> f['pack']}" if f["pack"] else
                    f"pitch*cols = {f['pitch'] * config.cols}")
            return "channels", (f"{name}: channels={f['channels']} do not fit a pixel of "
                                f"{room} lanes")
    elif isinstance(rule, StridedInRange):
        base, span = f[rule.base], strided_span(f[rule.count], f[rule.gap])
        limit = config.depth(rule.limit)
        if base + span > limit:
            return rule.base, (f"{name}: {rule.base} {base} + span {span} of {rule.count} "
                               f"{f[rule.count]} rows {rule.gap} {f[rule.gap]} apart = "
                               f"{base + span} exceeds {rule.limit.name} depth {limit}")
    elif isinstance(rule, TensorInRange):
        base, span = f[rule.base], tensor_span(f)
        limit = config.depth(rule.limit)
        if base + span > limit:
            return rule.base, (f"{name}: input tensor {rule.base} {base} + {span} words "
                               f"({f['in_h']}x{f['in_w']} pixels, pitch {f['pitch']}, pack "
                               f"{f['pack']}) = {base + span} exceeds {rule.limit.name} depth "
                               f"{limit}")
    elif rule.applies(f):  # InRange
        base, ext = f[rule.base], extent_value(config, rule.extent, f)
        limit = limit_value(config, rule.limit, f)
        if base + ext > limit:
            return rule.base, (f"{name}: {rule.base} {base} + {extent_name(rule.extent)} {ext} = "
                               f"{base + ext} exceeds {limit_name(rule.limit, f)} {limit}")
    return None


class GoldenMachine:
    """The accelerator's architectural state and its in-order execution.

    Buffers (zero at reset): ``inp`` int8 (depth, rows), ``wgt`` int8 (depth, cols), ``acc``
    int32 (depth, cols), ``out`` int8 (depth, cols), ``param`` PARAM_DTYPE (depth, cols),
    ``mask`` bool (mask_bits,). ``counters`` maps each :class:`Counter` to its value.
    """

    def __init__(self, config: AccelConfig | str = "sim"):
        self.config = get_config(config)
        self._workspace = GemmWorkspace()
        self.reset()

    def reset(self) -> None:
        """Zero every buffer, counter and the status, as after power-up."""
        cfg = self.config
        self.buffers: dict[Buffer, np.ndarray] = {}
        for buf in Buffer:
            if buf == Buffer.MASK:
                self.buffers[buf] = np.zeros(cfg.mask_bits, bool)
            else:
                self.buffers[buf] = np.zeros((cfg.depth(buf), lanes(cfg, buf)),
                                             lane_dtype(cfg, buf))
        self.counters: dict[Counter, int] = {c: 0 for c in Counter}
        self._received: list[bytes] = []  # since the previous SYNC's word (rx_crc)
        self._sent: list[bytes] = []  # since the previous SYNC's trailer (tx_crc)
        self._clear_status()

    def _clear_status(self) -> None:
        self.status = Status.OK
        self.error_pc = 0
        self.error_opcode = 0
        self.pc = 0  # index of the next instruction in the window since the last SYNC
        self.acc_saturated = False

    # -- buffer views
    inp = property(lambda self: self.buffers[Buffer.INP])
    wgt = property(lambda self: self.buffers[Buffer.WGT])
    acc = property(lambda self: self.buffers[Buffer.ACC])
    out = property(lambda self: self.buffers[Buffer.OUT])
    param = property(lambda self: self.buffers[Buffer.PARAM])
    mask = property(lambda self: self.buffers[Buffer.MASK])

    def _words(self, buf: Buffer) -> np.ndarray:
        """The buffer as an array of words (MASK as bool (depth, 64))."""
        arr = self.buffers[buf]
        return arr.reshape(-1, MASK_WORD_BITS) if buf == Buffer.MASK else arr

    def _check_range(self, buf: Buffer, addr: int, count: int) -> None:
        depth = self.config.depth(buf)
        if addr < 0 or count < 0 or addr + count > depth:
            raise AddressError(f"{buf.name}: addr {addr} + count {count} = {addr + count} "
                               f"exceeds {buf.name} depth {depth}")

    def load_buffer(self, buf: Buffer, addr: int, array) -> None:
        """Backdoor write of words (the :func:`~tinyaccel.protocol.pack_words` forms)."""
        buf = Buffer(buf)
        words = unpack_words(self.config, buf, pack_words(self.config, buf, array))
        self._check_range(buf, addr, len(words))
        self._words(buf)[addr:addr + len(words)] = words

    def read_buffer(self, buf: Buffer, addr: int, count: int) -> np.ndarray:
        """Backdoor read of ``count`` words (a copy; MASK as bool (count, 64))."""
        buf = Buffer(buf)
        self._check_range(buf, addr, count)
        return self._words(buf)[addr:addr + count].copy()

    def status_report(self, counters: bool = False) -> StatusReport:
        """The records a SYNC would send now (without clearing anything; no link trailer)."""
        return StatusReport(status=self.status, error_pc=self.error_pc,
                            error_opcode=self.error_opcode, instructions=self.pc,
                            acc_saturated=self.acc_saturated,
                            counters=dict(self.counters) if counters else None,
                            config_id=self.config.config_id)

    # -- execution
    def run(self, stream: bytes, strict: bool = False) -> bytes:
        """Consume a host byte stream; return every byte the accelerator sends back.

        With ``strict`` the first illegal instruction raises (see :meth:`execute`) instead of
        setting the status.

        Raises
        ------
        ProtocolError
            When the stream ends inside an instruction word or LOAD data (naming how many bytes
            are missing); the responses sent before are in its ``responses`` attribute.
        """
        out: list[bytes] = []
        try:
            for word, payload in iter_stream(self.config, stream):
                out.append(self.execute(word, payload, strict=strict))
        except ProtocolError as exc:
            exc.responses = b"".join(out)
            raise
        return b"".join(out)

    def execute(self, instr: Instruction | RawInstruction | int, data: bytes | None = None,
                strict: bool = True) -> bytes:
        """Execute one instruction (with its LOAD data); return its response bytes.

        With ``strict`` an illegal instruction raises before changing anything; otherwise it
        sets the status as the hardware does (section 5).

        Raises
        ------
        OpcodeError, FieldError, AddressError, ShapeError
            In strict mode, for ILLEGAL_OPCODE, BAD_BUFFER / BAD_FIELD, ADDR_RANGE, BAD_SHAPE;
            the message names the opcode, the field and the value.
        ProtocolError
            When ``data`` is not exactly the LOAD data the instruction announces.
        """
        word = as_word(instr)
        code, fields = decode_fields(word)
        payload = b"" if data is None else bytes(data)
        want = data_length(self.config, word)
        if len(payload) != want:
            raise ProtocolError(f"instruction {self.pc} ({RawInstruction(word)!r}) carries "
                                f"{want} data bytes, got {len(payload)}")
        fault = check_instruction(self.config, word) if self.status == Status.OK else None
        if fault is not None and strict:
            raise fault.exception(self.pc)
        pc = self.pc
        self.pc += 1
        self.counters[Counter.INSTRUCTIONS] += 1
        self.counters[Counter.BYTES_IN] += INSTR_BYTES + len(payload)
        self._received += [word.to_bytes(INSTR_BYTES, "little"), payload]
        if fault is not None:
            self.status, self.error_pc, self.error_opcode = fault.status, pc, code
        if code == Opcode.SYNC.value:
            return self._sync(fields)
        if self.status == Status.OK:
            response = getattr(self, f"_exec_{Opcode(code).name.lower()}")(fields, payload)
        elif code == Opcode.SGQ.value:
            response = sgq_frame(self.config, b"")
        else:  # not executed: a STORE still sends its words, as zeros
            response = bytes(response_length(self.config, word) or 0)
        self.counters[Counter.BYTES_OUT] += len(response)
        self._sent.append(response)
        return response

    def _sync(self, f: dict) -> bytes:
        """The records, then the link trailer over the bytes received since the previous SYNC's
        word (this one's included) and sent since the previous trailer (these records
        included); BYTES_OUT counts both after the counter record's snapshot."""
        records = self.status_report(counters=bool(f["counters"])).records()
        self._sent.append(records)
        response = records + pack_link_trailer(link_crc(b"".join(self._received)),
                                               link_crc(b"".join(self._sent)))
        self._received, self._sent = [], []
        self.counters[Counter.BYTES_OUT] += len(response)
        if f["clear"]:
            self.counters = {c: 0 for c in Counter}
        if not f["keep"]:
            self._clear_status()
        return response

    def _exec_nop(self, f: dict, payload: bytes) -> bytes:
        return b""

    def _exec_load(self, f: dict, payload: bytes) -> bytes:
        buf = Buffer(f["buf"])
        self._words(buf)[f["addr"]:f["addr"] + f["count"]] = unpack_words(self.config, buf,
                                                                          payload)
        return b""

    def _exec_store(self, f: dict, payload: bytes) -> bytes:
        buf = Buffer(f["buf"])
        return pack_words(self.config, buf, self._words(buf)[f["addr"]:f["addr"] + f["count"]])

    def _exec_gemm(self, f: dict, payload: bytes) -> bytes:
        rows, cols = self.config.rows, self.config.cols
        k, mb, nb = f["k"], f["m_blocks"], f["n_blocks"]
        if mb == 0 or nb == 0:
            return b""
        if f["gate"]:
            active = np.flatnonzero(self.mask[f["mask_idx"]:f["mask_idx"] + mb])
        else:
            active = np.arange(mb)
        block_macs = rows * cols * k
        self.counters[Counter.MACS_ISSUED] += len(active) * nb * block_macs
        self.counters[Counter.MACS_SKIPPED] += (mb - len(active)) * nb * block_macs
        if not len(active):
            return b""
        # Gather: A[i*rows + r, t] = INP[inp_addr + i*k + t][r]; B[t, j*cols + c] =
        # WGT[wgt_addr + j*k + t][c]. One BLAS call for every active block.
        inp = self.inp[f["inp_addr"]:f["inp_addr"] + mb * k].reshape(mb, k, rows)
        if len(active) < mb:
            inp = inp[active]
        a = inp.transpose(0, 2, 1).reshape(len(active) * rows, k)
        wgt = self.wgt[f["wgt_addr"]:f["wgt_addr"] + nb * k].reshape(nb, k, cols)
        b = wgt.transpose(1, 0, 2).reshape(k, nb * cols)
        c = exact_gemm(a, b, self._workspace)
        c = c.reshape(len(active), rows, nb, cols).transpose(0, 2, 1, 3)
        # Scatter: ACC[acc_addr + (i*n_blocks + j)*rows + r][c] = C[i*rows + r, j*cols + c].
        acc = self.acc[f["acc_addr"]:f["acc_addr"] + mb * nb * rows].reshape(mb, nb, rows, cols)
        whole = len(active) == mb
        if f["accumulate"]:
            total = (acc if whole else acc[active]).astype(np.int64)
            total += c
            if total.min() < INT32_MIN or total.max() > INT32_MAX:  # sat32, sticky flag
                self.acc_saturated = True
                np.clip(total, INT32_MIN, INT32_MAX, out=total)
            c = total
        if whole:
            acc[...] = c
        else:
            acc[active] = c
        return b""

    def _gate_bits(self, op: Opcode, f: dict) -> np.ndarray | None:
        """The MASK bits a gated instruction reads (``None`` without ``gate``)."""
        if not f["gate"]:
            return None
        first, n = gate_span(self.config, op, f)
        return self.mask[first:first + n]

    def _exec_requant(self, f: dict, payload: bytes) -> bytes:
        n, step = f["count"], f["out_gap"] + 1
        p = self.param[f["param_addr"]]
        acc = self.acc[f["acc_addr"]:f["acc_addr"] + n]
        values = requantize(acc, **{name: p[name] for name in PARAM_DTYPE.names})
        out = self.out[f["out_addr"]:f["out_addr"] + strided_span(n, f["out_gap"]):step]
        bits = self._gate_bits(Opcode.REQUANT, f)
        if bits is None:
            out[...] = values
        else:  # a row of a skipped block keeps its OUT word
            keep = np.repeat(bits, self.config.rows)[:n]
            out[keep] = values[keep]
        return b""

    def _exec_im2col(self, f: dict, payload: bytes) -> bytes:
        words = window_gather(self.out, self.config.rows, patch_shape=self._patch_shape(f),
                              **f)
        bits = self._gate_bits(Opcode.IM2COL, f)
        dst = self.inp[f["dst"]:f["dst"] + len(words)]
        if bits is None:
            dst[...] = words
        else:  # the INP words of a skipped block keep their values
            k = len(words) // max(f["m_blocks"], 1)
            keep = np.repeat(bits, k)
            dst[keep] = words[keep]
        return b""

    def _patch_shape(self, f: dict) -> tuple[int, int] | None:
        return self.config.patch_shape if f["tiled"] else None

    def _exec_patch(self, f: dict, payload: bytes) -> bytes:
        cols, k, blocks = self.config.cols, f["k"], f["blocks"]
        if blocks == 0:
            return b""
        n = blocks * k
        new = self.out[f["new_addr"]:f["new_addr"] + n].reshape(blocks, k, cols)
        ref = self.out[f["ref_addr"]:f["ref_addr"] + n].reshape(blocks, k, cols)
        bits = self.mask[f["mask_idx"]:f["mask_idx"] + blocks]
        if f["given"]:
            changed = bits.copy()
        else:
            changed, _ = patch_skip(new, ref, f["threshold"])
            bits[...] = changed | (bool(f["merge"]) & bits)
        ref[changed] = new[changed]
        return b""

    def _exec_dilate(self, f: dict, payload: bytes) -> bytes:
        n_in, n_out = f["in_h"] * f["in_w"], f["out_h"] * f["out_w"]
        src = self.mask[f["src"]:f["src"] + n_in].reshape(f["in_h"], f["in_w"])
        bits = dilate_mask(src, **{name: f[name] for name in (
            "out_h", "out_w", "kh", "kw", "stride_y", "stride_x", "pad_top", "pad_left")})
        dst = self.mask[f["dst"]:f["dst"] + n_out]
        dst[...] = bits.ravel() | (bool(f["merge"]) & dst)
        return b""

    def _exec_sgq(self, f: dict, payload: bytes) -> bytes:
        values = self.out[f["out_addr"]:f["out_addr"] + f["count"]]
        return sgq_frame(self.config, sgq_encode(values, f["stripe_len"], f["max_shift"]))
