"""The host byte protocol (``docs/architecture.md`` section 9), shared by every backend.

The golden model, the RTL testbenches and the driver all speak through this module:

* :func:`pack_words` / :func:`unpack_words` convert scratchpad words to and from their wire bytes
  (section 4) for every :class:`~tinyaccel.hw.isa.Buffer`;
* :class:`Program` builds a host stream (instruction words, each LOAD followed by its data);
* :func:`data_length` / :func:`response_length` say how many bytes follow an instruction in each
  direction, and :func:`parse_responses` splits the accelerator's answer per instruction;
* :class:`StatusReport` is the SYNC answer (status record, counter record, link trailer), and
  :func:`link_crc` the checksum of the link trailer and of SGQ responses.

Every offset and width comes from the layouts in :mod:`tinyaccel.hw.isa` (through
:func:`~tinyaccel.hw.isa.field_table`) and from :class:`~tinyaccel.hw.config.AccelConfig`.

Array representation of one word of each buffer (``n`` words -> leading axis ``n``):

========  ==============================================================================
INP       ``int8 (n, rows)``
WGT       ``int8 (n, cols)``
ACC       ``int32 (n, cols)``
OUT       ``int8 (n, cols)``
PARAM     ``PARAM_DTYPE (n, cols)`` — a structured dtype with the ChannelParams fields
          (:func:`pack_words` also takes a dict of integer arrays with those field names)
MASK      ``bool (n, 64)`` — element ``[w, i]`` is mask bit ``64*(addr+w) + i``
          (:func:`pack_words` also takes ``uint64 (n,)`` words)
========  ==============================================================================
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from amaranth.lib import data, enum

from .errors import DTypeError, FieldError, IntegrityError, ProtocolError, ShapeError
from .hw.config import MASK_WORD_BITS, AccelConfig, get_config
from .hw.isa import (
    COUNTER_BITS,
    COUNTER_RECORD_BYTES,
    CRC,
    CRC_BYTES,
    INSTR_BITS,
    INSTR_BYTES,
    LINK_TRAILER_BYTES,
    SGQ_MODE_BITS,
    STATUS_BYTES,
    STATUS_MAGIC,
    Buffer,
    ChannelParams,
    Counter,
    Instruction,
    InstructionLayout,
    LinkTrailer,
    Opcode,
    SgqMode,
    SgqStripeHeader,
    Status,
    StatusRecord,
    field_table,
    operand_fields,
)

__all__ = [
    "PARAM_DTYPE", "SGQ_LENGTH_BYTES", "lanes", "lane_dtype",
    "pack_words", "unpack_words", "channel_params", "channel_params_words",
    "RawInstruction", "decode_fields", "encode_fields", "as_word",
    "data_length", "response_length", "sgq_response_length", "sgq_max_payload", "sgq_frame",
    "sgq_unframe",
    "link_crc",
    "StatusReport", "pack_counters", "unpack_counters", "pack_link_trailer",
    "Program", "iter_stream", "parse_responses", "check_link",
]

#: Bytes of the little-endian payload length that starts an SGQ response (section 8).
SGQ_LENGTH_BYTES = 4

_OPCODE_FIELD = field_table(InstructionLayout)[0]
assert _OPCODE_FIELD.name == "opcode"


# -- word representations ----------------------------------------------------------------------

def _record_dtype(layout) -> np.dtype:
    """A NumPy structured dtype with the fields of a byte-aligned ``data.Struct`` layout."""
    names, formats, offsets = [], [], []
    size = 0
    for info in field_table(layout):
        if info.offset % 8 or info.width not in (8, 16, 32, 64):
            raise TypeError(f"field {info.name} ({info.width} bits at bit {info.offset}) is not "
                            f"a byte-aligned integer; no NumPy record view")
        kind = "i" if getattr(info.shape, "signed", False) else "u"
        names.append(info.name)
        formats.append(np.dtype(f"<{kind}{info.width // 8}"))
        offsets.append(info.offset // 8)
        size = max(size, (info.offset + info.width) // 8)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})


#: One ChannelParams as a NumPy record (field names, offsets and signedness from the layout).
PARAM_DTYPE = _record_dtype(ChannelParams)
_PARAM_FIELDS = {info.name: info for info in field_table(ChannelParams)}


def lanes(config: AccelConfig, buf: Buffer) -> int:
    """Values per word of ``buf``: ``rows`` for INP, ``cols`` for WGT/ACC/OUT/PARAM, 64 for MASK."""
    buf = _buffer(buf)
    if buf == Buffer.INP:
        return config.rows
    if buf == Buffer.MASK:
        return MASK_WORD_BITS
    return config.cols


def lane_dtype(config: AccelConfig, buf: Buffer) -> np.dtype:
    """NumPy dtype of one value of ``buf`` (derived from the word width and the lane count)."""
    buf = _buffer(buf)
    bits = config.word_bits(buf) // lanes(config, buf)
    if buf == Buffer.PARAM:
        if bits != PARAM_DTYPE.itemsize * 8:
            raise TypeError(f"PARAM lane of {bits} bits does not match ChannelParams")
        return PARAM_DTYPE
    if bits == 1:
        return np.dtype(bool)
    return np.dtype(f"<i{bits // 8}")


def _buffer(buf) -> Buffer:
    try:
        return Buffer(buf)
    except ValueError:
        raise FieldError(f"buf={buf!r} is not a Buffer "
                         f"({', '.join(f'{b.name}={b.value}' for b in Buffer)})") from None


def channel_params(params: Mapping[str, object], shape: tuple[int, ...]) -> np.ndarray:
    """Build a ``PARAM_DTYPE`` array of ``shape`` from a dict of integer arrays (broadcast).

    Missing fields are zero.

    Raises
    ------
    FieldError
        For an unknown field name or a value that does not fit its ChannelParams field.
    """
    unknown = set(params) - set(_PARAM_FIELDS)
    if unknown:
        raise FieldError(f"ChannelParams has no field(s) {', '.join(sorted(unknown))}; "
                         f"fields: {', '.join(_PARAM_FIELDS)}")
    out = np.zeros(shape, PARAM_DTYPE)
    for name, value in params.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "iub":
            raise DTypeError(f"ChannelParams.{name} has dtype {arr.dtype}, expected integers")
        lo, hi = np.iinfo(PARAM_DTYPE[name]).min, np.iinfo(PARAM_DTYPE[name]).max
        if arr.size and (arr.min() < lo or arr.max() > hi):
            bad = arr[(arr < lo) | (arr > hi)].flat[0]
            raise FieldError(f"ChannelParams.{name}={bad} does not fit in "
                             f"{_PARAM_FIELDS[name].width} signed bits ({lo}..{hi})")
        try:
            out[name] = arr
        except ValueError:
            raise ShapeError(f"ChannelParams.{name} of shape {arr.shape} does not broadcast "
                             f"to {shape}") from None
    return out


def channel_params_words(params: Mapping[str, object], n_channels: int, padded: int,
                         cols: int) -> np.ndarray:
    """PARAM words for ``n_channels`` output channels, zero-padded to ``padded`` channels.

    ``params`` maps ChannelParams field names to arrays of ``n_channels`` values (or scalars).
    Returns ``PARAM_DTYPE (padded // cols, cols)``: word ``j`` holds channels ``j*cols ..``.
    """
    if padded % cols or padded < n_channels:
        raise ShapeError(f"padded={padded} must be a multiple of cols={cols} and >= "
                         f"n_channels={n_channels}")
    words = np.zeros(padded, PARAM_DTYPE)
    words[:n_channels] = channel_params(params, (n_channels,))
    return words.reshape(padded // cols, cols)


def pack_words(config: AccelConfig, buf: Buffer, array) -> bytes:
    """Wire bytes of ``n`` words of ``buf`` (section 4), from the array representation.

    Raises
    ------
    DTypeError
        When ``array`` has the wrong dtype for ``buf`` (named with the dtype).
    ShapeError
        When ``array`` is not ``(n, lanes)`` for ``buf``.
    """
    config = get_config(config)
    buf = _buffer(buf)
    width = lanes(config, buf)
    if buf == Buffer.PARAM and isinstance(array, Mapping):
        shapes = {np.shape(v) for v in array.values()}
        shape = max(shapes, key=len) if shapes else (0, width)
        array = channel_params(array, shape)
    array = np.asarray(array)
    if buf == Buffer.MASK and array.dtype == np.uint64:
        if array.ndim != 1:
            raise ShapeError(f"MASK words as uint64 must have shape (n,), got {array.shape}")
        return array.astype("<u8").tobytes()
    want = lane_dtype(config, buf)
    if array.dtype != want:
        name = "PARAM_DTYPE" if buf == Buffer.PARAM else want
        raise DTypeError(f"{buf.name} words need dtype {name}, got {array.dtype}")
    if array.ndim != 2 or array.shape[1] != width:
        raise ShapeError(f"{buf.name} words must have shape (n, {width}), got {array.shape}")
    if buf == Buffer.MASK:
        return np.packbits(array, axis=1, bitorder="little").tobytes()
    return np.ascontiguousarray(array).tobytes()


def unpack_words(config: AccelConfig, buf: Buffer, data: bytes) -> np.ndarray:
    """The array representation of the words of ``buf`` in ``data`` (the inverse of pack_words).

    Raises
    ------
    ProtocolError
        When ``data`` is not a whole number of words.
    """
    config = get_config(config)
    buf = _buffer(buf)
    size = config.word_bytes(buf)
    if len(data) % size:
        raise ProtocolError(f"{len(data)} bytes are not a whole number of {size}-byte "
                            f"{buf.name} words")
    n = len(data) // size
    raw = np.frombuffer(bytes(data), np.uint8).reshape(n, size)
    if buf == Buffer.MASK:
        return np.unpackbits(raw, axis=1, bitorder="little").astype(bool)
    return raw.view(lane_dtype(config, buf)).reshape(n, lanes(config, buf)).copy()


# -- raw instruction words ---------------------------------------------------------------------

def _is_enum(shape) -> bool:
    return isinstance(shape, type) and issubclass(shape, enum.Enum)


def decode_fields(word: int) -> tuple[int, dict[str, int]]:
    """Split a 128-bit word into its opcode code and raw operand values; never rejects codes.

    This is what the hardware decoder sees: an undefined opcode has no operands, and enum fields
    (``buf``) are returned as plain ints even when the code is undefined.
    """
    word = int(word)
    if not 0 <= word < 1 << INSTR_BITS:
        raise FieldError(f"instruction word {word:#x} is not a {INSTR_BITS}-bit value")
    code = (word >> _OPCODE_FIELD.offset) & _OPCODE_FIELD.mask
    try:
        opcode = Opcode(code)
    except ValueError:
        return code, {}
    return code, {f.name: (word >> f.offset) & f.mask for f in operand_fields(opcode)}


def encode_fields(opcode: int, **fields: int) -> int:
    """Build a raw word from an opcode code and operand values, checking widths only.

    Unlike :class:`~tinyaccel.hw.isa.Instruction` this accepts undefined opcode and buffer codes
    (for error tests); an undefined opcode takes no operands.
    """
    code = opcode.value if isinstance(opcode, enum.Enum) else int(opcode)
    if not 0 <= code <= _OPCODE_FIELD.mask:
        raise FieldError(f"opcode={code} does not fit in {_OPCODE_FIELD.width} bits")
    try:
        table = {f.name: f for f in operand_fields(Opcode(code))}
    except ValueError:
        table = {}
    unknown = set(fields) - set(table)
    if unknown:
        raise FieldError(f"opcode {code} has no field(s) {', '.join(sorted(unknown))}")
    word = code << _OPCODE_FIELD.offset
    for name, value in fields.items():
        value = value.value if isinstance(value, enum.Enum) else int(value)
        info = table[name]
        if not 0 <= value <= info.mask:
            raise FieldError(f"{name}={value} does not fit in {info.width} unsigned bits "
                             f"(0..{info.mask})")
        word |= value << info.offset
    return word


class RawInstruction:
    """An arbitrary (possibly illegal) 128-bit word in a :class:`Program`.

    ``opcode`` is the :class:`~tinyaccel.hw.isa.Opcode` when the code is defined, else the int
    code; ``fields`` are the raw operand values.
    """

    __slots__ = ("word", "opcode", "fields")

    def __init__(self, word: int):
        code, fields = decode_fields(word)
        self.word = int(word)
        try:
            self.opcode = Opcode(code)
        except ValueError:
            self.opcode = code
        self.fields = fields

    def encode(self) -> int:
        return self.word

    def to_bytes(self) -> bytes:
        return self.word.to_bytes(INSTR_BYTES, "little")

    def __eq__(self, other):
        return isinstance(other, RawInstruction) and self.word == other.word

    def __hash__(self):
        return hash(self.word)

    def __repr__(self):
        return f"RawInstruction({self.word:#034x})"


def as_word(instr: Instruction | RawInstruction | int) -> int:
    """The 128-bit word of an instruction, raw instruction or int."""
    if isinstance(instr, (Instruction, RawInstruction)):
        return instr.encode()
    return int(instr)


def _defined_buffer(code: int) -> Buffer | None:
    try:
        return Buffer(code)
    except ValueError:
        return None


def data_length(config: AccelConfig, instr) -> int:
    """Bytes of host data that follow ``instr`` in the host stream.

    ``count * word_bytes(buf)`` for LOAD, else 0. A LOAD with an undefined buffer code has no
    word size, so it carries no data (contract section 9).
    """
    code, fields = decode_fields(as_word(instr))
    if code != Opcode.LOAD.value:
        return 0
    buf = _defined_buffer(fields["buf"])
    return 0 if buf is None else fields["count"] * config.word_bytes(buf)


def _whole_beats(config: AccelConfig, n: int) -> int:
    beat = config.beat_bytes
    return -(-n // beat) * beat


def sgq_response_length(config: AccelConfig, payload_bytes: int) -> int:
    """Bytes of an SGQ response (section 8): the length header and the payload, zero-padded to
    whole host beats, then the CRC trailer, zero-padded to whole host beats."""
    return (_whole_beats(config, SGQ_LENGTH_BYTES + payload_bytes)
            + _whole_beats(config, CRC_BYTES))


def link_crc(data: bytes) -> int:
    """The link's checksum (:data:`~tinyaccel.hw.isa.CRC`, CRC-32/ISO-HDLC) of ``data``: the
    ``rx_crc`` and ``tx_crc`` of a SYNC's link trailer (section 9) and the SGQ trailer (section
    8) are this function of the bytes they cover."""
    return _crc(bytes(data))


def _crc_slow(data: bytes) -> int:
    return CRC(8).compute(data)


# zlib computes CRC32_ISO_HDLC in C; use it when CRC is that algorithm (checked on the
# catalogue's check input and on a longer one), the definition itself otherwise.
_CHECK = [b"123456789", bytes(range(256)) * 3]
_crc = zlib.crc32 if all(zlib.crc32(d) == _crc_slow(d) for d in _CHECK) else _crc_slow


def sgq_frame(config: AccelConfig, payload: bytes) -> bytes:
    """The SGQ response bytes for ``payload``: little-endian length, payload, zero padding to a
    whole host beat, the CRC of all of that (little-endian), zero padding to a whole beat."""
    config = get_config(config)
    body = len(payload).to_bytes(SGQ_LENGTH_BYTES, "little") + bytes(payload)
    body += bytes(_whole_beats(config, len(body)) - len(body))
    trailer = link_crc(body).to_bytes(CRC_BYTES, "little")
    return body + trailer + bytes(_whole_beats(config, CRC_BYTES) - CRC_BYTES)


def sgq_unframe(config: AccelConfig, frame: bytes, index: int | None = None) -> bytes:
    """The payload of one whole SGQ response ``frame``, after its checks (the inverse of
    :func:`sgq_frame`). ``index`` (the instruction's) only goes into the messages.

    Raises
    ------
    ProtocolError
        When ``frame`` is not as long as its length header says (a truncated response).
    IntegrityError
        When the CRC trailer does not match the bytes before it, or a padding byte is not zero.
    """
    config = get_config(config)
    frame = bytes(frame)
    who = "SGQ response" + (f" of instruction {index}" if index is not None else "")
    if len(frame) < SGQ_LENGTH_BYTES:
        raise ProtocolError(f"{who} ends inside its length header: {len(frame)} bytes")
    length = int.from_bytes(frame[:SGQ_LENGTH_BYTES], "little")
    want = sgq_response_length(config, length)
    if len(frame) != want:
        raise ProtocolError(f"{who} has {len(frame)} bytes, its length header {length} says "
                            f"{want}")
    body = _whole_beats(config, SGQ_LENGTH_BYTES + length)
    expected = link_crc(frame[:body])
    received = int.from_bytes(frame[body:body + CRC_BYTES], "little")
    if received != expected:
        raise IntegrityError(f"{who}: CRC-32 mismatch, expected 0x{expected:08x} (over its "
                             f"{body} bytes), received 0x{received:08x}: corrupted payload")
    for start, stop, what in ((SGQ_LENGTH_BYTES + length, body, "payload"),
                              (body + CRC_BYTES, len(frame), "CRC trailer")):
        pad = frame[start:stop]
        if any(pad):
            at = start + next(i for i, b in enumerate(pad) if b)
            raise IntegrityError(f"{who}: padding byte {at} after the {what} is "
                                 f"0x{frame[at]:02x}, expected 0x00")
    return frame[SGQ_LENGTH_BYTES:SGQ_LENGTH_BYTES + length]


def response_length(config: AccelConfig, instr) -> int | None:
    """Bytes the accelerator sends for ``instr`` (or a whole :class:`Program`).

    STORE: ``count * word_bytes`` (0 for an undefined buffer code); SYNC: the status record,
    with ``counters`` the counter record, and the link trailer; SGQ: ``None`` (variable — the
    host reads the length header, see :func:`sgq_response_length`); everything else 0. For a
    Program, the sum, or ``None`` when it contains an SGQ.
    """
    config = get_config(config)
    if isinstance(instr, Program):
        total = 0
        for item, _ in instr:
            n = response_length(config, item)
            if n is None:
                return None
            total += n
        return total
    code, fields = decode_fields(as_word(instr))
    if code == Opcode.STORE.value:
        buf = _defined_buffer(fields["buf"])
        return 0 if buf is None else fields["count"] * config.word_bytes(buf)
    if code == Opcode.SYNC.value:
        return (STATUS_BYTES + (COUNTER_RECORD_BYTES if fields["counters"] else 0)
                + LINK_TRAILER_BYTES)
    if code == Opcode.SGQ.value:
        return None
    return 0


# -- status and counter records ----------------------------------------------------------------

_STATUS_FIELDS = field_table(StatusRecord)
_TRAILER_FIELDS = field_table(LinkTrailer)
_COUNTER_BYTES = COUNTER_BITS // 8


def pack_counters(counters: Mapping[Counter, int]) -> bytes:
    """The counter record: every :class:`~tinyaccel.hw.isa.Counter` in order, 64-bit LE."""
    out = bytearray()
    for c in Counter:
        value = int(counters.get(c, 0))
        if not 0 <= value < 1 << COUNTER_BITS:
            raise FieldError(f"counter {c.name}={value} does not fit in {COUNTER_BITS} bits")
        out += value.to_bytes(_COUNTER_BYTES, "little")
    return bytes(out)


def unpack_counters(data: bytes) -> dict[Counter, int]:
    """Parse a counter record (inverse of :func:`pack_counters`)."""
    if len(data) != COUNTER_RECORD_BYTES:
        raise ProtocolError(f"counter record needs {COUNTER_RECORD_BYTES} bytes, got {len(data)}")
    return {c: int.from_bytes(data[i * _COUNTER_BYTES:(i + 1) * _COUNTER_BYTES], "little")
            for i, c in enumerate(Counter)}


@dataclass(frozen=True)
class StatusReport:
    """The answer to a SYNC: the status record, when asked the counters, and the link trailer.

    ``error_pc`` is the index (since the SYNC that last cleared the error state) of the first
    faulting instruction and ``error_opcode`` its 4-bit opcode code (both 0 when ``status`` is
    OK); ``instructions`` the number of instructions in that window, this SYNC included;
    ``config_id`` the gateware's ``AccelConfig.config_id``. ``rx_crc`` and ``tx_crc`` are the
    link trailer (section 9; ``None``: a report without one, e.g. before it is known).
    """

    status: Status
    error_pc: int = 0
    error_opcode: int = 0
    instructions: int = 0
    acc_saturated: bool = False
    counters: dict[Counter, int] | None = None
    config_id: int = 0
    rx_crc: int | None = None
    tx_crc: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def error_opcode_name(self) -> str:
        """The faulting opcode's name, or ``opcode <n>`` for an undefined code."""
        try:
            return Opcode(self.error_opcode).name
        except ValueError:
            return f"opcode {self.error_opcode}"

    def records(self) -> bytes:
        """The status record, followed by the counter record when ``counters`` is set: the
        bytes of the SYNC response that ``tx_crc`` covers last."""
        values = {"magic": STATUS_MAGIC, "status": Status(self.status).value,
                  "acc_saturated": int(self.acc_saturated), "error_pc": self.error_pc,
                  "instructions": self.instructions, "error_opcode": self.error_opcode,
                  "config_id": self.config_id}
        record = _pack_fields("StatusRecord", _STATUS_FIELDS, values, STATUS_BYTES)
        return record + (pack_counters(self.counters) if self.counters is not None else b"")

    def to_bytes(self) -> bytes:
        """The SYNC response: :meth:`records`, then the link trailer unless ``rx_crc`` and
        ``tx_crc`` are ``None``."""
        if (self.rx_crc is None) != (self.tx_crc is None):
            raise FieldError(f"link trailer needs both CRCs: rx_crc={self.rx_crc}, "
                             f"tx_crc={self.tx_crc}")
        if self.rx_crc is None:
            return self.records()
        return self.records() + pack_link_trailer(self.rx_crc, self.tx_crc)

    @classmethod
    def from_bytes(cls, data: bytes, counters: bool = False, trailer: bool = True
                   ) -> StatusReport:
        """Parse a SYNC response: the status record, the counter record after it when
        ``counters``, and the link trailer when ``trailer`` (as every SYNC sends it).

        Raises
        ------
        ProtocolError
            On a wrong length, a bad magic byte or an undefined status code.
        """
        want = (STATUS_BYTES + (COUNTER_RECORD_BYTES if counters else 0)
                + (LINK_TRAILER_BYTES if trailer else 0))
        if len(data) != want:
            raise ProtocolError(f"SYNC response needs {want} bytes, got {len(data)}")
        word = int.from_bytes(data[:STATUS_BYTES], "little")
        values = {info.name: (word >> info.offset) & info.mask for info in _STATUS_FIELDS}
        if values["magic"] != STATUS_MAGIC:
            raise ProtocolError(f"status record magic is {values['magic']:#04x}, expected "
                                f"{STATUS_MAGIC:#04x}: the response stream is out of sync")
        try:
            status = Status(values["status"])
        except ValueError:
            raise ProtocolError(f"status record carries undefined status {values['status']}") \
                from None
        end = STATUS_BYTES + (COUNTER_RECORD_BYTES if counters else 0)
        link = {"rx_crc": None, "tx_crc": None}
        if trailer:
            bits = int.from_bytes(data[end:], "little")
            link = {info.name: (bits >> info.offset) & info.mask for info in _TRAILER_FIELDS}
        return cls(status=status, error_pc=values["error_pc"],
                   error_opcode=values["error_opcode"], instructions=values["instructions"],
                   acc_saturated=bool(values["acc_saturated"]),
                   counters=unpack_counters(data[STATUS_BYTES:end]) if counters else None,
                   config_id=values["config_id"], **link)


def pack_link_trailer(rx_crc: int, tx_crc: int) -> bytes:
    """The link trailer (:class:`~tinyaccel.hw.isa.LinkTrailer`) that ends a SYNC response."""
    return _pack_fields("LinkTrailer", _TRAILER_FIELDS, {"rx_crc": rx_crc, "tx_crc": tx_crc},
                        LINK_TRAILER_BYTES)


def _pack_fields(record: str, table, values: Mapping[str, int], size: int) -> bytes:
    """The little-endian bytes of a record: ``values`` by name into the fields of ``table``
    (fields not named are 0), each checked against its width."""
    word = 0
    for info in table:
        value = int(values.get(info.name, 0))
        if not 0 <= value <= info.mask:
            raise FieldError(f"{record}.{info.name}={value} does not fit in {info.width} bits")
        word |= value << info.offset
    return word.to_bytes(size, "little")


# -- programs ----------------------------------------------------------------------------------

class Program:
    """An ordered host stream: instructions, each with its LOAD data (empty for the others).

    Builder methods append one instruction and return the program, so calls chain::

        prog = Program("sim").load(Buffer.INP, 0, a).gemm(0, 0, 0, k=64).sync(counters=True)

    Iterating yields ``(instruction, payload)`` pairs.
    """

    def __init__(self, config: AccelConfig | str = "sim"):
        self.config = get_config(config)
        self._items: list[tuple[Instruction | RawInstruction, bytes]] = []

    # -- container
    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[Instruction | RawInstruction, bytes]]:
        return iter(self._items)

    def __getitem__(self, index):
        return self._items[index]

    def __repr__(self):
        return f"Program({self.config.name!r}, {len(self)} instructions)"

    @property
    def instructions(self) -> list[Instruction | RawInstruction]:
        return [instr for instr, _ in self._items]

    def listing(self) -> str:
        """One line per instruction, with its index and data size."""
        return "\n".join(f"{i:5d}  {instr!r}" + (f"  +{len(d)} B" if d else "")
                         for i, (instr, d) in enumerate(self._items))

    # -- appending
    def append(self, instr: Instruction | RawInstruction | int, payload: bytes = b"") -> Program:
        """Append an instruction (or raw word) with its LOAD data.

        Raises
        ------
        ProtocolError
            When ``payload`` is not exactly the data the instruction announces.
        """
        if not isinstance(instr, (Instruction, RawInstruction)):
            instr = RawInstruction(instr)
        payload = bytes(payload)
        want = data_length(self.config, instr)
        if len(payload) != want:
            raise ProtocolError(f"{instr!r} announces {want} data bytes, got {len(payload)}")
        self._items.append((instr, payload))
        return self

    def extend(self, other: Program) -> Program:
        """Append every instruction of ``other``."""
        for instr, payload in other:
            self.append(instr, payload)
        return self

    def raw(self, word: int, payload: bytes = b"") -> Program:
        """Append an arbitrary 128-bit word (possibly illegal), e.g. for error tests."""
        return self.append(RawInstruction(word), payload)

    def nop(self) -> Program:
        return self.append(Instruction(Opcode.NOP))

    def load(self, buf: Buffer, addr: int, array) -> Program:
        """LOAD the words of ``array`` (see :func:`pack_words`) into ``buf`` at ``addr``."""
        payload = pack_words(self.config, buf, array)
        count = len(payload) // self.config.word_bytes(buf)
        return self.append(Instruction(Opcode.LOAD, buf=buf, addr=addr, count=count), payload)

    def store(self, buf: Buffer, addr: int, count: int) -> Program:
        """STORE ``count`` words of ``buf`` from ``addr``."""
        return self.append(Instruction(Opcode.STORE, buf=buf, addr=addr, count=count))

    def gemm(self, inp_addr: int, wgt_addr: int, acc_addr: int, k: int, m_blocks: int = 1,
             n_blocks: int = 1, accumulate: bool = False, gate: bool = False,
             mask_idx: int = 0) -> Program:
        """GEMM of ``m_blocks`` x ``n_blocks`` blocks of depth ``k`` (section 5)."""
        return self.append(Instruction(
            Opcode.GEMM, inp_addr=inp_addr, wgt_addr=wgt_addr, acc_addr=acc_addr, k=k,
            m_blocks=m_blocks, n_blocks=n_blocks, accumulate=int(accumulate), gate=int(gate),
            mask_idx=mask_idx))

    def requant(self, acc_addr: int, out_addr: int, param_addr: int, count: int,
                out_gap: int = 0, gate: bool = False, mask_idx: int = 0) -> Program:
        """REQUANT ``count`` ACC words into OUT (``out_gap`` words between rows) with the
        channel parameters at ``param_addr``; ``gate``: skip the rows of blocks whose MASK bit
        ``mask_idx + row // rows`` is 0."""
        return self.append(Instruction(Opcode.REQUANT, acc_addr=acc_addr, out_addr=out_addr,
                                       param_addr=param_addr, count=count, out_gap=out_gap,
                                       gate=int(gate), mask_idx=mask_idx))

    def im2col(self, src: int, dst: int, *, channels: int, in_h: int, in_w: int, kh: int,
               kw: int, out_w: int, m_blocks: int, oy0: int = 0, pitch: int = 1,
               stride: int = 1, dilation: int = 1, pad_top: int = 0, pad_left: int = 0,
               pad_value: int = 0, pack: int = 0, pool: bool = False, tiled: bool = False,
               gate: bool = False, mask_word: int = 0) -> Program:
        """IM2COL: the GEMM input words of ``m_blocks`` blocks of a convolution window over the
        OUT activation tensor at ``src`` (section 5); ``pad_value`` is an INT8 value; ``pool``
        max-pools the window (``K = channels``); ``tiled``: tensors stored patch by patch;
        ``gate``: skip the blocks whose patch bit (from MASK word ``mask_word``) is 0."""
        if not -128 <= pad_value <= 127:
            raise FieldError(f"IM2COL.pad_value={pad_value} is not an INT8 value")
        return self.append(Instruction(
            Opcode.IM2COL, src=src, dst=dst, pitch=pitch, channels=channels, in_h=in_h,
            in_w=in_w, kh=kh, kw=kw, stride=stride, dilation=dilation, pad_top=pad_top,
            pad_left=pad_left, pad_value=pad_value & 0xFF, oy0=oy0, out_w=out_w,
            m_blocks=m_blocks, pack=pack, pool=int(pool), tiled=int(tiled), gate=int(gate),
            mask_word=mask_word))

    def patch(self, new_addr: int, ref_addr: int, k: int, blocks: int, threshold: int,
              mask_idx: int = 0, merge: bool = False, given: bool = False) -> Program:
        """PATCH (PASS change detection) over ``blocks`` OUT tiles of ``k`` words (section 7);
        ``given``: copy the tiles whose MASK bit is set instead of comparing."""
        return self.append(Instruction(Opcode.PATCH, new_addr=new_addr, ref_addr=ref_addr, k=k,
                                       blocks=blocks, threshold=threshold, mask_idx=mask_idx,
                                       merge=int(merge), given=int(given)))

    def dilate(self, src: int, dst: int, *, in_h: int, in_w: int, out_h: int, out_w: int,
               kh: int, kw: int, stride_y: int = 1, stride_x: int = 1, pad_top: int = 0,
               pad_left: int = 0, merge: bool = False) -> Program:
        """DILATE: the MASK bits at ``dst`` (``out_h x out_w``), each the OR of a ``kh x kw``
        window of the ``in_h x in_w`` bits at ``src`` (section 7)."""
        return self.append(Instruction(
            Opcode.DILATE, src=src, dst=dst, in_h=in_h, in_w=in_w, out_h=out_h, out_w=out_w,
            kh=kh, kw=kw, stride_y=stride_y, stride_x=stride_x, pad_top=pad_top,
            pad_left=pad_left, merge=int(merge)))

    def sgq(self, out_addr: int, count: int, stripe_len: int, max_shift: int = 0) -> Program:
        """SGQ-encode ``count`` OUT words in stripes of ``stripe_len`` words (section 8)."""
        return self.append(Instruction(Opcode.SGQ, out_addr=out_addr, count=count,
                                       stripe_len=stripe_len, max_shift=max_shift))

    def sync(self, counters: bool = False, clear: bool = False, keep: bool = False) -> Program:
        """SYNC: status record (and counter record with ``counters``; zero them with ``clear``),
        then the link trailer; ``keep``: leave the error state as it is (section 5)."""
        return self.append(Instruction(Opcode.SYNC, counters=int(counters), clear=int(clear),
                                       keep=int(keep)))

    def with_final_sync(self, counters: bool = True) -> Program:
        """This program if it ends with a SYNC, else a copy with ``SYNC counters=...`` appended."""
        if self._items and self._items[-1][0].opcode == Opcode.SYNC:
            return self
        return Program(self.config).extend(self).sync(counters=counters)

    # -- serialization
    def to_bytes(self) -> bytes:
        """The host stream: each instruction word (16 bytes, little-endian) and its data."""
        return b"".join(instr.to_bytes() + payload for instr, payload in self._items)

    @classmethod
    def from_bytes(cls, config: AccelConfig | str, stream: bytes) -> Program:
        """Split a host stream back into a program (raises ProtocolError when truncated)."""
        prog = cls(config)
        for word, payload in iter_stream(prog.config, stream):
            try:
                instr = Instruction.decode(word)
            except FieldError:
                instr = RawInstruction(word)
            prog.append(instr, payload)
        return prog


def iter_stream(config: AccelConfig, stream: bytes) -> Iterator[tuple[int, bytes]]:
    """Walk a host stream as the decoder does, yielding ``(word, load_data)`` per instruction.

    Raises
    ------
    ProtocolError
        When the stream ends inside an instruction word or inside LOAD data, naming how many
        bytes are missing.
    """
    view = memoryview(bytes(stream))
    pos, index = 0, 0
    while pos < len(view):
        if len(view) - pos < INSTR_BYTES:
            have = len(view) - pos
            raise ProtocolError(f"host stream ends inside instruction {index}: {have} of "
                                f"{INSTR_BYTES} bytes, {INSTR_BYTES - have} bytes missing")
        word = int.from_bytes(view[pos:pos + INSTR_BYTES], "little")
        pos += INSTR_BYTES
        need = data_length(config, word)
        if len(view) - pos < need:
            have = len(view) - pos
            raise ProtocolError(f"host stream ends inside the data of LOAD instruction {index}: "
                                f"{have} of {need} bytes, {need - have} bytes missing")
        yield word, bytes(view[pos:pos + need])
        pos += need
        index += 1


def parse_responses(config: AccelConfig | str, program: Iterable, data: bytes) -> list:
    """Split the accelerator's answer to ``program`` into one entry per instruction.

    STORE -> the words as arrays (:func:`unpack_words`); SGQ -> the payload ``bytes``;
    SYNC -> :class:`StatusReport` (with its link trailer; :func:`check_link` checks the CRCs);
    every other instruction -> ``None``.

    Raises
    ------
    ProtocolError
        On missing or extra bytes, a bad status magic or an impossible SGQ length.
    IntegrityError
        When an SGQ response fails its CRC-32 (or has a padding byte that is not zero).
    """
    config = get_config(config)
    data = bytes(data)
    pos = 0
    out: list = []

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ProtocolError(f"response ends inside {what}: needs {n} bytes at offset {pos}, "
                                f"{len(data) - pos} left ({pos + n - len(data)} missing)")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    for index, item in enumerate(program):
        instr = item[0] if isinstance(item, tuple) else item
        code, fields = decode_fields(as_word(instr))
        what = f"the response of instruction {index} ({instr!r})"
        if code == Opcode.STORE.value:
            buf = _defined_buffer(fields["buf"])
            if buf is None:
                out.append(b"")
            else:
                out.append(unpack_words(config, buf, take(response_length(config, instr), what)))
        elif code == Opcode.SGQ.value:
            length = int.from_bytes(take(SGQ_LENGTH_BYTES, what), "little")
            limit = sgq_max_payload(config, fields["count"], fields["stripe_len"])
            if length > limit:
                raise ProtocolError(f"SGQ length header {length} of instruction {index} exceeds "
                                    f"the largest possible payload {limit}: stream out of sync")
            head = length.to_bytes(SGQ_LENGTH_BYTES, "little")
            rest = take(sgq_response_length(config, length) - SGQ_LENGTH_BYTES, what)
            out.append(sgq_unframe(config, head + rest, index))
        elif code == Opcode.SYNC.value:
            record = take(response_length(config, instr), what)
            out.append(StatusReport.from_bytes(record, counters=bool(fields["counters"])))
        else:
            out.append(None)
    if pos != len(data):
        raise ProtocolError(f"{len(data) - pos} extra response bytes after the last instruction "
                            f"({pos} expected)")
    return out


def sgq_max_payload(config: AccelConfig, count: int, stripe_len: int) -> int:
    """Upper bound of an SGQ payload: every stripe coded at the widest mode (detects desync)."""
    if count == 0:
        return 0
    stripes = -(-count // max(stripe_len, 1))
    value_bits = config.word_bits(Buffer.OUT) // config.cols
    stripe_bits = (SgqMode.as_shape().width + data.Layout.cast(SgqStripeHeader).size
                   + max(stripe_len, 1) * config.cols * max(SGQ_MODE_BITS.values()))
    return -(-(value_bits + stripes * stripe_bits) // 8)


def check_link(config: AccelConfig | str, stream: bytes, data: bytes) -> int:
    """Check the link trailer of every SYNC in the answer ``data`` to the host ``stream``:
    ``rx_crc`` against :func:`link_crc` of the bytes sent since the previous SYNC's word,
    ``tx_crc`` against that of the bytes received since the previous trailer (section 9).
    ``stream`` starts just after a SYNC (or a reset). Returns the number of trailers checked.

    Raises
    ------
    IntegrityError
        When a CRC differs, naming the SYNC, the direction and both values.
    ProtocolError
        When ``data`` ends before a SYNC's trailer.
    """
    config = get_config(config)
    stream, data = bytes(stream), bytes(data)
    rx_start = tx_start = pos_in = pos_out = checked = 0
    for index, (word, payload) in enumerate(iter_stream(config, stream)):
        pos_in += INSTR_BYTES + len(payload)
        n = response_length(config, word)
        if n is None:  # SGQ: its length header says
            n = sgq_response_length(config, int.from_bytes(
                data[pos_out:pos_out + SGQ_LENGTH_BYTES], "little"))
        pos_out += n
        if decode_fields(word)[0] != Opcode.SYNC.value:
            continue
        if pos_out > len(data):
            raise ProtocolError(f"response ends before the link trailer of SYNC {index}: "
                                f"{len(data)} of {pos_out} bytes")
        records_end = pos_out - LINK_TRAILER_BYTES
        bits = int.from_bytes(data[records_end:pos_out], "little")
        got = {info.name: (bits >> info.offset) & info.mask for info in _TRAILER_FIELDS}
        for name, covered, what in (
                ("rx_crc", stream[rx_start:pos_in], "the accelerator received"),
                ("tx_crc", data[tx_start:records_end], "the accelerator sent")):
            want = link_crc(covered)
            if got[name] != want:
                raise IntegrityError(
                    f"SYNC {index}: link trailer {name}=0x{got[name]:08x}, expected "
                    f"0x{want:08x} over the {len(covered)} bytes {what}: a byte was lost or "
                    f"corrupted on the link")
        rx_start, tx_start = pos_in, pos_out
        checked += 1
    return checked
