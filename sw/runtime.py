"""One API over three backends: the golden model, the RTL simulation and an FPGA board.

Glasgow's split: a *backend* is an abstract byte pipe (bytes in, the accelerator's response bytes
out); :class:`Device` is the host interface on top of it, speaking the protocol of
``docs/architecture.md`` section 9 identically to every backend, so a board session can be replayed
in simulation byte for byte.

>>> dev = Device(backend="golden", config="sim")      # or backend="rtl", or "board", port=...
>>> responses = dev.run(program)                       # raises DeviceError on a bad status
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..errors import BackendUnavailable, DeviceError, FieldError, ProtocolError
from ..hw.config import AccelConfig, get_config
from ..hw.isa import Counter, Instruction, Opcode, Status

__all__ = ["Backend", "LinkCounter", "GoldenBackend", "RtlBackend", "BoardBackend", "Device",
           "RunStats", "BACKENDS", "open_backend"]


class Backend(ABC):
    """A byte pipe to an accelerator of configuration ``config``."""

    name = "abstract"

    def __init__(self, config: AccelConfig):
        self.config = config
        self.cycles = 0  # accelerator cycles of the last exchange, when the backend knows them

    @abstractmethod
    def exchange(self, stream: bytes, response_bytes: int | None = None) -> bytes:
        """Send a whole host stream and return every byte the accelerator sent back.

        ``response_bytes`` is the number of bytes the protocol says will come back when the host
        knows it (it always does unless the program contains SGQ instructions).
        """

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release simulator processes or ports."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LinkCounter(Backend):
    """Wraps a backend and counts the bytes that cross the host link: ``sent`` (host streams)
    and ``received`` (responses), over every exchange."""

    def __init__(self, inner: Backend):
        super().__init__(inner.config)
        self.inner, self.name = inner, inner.name
        self.sent = self.received = 0

    @property
    def link_bytes(self) -> int:
        """Bytes in both directions so far."""
        return self.sent + self.received

    def exchange(self, stream: bytes, response_bytes: int | None = None) -> bytes:
        out = self.inner.exchange(stream, response_bytes)
        self.sent += len(stream)
        self.received += len(out)
        self.cycles = self.inner.cycles
        return out

    def close(self) -> None:
        self.inner.close()


class GoldenBackend(Backend):
    """The NumPy golden model (``tinyaccel.sim.golden``): exact, fast, no cycle counts."""

    name = "golden"

    def __init__(self, config: AccelConfig):
        super().__init__(config)
        from ..sim.golden import GoldenMachine
        self.machine = GoldenMachine(config)

    def exchange(self, stream: bytes, response_bytes: int | None = None) -> bytes:
        return self.machine.run(stream)


class RtlBackend(Backend):
    """The Amaranth accelerator converted to Verilog and run in Verilator (``tinyaccel.sim.rtl``).

    The Verilated model persists between exchanges, like a board that stays powered.
    """

    name = "rtl"

    def __init__(self, config: AccelConfig):
        super().__init__(config)
        from ..sim.rtl import RtlSession
        self._session = RtlSession(config)

    def exchange(self, stream: bytes, response_bytes: int | None = None) -> bytes:
        out = self._session.run(stream, response_bytes)
        self.cycles = self._session.last_result.cycles
        return out

    def close(self) -> None:
        self._session.close()


class BoardBackend(Backend):
    """An FPGA board running the accelerator behind its UART bridge (``tinyaccel.boards``).

    The bytes are exactly those the RTL backend exchanges. ``port`` is a pyserial port name,
    opened at ``baud`` with a read ``timeout`` in seconds; or ``link`` is an already open
    pyserial-like object (``write``, ``read(n)`` returning fewer bytes on a timeout, ``flush``,
    ``reset_input_buffer``, ``in_waiting``, ``close``), e.g. the simulated board link
    :class:`tinyaccel.sim.serial_link.SimulatedSerial`; its own ``timeout`` applies.

    Responses are read instruction by instruction, following the host stream: a fixed number of
    bytes for a STORE or SYNC, and for an SGQ first the length header, then the rest of its
    frame (``sgq_response_length``), so programs with SGQ need no length in advance.
    """

    name = "board"

    def __init__(self, config: AccelConfig, port: str | None = None, baud: int = 115200,
                 timeout: float = 5.0, link=None):
        super().__init__(config)
        if link is not None:
            if port:
                raise BackendUnavailable(f"the board backend takes a serial port or a link, not "
                                         f"both (port={port!r}, link={link!r})")
            self._port = link
            self.port_name = getattr(link, "port", None) or repr(link)
            self.timeout = getattr(link, "timeout", timeout)
            return
        if not port:
            raise BackendUnavailable(
                "the board backend needs a serial port: pass port='/dev/ttyUSB0' (Python) or "
                "--port /dev/ttyUSB0 (CLI); build and program the bitstream with "
                "`tinyaccel build --board ...` first")
        try:
            import serial
        except ImportError:  # pragma: no cover - pyserial is a dependency
            raise BackendUnavailable(
                "the board backend needs pyserial: pip install pyserial") from None
        try:
            self._port = serial.Serial(port, baudrate=baud, timeout=timeout)
        except (serial.SerialException, OSError) as exc:
            raise BackendUnavailable(f"cannot open serial port {port!r}: {exc}") from exc
        self.port_name = port
        self.timeout = timeout

    def exchange(self, stream: bytes, response_bytes: int | None = None) -> bytes:
        from ..protocol import iter_stream
        words = [word for word, _ in iter_stream(self.config, stream)]  # before sending anything
        self._port.reset_input_buffer()
        self._port.write(stream)
        self._port.flush()
        data = self._read_responses(words)
        if response_bytes is not None and len(data) != response_bytes:
            raise ProtocolError(f"the program's responses hold {len(data)} bytes, the caller "
                                f"expected {response_bytes}")
        return data

    def _read_responses(self, words: list[int]) -> bytes:
        """Read the response of each instruction word in turn (the only reader of the port)."""
        from ..protocol import SGQ_LENGTH_BYTES, response_length, sgq_response_length
        out = bytearray()
        for index, word in enumerate(words):
            size = response_length(self.config, word)
            if size is not None:
                out += self._read(size, index, word, "response")
                continue
            head = self._read(SGQ_LENGTH_BYTES, index, word, "SGQ length header")
            length = int.from_bytes(head, "little")
            self._check_sgq_length(index, word, length)
            out += head
            out += self._read(sgq_response_length(self.config, length) - SGQ_LENGTH_BYTES,
                              index, word, f"SGQ frame after a length header of {length}")
        waiting = self._port.in_waiting
        if waiting:
            raise ProtocolError(f"board on {self.port_name!r} sent {waiting} bytes more than the "
                                f"{len(words)} instructions answer: the response stream is out "
                                f"of sync")
        return bytes(out)

    def _read(self, size: int, index: int, word: int, part: str) -> bytes:
        """Exactly ``size`` bytes from the port, gathered over as many reads as they take."""
        data = bytearray()
        while len(data) < size:
            chunk = self._port.read(size - len(data))
            if not chunk:  # nothing arrived within the timeout
                raise BackendUnavailable(
                    f"board on {self.port_name!r} did not answer instruction {index} "
                    f"({_describe(word)}): got {len(data)} of {size} bytes of its {part} within "
                    f"{self.timeout} s (is the bitstream loaded and the baud rate right?)")
            data += chunk
        return bytes(data)

    def _check_sgq_length(self, index: int, word: int, length: int) -> None:
        """Reject an SGQ length header no payload of this instruction can have, before waiting
        for it (the bound :func:`~tinyaccel.protocol.parse_responses` applies too)."""
        from ..protocol import decode_fields, sgq_max_payload
        _, fields = decode_fields(word)
        limit = sgq_max_payload(self.config, fields["count"], fields["stripe_len"])
        if length > limit:
            raise ProtocolError(
                f"board on {self.port_name!r}: instruction {index} ({_describe(word)}) sent SGQ "
                f"length header {length}, more than its largest payload {limit}: stream out of "
                f"sync")

    def close(self) -> None:
        self._port.close()



def _describe(word: int) -> str:
    """``SGQ(out_addr=0, ...)`` for a defined instruction word, the raw word otherwise."""
    from ..protocol import RawInstruction
    try:
        return repr(Instruction.decode(word))
    except FieldError:
        return repr(RawInstruction(word))


BACKENDS = {"golden": GoldenBackend, "rtl": RtlBackend, "board": BoardBackend}


def open_backend(backend: str | Backend, config: AccelConfig, **options) -> Backend:
    """Instantiate the backend named ``backend`` (``golden``, ``rtl`` or ``board``)."""
    if isinstance(backend, Backend):
        return backend
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of "
                                 f"{', '.join(BACKENDS)}") from None
    return cls(config, **options)


@dataclass
class RunStats:
    """Totals over the programs a :class:`Device` ran (architectural counters and timing)."""
    programs: int = 0
    wall_s: float = 0.0
    counters: dict = field(default_factory=lambda: {c: 0 for c in Counter})

    @property
    def cycles(self) -> int:
        return self.counters[Counter.CYCLES]

    @property
    def macs(self) -> int:
        return self.counters[Counter.MACS_ISSUED]


class Device:
    """The host interface: runs :class:`~tinyaccel.protocol.Program` objects on a backend.

    Parameters
    ----------
    backend:
        ``"golden"``, ``"rtl"``, ``"board"`` or a :class:`Backend` instance.
    config:
        Preset name or :class:`AccelConfig`.
    options:
        Passed to the backend (``port=``, ``baud=`` for the board).
    """

    def __init__(self, backend: str | Backend = "golden", config: str | AccelConfig = "sim",
                 **options):
        self.config = get_config(config)
        self.backend = open_backend(backend, self.config, **options)
        self.stats = RunStats()

    def run(self, program) -> list:
        """Run ``program`` (ending with a SYNC, appended if missing) and return its responses.

        Returns one entry per instruction (see ``tinyaccel.protocol.parse_responses``).

        Raises
        ------
        DeviceError
            When a SYNC reports a status other than OK; the message names the status, the
            index of the faulting instruction and its opcode.
        """
        from ..protocol import parse_responses, response_length
        program = program.with_final_sync()
        start = time.perf_counter()
        stream = program.to_bytes()
        out = self.backend.exchange(stream, response_length(self.config, program))
        self.stats.wall_s += time.perf_counter() - start
        self.stats.programs += 1
        responses = parse_responses(self.config, program, out)
        for instr, resp in zip(program.instructions, responses, strict=True):
            if instr.opcode != Opcode.SYNC:  # raw words carry a plain int opcode
                continue
            if resp.counters:
                for counter, value in resp.counters.items():
                    self.stats.counters[counter] += value
            if resp.status != Status.OK:
                raise DeviceError(
                    f"accelerator ({self.backend.name}) reported {resp.status.name} at "
                    f"instruction {resp.error_pc} (opcode {resp.error_opcode_name})",
                    status=resp.status, pc=resp.error_pc)
        return responses

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
