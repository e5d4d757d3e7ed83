"""Scoreboard: the accelerator's response bytes against the golden model's, zero tolerance.

Every byte must be equal except the timing counters ``CYCLES``, ``BUSY_CYCLES`` and
``COMPUTE_CYCLES`` of a counter record, which the golden model reports as 0 and which are only
checked for plausibility (``COMPUTE_CYCLES <= BUSY_CYCLES <= CYCLES``): the expected bytes take
the RTL's values there, and the ``tx_crc`` of that SYNC's link trailer, which covers them, is
corrected to match (the CRC is affine: the correction is the CRC of the difference). A mismatch
names the first differing byte offset, the instruction whose response holds it (index and
operands) and the field or word inside that response.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FieldError, ProtocolError, SimulatorError, SimulatorHang
from ..hw.config import AccelConfig, get_config
from ..hw.isa import (
    COUNTER_BITS,
    COUNTER_RECORD_BYTES,
    CRC_BYTES,
    LINK_TRAILER_BYTES,
    STATUS_BYTES,
    Buffer,
    Counter,
    Instruction,
    LinkTrailer,
    Opcode,
    StatusRecord,
    field_table,
)
from ..protocol import (
    SGQ_LENGTH_BYTES,
    RawInstruction,
    decode_fields,
    iter_stream,
    link_crc,
    response_length,
    sgq_response_length,
)

__all__ = ["TIMING_COUNTERS", "Segment", "Mismatch", "response_segments", "compare_responses",
           "describe_instruction", "isolated", "Checker", "CheckResult"]

#: Counters the golden model cannot know; compared for plausibility only.
TIMING_COUNTERS = (Counter.CYCLES, Counter.BUSY_CYCLES, Counter.COMPUTE_CYCLES)
_CTR_BYTES = COUNTER_BITS // 8
_STATUS_FIELDS = field_table(StatusRecord)
_TRAILER_FIELDS = field_table(LinkTrailer)


def describe_instruction(word: int) -> str:
    """``GEMM(inp_addr=0, ...)`` for a defined instruction, the raw word otherwise."""
    try:
        return repr(Instruction.decode(word))
    except FieldError:
        return repr(RawInstruction(word))


@dataclass(frozen=True)
class Segment:
    """The response of one instruction inside the expected response stream."""
    index: int  # instruction index in the stream (0 = first word)
    word: int  # the instruction word
    start: int  # byte offset of its response
    length: int

    @property
    def opcode(self) -> int:
        """The opcode code of the instruction (an int: it may be undefined)."""
        return decode_fields(self.word)[0]


def response_segments(config: AccelConfig | str, stream: bytes, expected: bytes) -> list[Segment]:
    """Split ``expected`` (the golden answer to ``stream``) into per-instruction segments.

    SGQ lengths are read from the length headers in ``expected``.
    """
    config = get_config(config)
    segs = []
    pos = 0
    for index, (word, _) in enumerate(iter_stream(config, stream)):
        n = response_length(config, word)
        if n is None:  # SGQ: length header first
            head = expected[pos:pos + SGQ_LENGTH_BYTES]
            if len(head) < SGQ_LENGTH_BYTES:
                raise ProtocolError(f"expected response ends inside the SGQ header of "
                                    f"instruction {index}")
            n = sgq_response_length(config, int.from_bytes(head, "little"))
        if n:
            segs.append(Segment(index, word, pos, n))
        pos += n
    if pos != len(expected):
        raise ProtocolError(f"expected response has {len(expected)} bytes, the program "
                            f"answers {pos}")
    return segs


@dataclass
class Mismatch:
    """The first difference between the golden and the RTL response."""
    offset: int  # byte offset in the response stream
    index: int | None  # instruction whose response holds the byte (None: surplus bytes)
    instruction: str
    where: str  # field or word inside that response
    expected: bytes
    got: bytes
    expected_len: int
    got_len: int

    def __str__(self) -> str:
        head = (f"first mismatch at response byte {self.offset} "
                f"(response lengths: expected {self.expected_len}, got {self.got_len})")
        if self.index is None:
            return f"{head}: {self.where}; got {self.got.hex(' ')}"
        return (f"{head}: instruction {self.index} {self.instruction}, {self.where}: "
                f"expected {self.expected.hex(' ') or '(nothing)'}, "
                f"got {self.got.hex(' ') or '(nothing)'}")


def _where(config: AccelConfig, seg: Segment, rel: int, expected: bytes = b""
           ) -> tuple[str, int, int]:
    """Describe byte ``rel`` of a segment (``expected``: its golden bytes); return (text, field
    start, field length)."""
    code, fields = decode_fields(seg.word)
    if code == Opcode.SYNC.value:
        if rel < STATUS_BYTES:
            for info in _STATUS_FIELDS:
                if info.offset <= 8 * rel < info.offset + info.width:
                    lo, hi = info.offset // 8, (info.offset + info.width + 7) // 8
                    return f"status record field {info.name}", lo, hi - lo
            return "status record", 0, STATUS_BYTES
        records = seg.length - LINK_TRAILER_BYTES
        if rel >= records:  # (the fields are whole bytes)
            info = next(i for i in _TRAILER_FIELDS
                        if i.offset <= 8 * (rel - records) < i.offset + i.width)
            return f"link trailer {info.name}", records + info.offset // 8, info.width // 8
        i = (rel - STATUS_BYTES) // _CTR_BYTES
        return (f"counter {Counter(i).name}", STATUS_BYTES + i * _CTR_BYTES, _CTR_BYTES)
    if code == Opcode.STORE.value:
        buf = Buffer(fields["buf"])
        wb = config.word_bytes(buf)
        w = rel // wb
        return (f"{buf.name} word {fields['addr'] + w} (byte {rel % wb} of the word)", w * wb,
                wb)
    if code == Opcode.SGQ.value:
        if rel < SGQ_LENGTH_BYTES:
            return "SGQ length header", 0, SGQ_LENGTH_BYTES
        length = int.from_bytes(expected[:SGQ_LENGTH_BYTES], "little")
        beat = config.beat_bytes
        body = -(-(SGQ_LENGTH_BYTES + length) // beat) * beat  # header, payload, padding
        if rel < SGQ_LENGTH_BYTES + length:
            return f"SGQ payload byte {rel - SGQ_LENGTH_BYTES}", rel, 1
        if rel < body:
            return "SGQ padding after the payload", rel, 1
        if rel < body + CRC_BYTES:
            return "SGQ CRC-32 trailer", body, CRC_BYTES
        return "SGQ padding after the CRC trailer", rel, 1
    return "response", rel, 1


def _take_timing(seg: Segment, expected: bytearray, got: bytes) -> str | None:
    """Check the timing counters of a SYNC counter record in ``got`` and put them into
    ``expected``, correcting the ``tx_crc`` of its link trailer (which covers them).

    Returns a complaint when they are implausible.
    """
    code, fields = decode_fields(seg.word)
    if code != Opcode.SYNC.value or not fields["counters"]:
        return None
    if len(got) < seg.start + seg.length:
        return None
    base = seg.start + STATUS_BYTES

    def value(c: Counter) -> int:
        lo = base + c.value * _CTR_BYTES
        return int.from_bytes(got[lo:lo + _CTR_BYTES], "little")

    cycles, busy, compute = (value(c) for c in TIMING_COUNTERS)
    golden = bytes(expected[base:base + COUNTER_RECORD_BYTES])
    for c in TIMING_COUNTERS:
        lo = base + c.value * _CTR_BYTES
        expected[lo:lo + _CTR_BYTES] = got[lo:lo + _CTR_BYTES]
    # The counter record ends the bytes tx_crc covers, so the CRC of the corrected bytes is the
    # golden one XOR the CRC of their difference XOR the CRC of as many zeros (CRC is affine).
    diff = bytes(a ^ b for a, b in zip(golden, expected[base:base + COUNTER_RECORD_BYTES],
                                       strict=True))
    tx = next(i for i in _TRAILER_FIELDS if i.name == "tx_crc")
    lo = base + COUNTER_RECORD_BYTES + tx.offset // 8
    crc = int.from_bytes(expected[lo:lo + tx.width // 8], "little")
    crc ^= link_crc(diff) ^ link_crc(bytes(len(diff)))
    expected[lo:lo + tx.width // 8] = crc.to_bytes(tx.width // 8, "little")
    if not compute <= busy <= cycles:
        return (f"implausible timing counters COMPUTE_CYCLES={compute} BUSY_CYCLES={busy} "
                f"CYCLES={cycles} (need COMPUTE <= BUSY <= CYCLES)")
    return None


def compare_responses(config: AccelConfig | str, stream: bytes, expected: bytes,
                      got: bytes) -> Mismatch | None:
    """Compare the RTL's response ``got`` with the golden ``expected`` for ``stream``.

    Returns ``None`` when they agree (timing counters aside), else the first :class:`Mismatch`.
    """
    config = get_config(config)
    segs = response_segments(config, stream, expected)
    want = bytearray(expected)
    for seg in segs:
        complaint = _take_timing(seg, want, got)
        instr = describe_instruction(seg.word)
        if complaint:
            lo = seg.start + STATUS_BYTES
            return Mismatch(lo, seg.index, instr, complaint, b"", bytes(got[lo:lo + 64]),
                            len(expected), len(got))
        e = bytes(want[seg.start:seg.start + seg.length])
        r = bytes(got[seg.start:seg.start + seg.length])
        if e == r:
            continue
        rel = next((i for i in range(min(len(e), len(r))) if e[i] != r[i]), len(r))
        where, lo, n = _where(config, seg, rel, e)
        if rel >= len(r):
            where += " (the response ended here)"
        return Mismatch(seg.start + rel, seg.index, instr, where, e[lo:lo + n], r[lo:lo + n],
                        len(expected), len(got))
    if len(got) > len(expected):
        n = len(expected)
        return Mismatch(n, None, "", f"{len(got) - n} surplus bytes after the last response",
                        b"", bytes(got[n:n + 32]), len(expected), len(got))
    return None


@dataclass
class CheckResult:
    """One program checked on the RTL against the golden model."""
    label: str
    mismatch: Mismatch | None
    cycles: int
    hang: str | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch is None and self.hang is None

    def __str__(self) -> str:
        if self.hang:
            return f"{self.label}: HANG: {self.hang}"
        if self.mismatch:
            return f"{self.label}: {self.mismatch}"
        return f"{self.label}: ok ({self.cycles} cycles)"


def isolated(config: AccelConfig | str, program) -> bytes:
    """``program`` (a Program or bytes) behind a ``SYNC clear=1`` that zeroes the counters.

    Programs that only read what they wrote (random programs with their prelude, corner
    programs) then answer the same bytes whatever ran before them, so each one replays alone.
    """
    from ..protocol import Program
    body = program if isinstance(program, (bytes, bytearray)) else program.to_bytes()
    return Program(get_config(config)).sync(clear=True).to_bytes() + bytes(body)


class Checker:
    """Runs programs on an RTL session and a golden machine in lockstep and compares them.

    The golden machine lives as long as the checker, as the simulator does, so both carry the
    same state from one program to the next (scratchpads, counters).
    """

    def __init__(self, session, golden=None):
        from .golden import GoldenMachine
        self.session = session
        self.config = session.config
        self.golden = golden if golden is not None else GoldenMachine(self.config)

    def check(self, stream: bytes, label: str = "program", **run_kwargs) -> CheckResult:
        """Run ``stream`` on both; ``run_kwargs`` go to ``RtlSession.run_result``."""
        expected = self.golden.run(stream)
        try:
            result = self.session.run_result(stream, len(expected), **run_kwargs)
        except SimulatorError as exc:  # the simulator died; the session restarts on the next run
            self.golden.reset()
            return CheckResult(label, None, 0, hang=f"simulator crashed: {exc}")
        except SimulatorHang as exc:
            # The hang left the RTL somewhere inside the program; its state no longer matches.
            self.golden.reset()  # run_result has reset the RTL
            partial = compare_responses(self.config, stream, expected, exc.result.data)
            return CheckResult(label, partial, exc.result.cycles,
                               hang=f"{exc}" + (f"; before it: {partial}" if partial else ""))
        mismatch = compare_responses(self.config, stream, expected, result.data)
        if mismatch is None:
            mismatch = self._check_error_pin(stream, expected, result.error_pin)
        return CheckResult(label, mismatch, result.cycles)

    def _check_error_pin(self, stream: bytes, expected: bytes, error_pin: bool):
        """The ``error`` output is high (until the next SYNC) exactly when a program faults."""
        from ..protocol import StatusReport
        faulted = None
        for seg in response_segments(self.config, stream, expected):
            if seg.opcode == Opcode.SYNC.value:
                report = StatusReport.from_bytes(expected[seg.start:seg.start + STATUS_BYTES],
                                                 trailer=False)
                if not report.ok:
                    faulted = (seg.index, report)
                    break
        if bool(faulted) == error_pin:
            return None
        what = (f"error pin never rose although SYNC {faulted[0]} reports "
                f"{faulted[1].status.name}" if faulted else
                "error pin rose although every SYNC reports OK")
        return Mismatch(0, faulted[0] if faulted else None, "", what, b"", b"", len(expected),
                        len(expected))
