"""The board link: pacing, integrity checks and resync of the UART between driver and board.

A board's UART has no flow control and its receive FIFO holds ``LinkSpec.window`` bytes
(``tinyaccel.boards.link``), so the driver must never have more than that on the way past the
last point the board is known to have consumed (``docs/architecture.md`` section 9):

* **acknowledgements** are responses: the first byte of instruction ``k``'s response proves the
  accelerator decoded everything up to the end of ``k``. The board never needs to be told
  anything it does not already send.
* **probes**: where a stretch of the stream carries no response for more than half a window,
  :func:`pace` inserts a ``SYNC keep=1`` — it waits until the accelerator is idle, answers, and
  leaves the program's meaning unchanged (the error state and instruction indices stay). Half a
  window apart, the answer to one probe arrives while the next half window is on the line.
* **a LOAD right after an answered SYNC** streams into an idle accelerator, which takes its data
  as fast as the line brings it: it is not counted against the window (this is what lets a
  100 KB LOAD run at line rate through a 1 KB FIFO).

Every SYNC's answer ends with the link trailer (CRC-32 of the bytes the board received and sent
since the previous SYNC, checked by :func:`tinyaccel.protocol.check_link`) and carries the
gateware's ``config_id`` (:func:`check_identity`): a dropped or corrupted byte in either
direction is an :class:`IntegrityError`, never silently wrong data, and gateware for another
configuration is a :class:`GatewareMismatch` at the first SYNC.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GatewareMismatch, ProtocolError
from ..hw.config import AccelConfig
from ..hw.isa import INSTR_BYTES, Instruction, Opcode
from ..protocol import (
    SGQ_LENGTH_BYTES,
    StatusReport,
    decode_fields,
    iter_stream,
    response_length,
    sgq_max_payload,
    sgq_response_length,
)

__all__ = ["Span", "pace", "probe_word", "ResponseWalker", "check_identity", "RecordingPort"]


def probe_word() -> bytes:
    """The instruction word of a flow-control probe: ``SYNC keep=1``."""
    return Instruction(Opcode.SYNC, keep=1).to_bytes()


@dataclass(frozen=True)
class Span:
    """One instruction of a paced stream.

    ``start``/``end`` are byte offsets in the paced stream; ``index`` is the instruction's index
    in the caller's program, ``None`` for a probe the driver inserted.
    """

    start: int
    end: int
    word: int
    index: int | None

    @property
    def probe(self) -> bool:
        return self.index is None

    @property
    def opcode(self) -> int:
        return self.word & 0xF


def pace(config: AccelConfig, stream: bytes, window: int) -> tuple[bytes, list[Span]]:
    """Insert probes into ``stream`` so that no stretch without a response is longer than half
    of ``window`` bytes, and every LOAD longer than that follows a SYNC.

    Returns the paced stream and its spans. The stream must be a whole program that ends with
    a SYNC (``Program.with_final_sync``); the result is deterministic.
    """
    if window < 4 * INSTR_BYTES:
        raise ProtocolError(f"link window of {window} bytes is below {4 * INSTR_BYTES}")
    half = window // 2
    probe = probe_word()
    probe_int = int.from_bytes(probe, "little")
    out, spans = bytearray(), []
    run = 0  # bytes since the last instruction with a response
    after_sync = True  # every exchange starts after the previous program's final SYNC

    def emit(data: bytes, word: int, index: int | None) -> None:
        spans.append(Span(len(out), len(out) + len(data), word, index))
        out.extend(data)

    words = list(iter_stream(config, stream))
    if not words or words[-1][0] & 0xF != Opcode.SYNC.value:
        raise ProtocolError("a board exchange must be a whole program ending with SYNC")
    for index, (word, payload) in enumerate(words):
        size = INSTR_BYTES + len(payload)
        big = size > half
        if (big and not after_sync) or (not big and run + size > half):
            emit(probe, probe_int, None)
            run, after_sync = 0, True
        emit(word.to_bytes(INSTR_BYTES, "little") + payload, word, index)
        answers = response_length(config, word) != 0  # SGQ: None, always answers
        run = 0 if answers else run + size
        after_sync = word & 0xF == Opcode.SYNC.value
    return bytes(out), spans


class ResponseWalker:
    """Follows the response stream of a list of instruction words as its bytes arrive.

    :meth:`feed` takes received bytes and returns the instructions whose response completed,
    as ``(position, response bytes)``; :attr:`started` is the position of the last instruction
    whose response has begun (``-1``: none).
    """

    def __init__(self, config: AccelConfig, words: list[int]):
        self.config = config
        self.words = words
        self.pos = 0  # instruction whose response is being read
        self.started = -1
        self._buf = bytearray()
        self._resp = bytearray()  # bytes of the current instruction's response so far
        self._need: int | None = None  # bytes still due for the current instruction
        self.sgq_length: int | None = None  # the current SGQ's length header, once read
        self._skip_silent()

    @property
    def done(self) -> bool:
        return self.pos >= len(self.words)

    def _skip_silent(self) -> None:
        while not self.done and self._need is None:
            size = response_length(self.config, self.words[self.pos])
            if size == 0:
                self.pos += 1
                continue
            self._need = SGQ_LENGTH_BYTES if size is None else size
            self._sgq_header = size is None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Take ``data``; return the responses it completed, in order."""
        self._buf += data
        done = []
        while self._buf and not self.done:
            self.started = self.pos
            take = min(self._need, len(self._buf))
            self._resp += self._buf[:take]
            del self._buf[:take]
            self._need -= take
            if self._need:
                break
            if self._sgq_header:
                self._sgq_header = False
                length = int.from_bytes(self._resp[:SGQ_LENGTH_BYTES], "little")
                _, fields = decode_fields(self.words[self.pos])
                limit = sgq_max_payload(self.config, fields["count"], fields["stripe_len"])
                if length > limit:
                    raise ProtocolError(
                        f"SGQ length header {length}, more than its largest payload {limit}: "
                        f"the response stream is out of sync")
                self.sgq_length = length
                self._need = sgq_response_length(self.config, length) - SGQ_LENGTH_BYTES
                if self._need:
                    continue
            done.append((self.pos, bytes(self._resp)))
            self.sgq_length = None
            self._resp.clear()
            self._need = None
            self.pos += 1
            self._skip_silent()
        if self._buf and self.done:
            raise ProtocolError(f"{len(self._buf)} bytes arrived after the last response: the "
                                f"response stream is out of sync")
        return done

    @property
    def waiting_for(self) -> str:
        """What the bytes still due are (for messages)."""
        if self.sgq_length is not None:
            return f"the SGQ frame after a length header of {self.sgq_length}"
        return "its response"

    @property
    def missing(self) -> int | None:
        """Bytes still due for the current instruction's response (``None`` when done)."""
        return None if self.done else self._need


def check_identity(config: AccelConfig, report: StatusReport, where: str) -> None:
    """Raise :class:`GatewareMismatch` unless ``report`` comes from gateware of ``config``."""
    if report.config_id != config.config_id:
        raise GatewareMismatch(
            f"{where} runs gateware with config_id 0x{report.config_id:06x}; the driver's "
            f"config {config.name!r} has 0x{config.config_id:06x}: build and program the "
            f"bitstream of {config.name!r} (`tinyaccel build`, `tinyaccel program`), or pass "
            f"the board's --config")


class RecordingPort:
    """A pyserial-like port that records every byte written to it and read from it: a board
    session to replay on the golden model (section 9: the same bytes in give the same bytes
    out), ``GoldenMachine(config).run(bytes(port.sent)) == bytes(port.received)``."""

    def __init__(self, inner):
        self.inner = inner
        self.sent = bytearray()
        self.received = bytearray()

    def write(self, data: bytes) -> int:
        n = self.inner.write(data)
        self.sent += data
        return n

    def read(self, size: int = 1) -> bytes:
        data = self.inner.read(size)
        self.received += data
        return data

    def __getattr__(self, name):  # in_waiting, flush, reset_input_buffer, close, port, timeout
        return getattr(self.inner, name)
