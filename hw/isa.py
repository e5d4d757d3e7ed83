"""The instruction set and every record that crosses the host link, defined once.

Each layout here is an ``amaranth.lib.data`` layout and each code an ``amaranth.lib.enum`` enum.
The hardware decodes instruction words with these layouts, the golden model and the driver pack
and unpack them with the same layouts (through the field tables below), and ``tinyaccel spec``
prints its tables from them. A field changes here, or nowhere.

Instruction word (128 bits, little-endian on the wire)::

    [3:0]    opcode       Opcode
    [127:4]  operands     per-opcode struct (below), zero-padded

Semantics of each opcode are in ``docs/architecture.md`` and executable in
``tinyaccel.sim.golden``.
"""


from dataclasses import dataclass
from typing import Any

from amaranth.hdl import signed, unsigned
from amaranth.lib import crc, data, enum

from ..errors import FieldError, OpcodeError

__all__ = [
    "INSTR_BITS", "INSTR_BYTES", "ADDR_BITS", "PITCH_BITS", "MASK_IDX_BITS", "CHANNEL_PARAMS_BITS",
    "Opcode", "Buffer", "Status", "Counter",
    "LoadStoreOperands", "GemmOperands", "RequantOperands", "PatchOperands", "SgqOperands",
    "SyncOperands", "Im2colOperands", "DilateOperands", "TILE_ADDR_BITS", "MASK_WORD_BITS",
    "ChannelParams", "StatusRecord", "SgqStripeHeader", "SgqMode",
    "InstructionLayout", "OPERANDS", "Instruction", "field_table", "operand_fields",
    "STATUS_MAGIC", "STATUS_BYTES", "COUNTER_BITS", "COUNTER_RECORD_BYTES", "SGQ_MODE_BITS",
    "CRC", "CRC_BYTES", "LinkTrailer", "LINK_TRAILER_BYTES", "isa_description",
]

INSTR_BITS = 128
INSTR_BYTES = INSTR_BITS // 8
ADDR_BITS = 16
COUNT_BITS = 16
BLOCKS_BITS = 8
MASK_IDX_BITS = 12
PITCH_BITS = 6
#: IM2COL's ``src``/``dst``: every preset's OUT and INP depth is below ``2**14`` words.
TILE_ADDR_BITS = 14
MASK_WORD_BITS = 64  #: MASK bits per word
OPCODE_BITS = 4


class Opcode(enum.Enum, shape=OPCODE_BITS):
    """Operation codes. Codes not listed are illegal (status ``ILLEGAL_OPCODE``)."""
    NOP = 0  #: do nothing
    LOAD = 1  #: host stream -> scratchpad, ``count`` words follow the instruction
    STORE = 2  #: scratchpad -> host stream, ``count`` words
    GEMM = 3  #: INT8 x INT8 -> INT32 blocks into ACC (optionally accumulate, optionally gated)
    REQUANT = 4  #: ACC INT32 rows -> OUT INT8 rows, per-channel fixed-point requantization
    PATCH = 5  #: PASS patch-skip: compare tiles with their reference, set mask bits, update ref
    SGQ = 6  #: SGQ stripe encoder: OUT rows -> packed wire format on the host stream
    SYNC = 7  #: wait for all units idle, send the status record (and counters) and the link
    #: trailer, clear errors (unless ``keep``)
    IM2COL = 8  #: window address generator: an OUT activation tensor -> GEMM input words in INP
    DILATE = 9  #: PASS mask dilation: OR of a window of MASK bits (a change mask -> block mask)


class Buffer(enum.Enum, shape=3):
    """Scratchpads. Word widths follow from the configuration (``AccelConfig.word_bits``)."""
    INP = 0  #: INT8 activations, one word = ``rows`` values (one GEMM K-step of an M block)
    WGT = 1  #: INT8 weights, one word = ``cols`` values (one GEMM K-step of an N block)
    ACC = 2  #: INT32 accumulators, one word = ``cols`` values (one output row of a block)
    OUT = 3  #: INT8 outputs, one word = ``cols`` values
    PARAM = 4  #: per-channel requant parameters, one word = ``cols`` x ChannelParams
    MASK = 5  #: PASS skip-mask bits, 64 per word


class Status(enum.Enum, shape=8):
    """Status codes reported in the status record. The first error in a program is kept."""
    OK = 0
    ILLEGAL_OPCODE = 1  #: opcode not defined
    BAD_BUFFER = 2  #: buffer code not defined, or not allowed for this opcode
    ADDR_RANGE = 3  #: an access falls outside a scratchpad
    BAD_SHAPE = 4  #: zero or impossible extent (k=0, blocks=0, count=0 where not allowed)
    BAD_FIELD = 5  #: an operand value outside its legal set (e.g. SGQ stripe_len=0)


class Counter(enum.Enum, shape=3):
    """Performance counters, 64 bits each, in this order in the counter record."""
    CYCLES = 0  #: clock cycles since reset (or since the last SYNC with ``clear``)
    BUSY_CYCLES = 1  #: cycles in which any unit was executing
    MACS_ISSUED = 2  #: multiply-accumulates performed by the array
    MACS_SKIPPED = 3  #: multiply-accumulates of GEMM blocks skipped by the PASS gate
    BYTES_IN = 4  #: bytes received on the host stream (instructions and data)
    BYTES_OUT = 5  #: bytes sent on the host stream (data, encodings, records, link trailers)
    INSTRUCTIONS = 6  #: instructions decoded
    COMPUTE_CYCLES = 7  #: cycles in which the MAC array was computing


COUNTER_BITS = 64


# -- operand structs --------------------------------------------------------------------------

class LoadStoreOperands(data.Struct):
    """LOAD and STORE: move ``count`` whole words between the host stream and ``buf``."""
    buf: Buffer
    addr: unsigned(ADDR_BITS)
    count: unsigned(COUNT_BITS)


class GemmOperands(data.Struct):
    """GEMM over ``m_blocks`` x ``n_blocks`` array blocks of depth ``k``.

    Block (i, j) reads INP words ``inp_addr + i*k + t`` and WGT words ``wgt_addr + j*k + t`` for
    ``t < k`` and writes ACC words ``acc_addr + (i*n_blocks + j)*rows + r`` for ``r < rows``.
    With ``gate`` set, block (i, j) is skipped when MASK bit ``mask_idx + i`` is 0.
    """
    inp_addr: unsigned(ADDR_BITS)
    wgt_addr: unsigned(ADDR_BITS)
    acc_addr: unsigned(ADDR_BITS)
    k: unsigned(COUNT_BITS)
    m_blocks: unsigned(BLOCKS_BITS)
    n_blocks: unsigned(BLOCKS_BITS)
    accumulate: unsigned(1)
    gate: unsigned(1)
    mask_idx: unsigned(MASK_IDX_BITS)


class RequantOperands(data.Struct):
    """REQUANT ``count`` ACC rows into OUT rows with the channel parameters in PARAM word.

    ACC row ``r`` goes to OUT word ``out_addr + r*(out_gap + 1)``: with ``out_gap`` the rows land
    one pixel apart in a channels-last activation tensor of ``out_gap + 1`` words per pixel.
    With ``gate`` set, row ``r`` is skipped (its OUT word keeps its value) when MASK bit
    ``mask_idx + r // rows`` is 0: the rows of a GEMM block skipped by the same bit.
    """
    acc_addr: unsigned(ADDR_BITS)
    out_addr: unsigned(ADDR_BITS)
    param_addr: unsigned(ADDR_BITS)
    count: unsigned(COUNT_BITS)
    out_gap: unsigned(PITCH_BITS)
    gate: unsigned(1)
    mask_idx: unsigned(MASK_IDX_BITS)


class PatchOperands(data.Struct):
    """PATCH (PASS change detection, section 7): ``blocks`` tiles of ``k`` OUT words, the new
    ones at ``new_addr`` and their references at ``ref_addr``.

    Tile ``b`` is *changed* when some lane of some word differs from its reference by more than
    ``threshold``; MASK bit ``mask_idx + b`` becomes ``changed or (merge and the bit)``, and a
    changed tile is copied over its reference. With ``given`` nothing is compared: the tile is
    changed when its MASK bit is already set (a mask the host wrote), and the bits stay.
    """
    new_addr: unsigned(ADDR_BITS)
    ref_addr: unsigned(ADDR_BITS)
    k: unsigned(COUNT_BITS)
    blocks: unsigned(BLOCKS_BITS)
    threshold: unsigned(8)
    mask_idx: unsigned(MASK_IDX_BITS)
    merge: unsigned(1)
    given: unsigned(1)


class SgqOperands(data.Struct):
    """SGQ: encode ``count`` OUT words (one channel group) in stripes of ``stripe_len`` words."""
    out_addr: unsigned(ADDR_BITS)
    count: unsigned(COUNT_BITS)
    stripe_len: unsigned(8)
    max_shift: unsigned(3)


class Im2colOperands(data.Struct):
    """IM2COL: the GEMM input words of ``m_blocks`` blocks of a convolution window, read from an
    activation tensor in OUT (section 5; the host never builds im2col).

    The tensor is ``in_h x in_w`` pixels of ``channels`` INT8 values, channels last: pixel ``q``
    channel ``c`` is lane ``(q mod 2**pack)*(cols >> pack) + c mod cols`` of OUT word
    ``src + (q >> pack)*pitch + c // cols`` (``pack > 0``: ``2**pack`` small pixels share a word).
    Block ``i`` row ``r`` is output pixel ``p = oy0*out_w + i*rows + r``, ``(oy, ox) =
    divmod(p, out_w)``; tap ``t = (ky*kw + kx)*channels + c`` reads input pixel ``(oy*stride -
    pad_top + ky*dilation, ox*stride - pad_left + kx*dilation)``, or ``pad_value`` (the input
    zero point, two's complement) outside the tensor. It lands in lane ``r`` of INP word
    ``dst + i*K + t``, ``K = kh*kw*channels``: the GEMM layout of section 4.

    With ``pool`` the window is max-pooled instead: lane ``r`` of INP word ``dst + i*channels +
    c`` is the largest of the ``kh*kw`` taps of channel ``c`` (``K = channels``; padding taps read
    ``pad_value``, and -128 never wins), the input of a GEMM with unit weights.

    With ``tiled`` both pixel indices (the input's ``q`` and the output's ``p``) are *tiled*: the
    tensors are stored patch by patch (``AccelConfig.patch_shape``, one patch = one block of
    ``rows`` pixels, section 7). With ``gate`` (needs ``tiled``) block ``i`` is skipped (its INP
    words keep their values) when MASK bit ``mask_word*64 + oy0*out_w/rows + i`` is 0: the bit
    of its patch in a block mask that starts at a MASK word.
    """
    src: unsigned(TILE_ADDR_BITS)
    dst: unsigned(TILE_ADDR_BITS)
    pitch: unsigned(PITCH_BITS)
    channels: unsigned(9)
    in_h: unsigned(8)
    in_w: unsigned(8)
    kh: unsigned(5)
    kw: unsigned(5)
    stride: unsigned(3)
    dilation: unsigned(3)
    pad_top: unsigned(3)
    pad_left: unsigned(3)
    pad_value: unsigned(8)
    oy0: unsigned(8)
    out_w: unsigned(8)
    m_blocks: unsigned(BLOCKS_BITS)
    pack: unsigned(2)
    pool: unsigned(1)
    tiled: unsigned(1)
    gate: unsigned(1)
    mask_word: unsigned(MASK_IDX_BITS - 6)


class DilateOperands(data.Struct):
    """DILATE (PASS, section 7): a mask of ``out_h x out_w`` bits at ``dst``, each the OR of a
    ``kh x kw`` window of the ``in_h x in_w`` mask at ``src`` (bits row-major).

    Bit ``(y, x)`` is the OR of input bits ``(y*stride_y - pad_top + ky, x*stride_x - pad_left +
    kx)`` for ``ky < kh``, ``kx < kw``; bits outside the input count as 0. With ``merge`` the
    result is ORed into what ``dst`` holds. It turns the change mask of a layer's input patches
    into the mask of the output blocks whose receptive field changed.
    """
    src: unsigned(MASK_IDX_BITS)
    dst: unsigned(MASK_IDX_BITS)
    in_h: unsigned(8)
    in_w: unsigned(8)
    out_h: unsigned(8)
    out_w: unsigned(8)
    kh: unsigned(3)
    kw: unsigned(3)
    stride_y: unsigned(2)
    stride_x: unsigned(2)
    pad_top: unsigned(2)
    pad_left: unsigned(2)
    merge: unsigned(1)


class SyncOperands(data.Struct):
    """SYNC: ``counters`` appends the counter record; ``clear`` zeroes the counters after;
    ``keep`` clears nothing of the error state (status, error_pc, error_opcode, acc_saturated,
    the instruction window): the driver's flow-control probe, which changes no program's
    meaning."""
    counters: unsigned(1)
    clear: unsigned(1)
    keep: unsigned(1)


OPERANDS: dict[Opcode, data.StructLayout | None] = {
    Opcode.NOP: None,
    Opcode.LOAD: data.Layout.cast(LoadStoreOperands),
    Opcode.STORE: data.Layout.cast(LoadStoreOperands),
    Opcode.GEMM: data.Layout.cast(GemmOperands),
    Opcode.REQUANT: data.Layout.cast(RequantOperands),
    Opcode.PATCH: data.Layout.cast(PatchOperands),
    Opcode.SGQ: data.Layout.cast(SgqOperands),
    Opcode.SYNC: data.Layout.cast(SyncOperands),
    Opcode.IM2COL: data.Layout.cast(Im2colOperands),
    Opcode.DILATE: data.Layout.cast(DilateOperands),
}

OperandsLayout = data.UnionLayout({
    "ldst": LoadStoreOperands,
    "gemm": GemmOperands,
    "requant": RequantOperands,
    "patch": PatchOperands,
    "sgq": SgqOperands,
    "sync": SyncOperands,
    "im2col": Im2colOperands,
    "dilate": DilateOperands,
})

#: The 128-bit instruction word.
InstructionLayout = data.StructLayout({
    "opcode": Opcode,
    "operands": OperandsLayout,
    "reserved": unsigned(INSTR_BITS - OPCODE_BITS - OperandsLayout.size),
})
assert InstructionLayout.size == INSTR_BITS


# -- data records ------------------------------------------------------------------------------

class ChannelParams(data.Struct):
    """Requantization parameters of one output channel (96 bits; ``cols`` of them per PARAM word).

    ``y = clamp(RDBPOT(SRDHM(sat(sat(acc + bias) << max(shift,0)), multiplier), max(-shift,0))
    + zero_point, clamp_min, clamp_max)``; ``shift`` is clamped to [-31, 31].
    """
    bias: signed(32)
    multiplier: signed(32)
    shift: signed(8)
    zero_point: signed(8)
    clamp_min: signed(8)
    clamp_max: signed(8)


CHANNEL_PARAMS_BITS = data.Layout.cast(ChannelParams).size

STATUS_MAGIC = 0x5A


class StatusRecord(data.Struct):
    """Sent by SYNC (128 bits). ``error_pc`` is the index of the first faulting instruction;
    ``config_id`` identifies the configuration and the ISA the gateware was built for
    (``AccelConfig.config_id``)."""
    magic: unsigned(8)
    status: Status
    acc_saturated: unsigned(1)
    reserved0: unsigned(15)
    error_pc: unsigned(32)
    instructions: unsigned(32)
    error_opcode: unsigned(8)
    config_id: unsigned(24)


STATUS_BYTES = data.Layout.cast(StatusRecord).size // 8
COUNTER_RECORD_BYTES = len(Counter) * COUNTER_BITS // 8

#: The checksum of the host link (section 9: the trailer of every SYNC) and of every SGQ
#: response (section 8): CRC-32/ISO-HDLC, as zlib and Ethernet. It is reflected, so the CRC
#: over little-endian host beats of any width equals the CRC over the bytes in stream order.
CRC = crc.catalog.CRC32_ISO_HDLC
CRC_BYTES = CRC.crc_width // 8  #: bytes of a CRC, little-endian on the wire


class LinkTrailer(data.Struct):
    """Ends every SYNC response, after the status record and the counter record (section 9).

    ``rx_crc``: :data:`CRC` of every byte received after the previous SYNC instruction word
    (or reset) through this SYNC's word, LOAD data included (discarded data too). ``tx_crc``:
    of every byte sent after the previous SYNC's trailer (or reset) through this SYNC's records.
    """
    rx_crc: unsigned(CRC.crc_width)
    tx_crc: unsigned(CRC.crc_width)


LINK_TRAILER_BYTES = data.Layout.cast(LinkTrailer).size // 8


class SgqMode(enum.Enum, shape=3):
    """Per-stripe code width in the SGQ wire format. Codes 5..7 are reserved: never sent, and a
    decoder that reads one rejects the stream."""
    BASE = 0  #: every value equals the group base (e.g. zero after ReLU): no payload
    BITS1 = 1  #: 1-bit codes
    BITS2 = 2  #: 2-bit codes
    BITS4 = 3  #: 4-bit codes
    BITS8 = 4  #: 8-bit codes (fit any stripe at shift 0: lossless)


SGQ_MODE_BITS = {SgqMode.BITS1: 1, SgqMode.BITS2: 2, SgqMode.BITS4: 4, SgqMode.BITS8: 8}


class SgqStripeHeader(data.Struct):
    """Header of a coded stripe (modes other than BASE): 8-bit offset from base, 3-bit shift."""
    offset: unsigned(8)
    shift: unsigned(3)


# -- Python view of instructions ---------------------------------------------------------------

@dataclass(frozen=True)
class FieldInfo:
    name: str
    offset: int  # bit offset within the instruction word
    width: int
    shape: Any  # int width, or an Enum class

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1


def field_table(layout: data.Layout, base: int = 0, prefix: str = "") -> list[FieldInfo]:
    """Flatten a layout into (name, offset, width, shape) rows, in bit order."""
    rows = []
    for name, field in data.Layout.cast(layout):
        shape = field.shape
        if isinstance(shape, data.StructLayout) or (
                isinstance(shape, type) and issubclass(shape, data.Struct)):
            rows += field_table(shape, base + field.offset, f"{prefix}{name}.")
        else:
            rows.append(FieldInfo(prefix + name, base + field.offset, field.width, shape))
    return rows


_OPERAND_FIELDS: dict[Opcode, list[FieldInfo]] = {
    op: (field_table(layout, base=InstructionLayout["operands"].offset)
        if layout is not None else [])
    for op, layout in OPERANDS.items()
}


class Instruction:
    """One instruction: an opcode and its named operand fields.

    Construction validates every field against its width and encoding and raises
    :class:`~tinyaccel.errors.FieldError` naming the field and the value::

        Instruction(Opcode.GEMM, inp_addr=0, wgt_addr=0, acc_addr=0, k=64, m_blocks=1, n_blocks=1)

    Omitted fields are zero. ``encode()`` gives the 128-bit word; ``Instruction.decode(word)``
    the reverse (raising :class:`~tinyaccel.errors.OpcodeError` for an undefined opcode).
    """

    __slots__ = ("opcode", "fields")

    def __init__(self, opcode: Opcode, **fields: int):
        try:
            opcode = Opcode(opcode)
        except ValueError:
            raise OpcodeError(f"opcode={opcode!r} is not defined") from None
        table = {f.name: f for f in _OPERAND_FIELDS[opcode]}
        unknown = set(fields) - set(table)
        if unknown:
            raise FieldError(f"{opcode.name} has no field(s) {', '.join(sorted(unknown))}; "
                             f"fields: {', '.join(table) or '(none)'}")
        values = {}
        for name, info in table.items():
            value = fields.get(name, 0)
            if isinstance(info.shape, type) and issubclass(info.shape, enum.Enum):
                try:
                    value = info.shape(value)
                except ValueError:
                    raise FieldError(f"{opcode.name}.{name}={value!r} is not a "
                                     f"{info.shape.__name__}") from None
            else:
                if isinstance(value, bool):
                    value = int(value)
                if not isinstance(value, int):
                    raise FieldError(f"{opcode.name}.{name}={value!r} must be an int")
                if not 0 <= value <= info.mask:
                    raise FieldError(f"{opcode.name}.{name}={value} does not fit in "
                                     f"{info.width} unsigned bits (0..{info.mask})")
            values[name] = value
        object.__setattr__(self, "opcode", opcode)
        object.__setattr__(self, "fields", values)

    def __getattr__(self, name):
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"{self.opcode.name} instruction has no field {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Instruction is immutable")

    def __eq__(self, other):
        return (isinstance(other, Instruction) and self.opcode == other.opcode
                and self.fields == other.fields)

    def __hash__(self):
        return hash((self.opcode, tuple(sorted(self.fields.items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v.name if isinstance(v, enum.Enum) else v}"
                         for k, v in self.fields.items())
        return f"{self.opcode.name}({args})"

    def encode(self) -> int:
        """The 128-bit instruction word as an int."""
        word = self.opcode.value
        for info in _OPERAND_FIELDS[self.opcode]:
            value = self.fields[info.name]
            word |= (value.value if isinstance(value, enum.Enum) else value) << info.offset
        return word

    def to_bytes(self) -> bytes:
        return self.encode().to_bytes(INSTR_BYTES, "little")

    @classmethod
    def decode(cls, word: "int | bytes") -> "Instruction":
        """Decode a 128-bit word. Reserved bits are ignored, as the hardware ignores them."""
        if isinstance(word, (bytes, bytearray, memoryview)):
            if len(word) != INSTR_BYTES:
                raise FieldError(f"instruction word must be {INSTR_BYTES} bytes, got {len(word)}")
            word = int.from_bytes(word, "little")
        if not 0 <= word < 1 << INSTR_BITS:
            raise FieldError(f"instruction word {word:#x} is not a {INSTR_BITS}-bit value")
        code = word & ((1 << OPCODE_BITS) - 1)
        try:
            opcode = Opcode(code)
        except ValueError:
            raise OpcodeError(f"opcode={code} is not defined (word {word:#034x})") from None
        fields = {}
        for info in _OPERAND_FIELDS[opcode]:
            raw = (word >> info.offset) & info.mask
            fields[info.name] = raw
        return cls(opcode, **fields)


def operand_fields(opcode: Opcode) -> list[FieldInfo]:
    """The operand fields of ``opcode`` with their bit offsets in the instruction word."""
    return list(_OPERAND_FIELDS[Opcode(opcode)])


def isa_description() -> str:
    """The ISA as a canonical text, one line per item in name order: every integer constant of
    this module (``INSTR_BITS`` among them), the CRC, every enum (member names and values) and
    every layout (field names, offsets and widths, flattened).

    ``AccelConfig.config_id`` hashes it with the configuration: a change of the ISA changes it.
    """
    lines = [f"CRC crc_width={CRC.crc_width} polynomial={CRC.polynomial:#x} "
             f"initial_crc={CRC.initial_crc:#x} reflect_input={CRC.reflect_input} "
             f"reflect_output={CRC.reflect_output} xor_output={CRC.xor_output:#x}"]
    for name, obj in sorted(globals().items()):
        if name.startswith("_"):
            continue
        if name.isupper() and isinstance(obj, int) and not isinstance(obj, bool):
            lines.append(f"{name} = {obj}")
        elif name.isupper() and isinstance(obj, dict) and all(
                isinstance(v, int) for v in obj.values()):
            lines.append(f"{name} = " + ", ".join(f"{k.name}:{v}" for k, v in obj.items()))
        elif (isinstance(obj, type) and issubclass(obj, enum.Enum)
              and obj.__module__ == __name__):
            members = ", ".join(f"{member.name}={member.value}" for member in obj)
            lines.append(f"enum {name} {obj.as_shape()!r}: {members}")
        elif isinstance(obj, data.Layout) or (
                isinstance(obj, type) and issubclass(obj, data.Struct)
                and obj.__module__ == __name__):
            fields = ", ".join(f"{row.name}@{row.offset}:{row.width}" for row in field_table(obj))
            lines.append(f"layout {name}: {fields}")
    return "\n".join(lines) + "\n"
