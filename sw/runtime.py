"""One API over three backends: the golden model, the RTL simulation and an FPGA board.

Glasgow's split: a *backend* is an abstract byte pipe (bytes in, the accelerator's response bytes
out); :class:`Device` is the host interface on top of it, speaking the protocol of
``docs/architecture.md`` section 9 identically to every backend, so a board session can be replayed
in simulation byte for byte.

>>> dev = Device(backend="golden", config="sim")      # or backend="rtl", or "board", port=...
>>> responses = dev.run(program)                       # raises DeviceError on a bad status
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..errors import (
    BackendUnavailable,
    BoardNotFound,
    ConfigError,
    DeviceError,
    FieldError,
    GatewareMismatch,
    IntegrityError,
    LinkTimeout,
    ProtocolError,
)
from ..hw.config import AccelConfig, get_config
from ..hw.isa import Counter, Instruction, Opcode, Status

__all__ = ["Backend", "LinkCounter", "GoldenBackend", "RtlBackend", "BoardBackend", "Device",
           "RunStats", "BACKENDS", "open_backend"]


class Backend(ABC):
    """A byte pipe to an accelerator of configuration ``config``."""

    name = "abstract"
    #: The backend checks every SYNC's link trailer itself (else :class:`Device` does).
    checks_link = False

    def __init__(self, config: AccelConfig):
        self.config = config
        self.cycles = 0  # accelerator cycles of the last exchange, when the backend knows them

    @abstractmethod
    def exchange(self, stream: bytes, response_bytes: int | None = None) -> bytes:
        """Send a whole host stream and return every byte the accelerator sent back.

        ``response_bytes`` is the number of bytes the protocol says will come back when the host
        knows it (it always does unless the program contains SGQ instructions).
        """

    @property
    def generation(self) -> int:
        """Changes whenever the accelerator may have lost its state (a board's resync): what a
        caller keeps resident on it must be loaded again."""
        return 0

    def program_pc(self, sync_index: int, pc: int) -> int:
        """The ``error_pc`` that the program's SYNC ``sync_index`` reported, in the program's
        own instruction indices (a backend that adds instructions maps it back)."""
        return pc

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

    @property
    def checks_link(self) -> bool:
        return self.inner.checks_link

    @property
    def generation(self) -> int:
        return self.inner.generation

    def program_pc(self, sync_index: int, pc: int) -> int:
        return self.inner.program_pc(sync_index, pc)

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

    The bytes are those the RTL backend exchanges, paced for the board's receive FIFO and with a
    flow-control probe (``SYNC keep=1``) where a stretch of the program has no response
    (:mod:`tinyaccel.sw.link`, ``docs/architecture.md`` section 9). Every SYNC answer is checked:
    the gateware's ``config_id`` and the CRCs of both directions. Responses are read while the
    stream is written.

    Parameters
    ----------
    config:
        The accelerator configuration the board's bitstream was built for.
    port:
        pyserial port name (default: the ``TINYACCEL_PORT`` environment variable).
    baud:
        UART rate (default: ``TINYACCEL_BAUD``, else the board's link,
        :data:`tinyaccel.boards.link.LINKS`).
    timeout:
        Seconds without a byte, while one is due, before :class:`LinkTimeout`.
    link:
        An already open pyserial-like object instead of ``port`` (``write``, ``read(n)``
        returning fewer bytes on a timeout, ``flush``, ``reset_input_buffer``, ``in_waiting``,
        ``close``), e.g. :class:`tinyaccel.sim.serial_link.SimulatedSerial`.
    spec:
        The link's :class:`~tinyaccel.boards.link.LinkSpec` (default: the board that runs
        ``config``).

    Opening checks the link and the gateware's identity (:meth:`resync`, quick when the board is
    at an instruction boundary). After a fault (a timeout, an integrity error, an interrupted
    exchange) the next exchange starts with a full resync; :attr:`resyncs` counts them, since the
    board may have reset its accelerator (:attr:`generation`: what was resident is gone).
    """

    name = "board"
    checks_link = True
    #: Bytes written between two looks at the receive side.
    CHUNK = 256

    def __init__(self, config: AccelConfig, port: str | None = None, baud: int | None = None,
                 timeout: float = 5.0, link=None, *, spec=None):
        super().__init__(config)
        from ..boards.link import LinkSpec, board_for_config, link_for
        if spec is None:
            try:
                spec = link_for(board_for_config(config.name))
            except ConfigError:
                spec = LinkSpec()
        env_baud = os.environ.get(BAUD_ENV)
        self.spec = spec.with_baud(baud if baud is not None or not env_baud else int(env_baud))
        self.resyncs = 0
        self.probes = 0  # probes inserted over all exchanges
        self._spans: list = []
        self._clean = False
        if link is not None:
            if port:
                raise BackendUnavailable(f"the board backend takes a serial port or a link, not "
                                         f"both (port={port!r}, link={link!r})")
            self._port = link
            self.port_name = getattr(link, "port", None) or repr(link)
            self.timeout = getattr(link, "timeout", timeout)
        else:
            self._port = _open_serial(port or os.environ.get(PORT_ENV), self.spec.baud, timeout)
            self.port_name = self._port.port
            self.timeout = timeout
        try:
            self.identity = self.resync(full=False)
        except BaseException:
            self._port.close()
            raise

    # -- exchanges -------------------------------------------------------------------------------

    def exchange(self, stream: bytes, response_bytes: int | None = None) -> bytes:
        if not self._clean:
            self.resync()
        self._clean = False  # until this exchange has ended well
        out = self._paced_exchange(stream)
        self._clean = True
        if response_bytes is not None and len(out) != response_bytes:
            raise ProtocolError(f"the program's responses hold {len(out)} bytes, the caller "
                                f"expected {response_bytes}")
        return out

    def _paced_exchange(self, stream: bytes) -> bytes:
        from ..hw.isa import Opcode
        from ..protocol import StatusReport, check_link, decode_fields
        from .link import ResponseWalker, check_identity, pace
        paced, spans = pace(self.config, stream, self.spec.window)
        self._spans = spans
        self.probes += sum(span.probe for span in spans)
        walker = ResponseWalker(self.config, [span.word for span in spans])
        port, window, where = self._port, self.spec.window, f"board on {self.port_name!r}"
        waiting = port.in_waiting
        if waiting:
            raise ProtocolError(f"{where} sent {waiting} bytes before the program: the response "
                                f"stream is out of sync")
        received, out = bytearray(), bytearray()
        sent = 0  # bytes written
        # bytes the board has certainly taken: an exchange starts after an answered SYNC, so a
        # LOAD at its start streams into an idle accelerator
        base = spans[0].end if spans[0].opcode == Opcode.LOAD.value else 0
        while not walker.done:
            limit = min(len(paced), base + window)
            if sent < limit:
                n = min(limit - sent, self.CHUNK)
                port.write(paced[sent:sent + n])
                sent += n
                data = port.read(port.in_waiting) if port.in_waiting else b""
            else:
                port.flush()
                data = port.read(max(1, port.in_waiting))
                if not data:
                    raise self._timeout(walker, spans, sent, len(paced))
            received += data
            try:
                answered = walker.feed(data)
            except ProtocolError as error:
                raise ProtocolError(f"{where}, {self._describe_span(spans, walker.pos)}: "
                                    f"{error}") from None
            for pos, resp in answered:
                span = spans[pos]
                if span.opcode == Opcode.SYNC.value:
                    counters = bool(decode_fields(span.word)[1]["counters"])
                    check_identity(self.config, StatusReport.from_bytes(resp, counters), where)
                    nxt = pos + 1
                    if nxt < len(spans) and spans[nxt].opcode == Opcode.LOAD.value:
                        # an idle accelerator takes a LOAD's data as fast as the line brings it
                        base = max(base, spans[nxt].end)
                if not span.probe:
                    out += resp
            if walker.started >= 0:
                base = max(base, spans[walker.started].end)
        try:
            check_link(self.config, paced, bytes(received))
        except IntegrityError as error:
            raise IntegrityError(f"{where}: {error}") from None
        return bytes(out)

    def _timeout(self, walker, spans, sent: int, total: int) -> LinkTimeout:
        return LinkTimeout(
            f"board on {self.port_name!r} did not answer {self._describe_span(spans, walker.pos)}"
            f": {walker.missing} bytes of {walker.waiting_for} still due after {self.timeout} s "
            f"without a byte ({sent} of {total} stream bytes sent); is the bitstream loaded "
            f"and the baud rate {self.spec.baud} right? (`tinyaccel board check`)")

    @staticmethod
    def _describe_span(spans, pos: int) -> str:
        if pos >= len(spans):
            return "after the last instruction"
        span = spans[pos]
        if span.probe:
            before = next((s.index for s in reversed(spans[:pos]) if not s.probe), None)
            return ("a flow-control probe (SYNC keep=1)" +
                    (f" after instruction {before}" if before is not None else ""))
        return f"instruction {span.index} ({_describe(span.word)})"

    @property
    def generation(self) -> int:
        # a fault leaves a resync due: the state counts as lost from then on
        return self.resyncs + (0 if self._clean else 1)

    def program_pc(self, sync_index: int, pc: int) -> int:
        """``error_pc`` reported by the program's instruction ``sync_index`` (a SYNC), counted
        in the program's own instructions (the board's count includes the probes)."""
        from ..hw.isa import Opcode
        from ..protocol import decode_fields
        positions = {span.index: k for k, span in enumerate(self._spans) if not span.probe}
        at = positions.get(sync_index)
        if at is None:
            return pc
        first = 0  # the board counts from the last SYNC that cleared its window
        for k in range(at - 1, -1, -1):
            span = self._spans[k]
            if span.opcode == Opcode.SYNC.value and not span.probe and \
                    not decode_fields(span.word)[1]["keep"]:
                first = k + 1
                break
        fault = min(first + pc, at)
        return sum(not span.probe for span in self._spans[first:fault])

    # -- resync ----------------------------------------------------------------------------------

    def resync(self, full: bool = True):
        """Bring the link to a known state; return the board's status report.

        1. Send nothing for the board's resync silence (``LinkSpec.silence_s``) and a little
           more, discarding what arrives: a board waiting in the middle of an instruction resets
           its accelerator; then wait until the line has been quiet.
        2. ``SYNC``: its answer must be a status record of the driver's configuration (else
           :class:`ProtocolError` / :class:`GatewareMismatch`).
        3. ``SYNC`` again: the answer must match exactly (status OK, one instruction, both link
           CRCs over exactly this exchange) — both directions are aligned and clean.

        With ``full=False`` (opening a port) steps 2 and 3 are tried first without the silence,
        with a short timeout: a board left at an instruction boundary passes at once, any other
        fails the exact check (a misaligned stream cannot answer it) and gets the full resync.

        Raises
        ------
        LinkTimeout
            The board does not answer (or does not stop sending).
        GatewareMismatch
            The board's gateware is built for another configuration or ISA.
        """
        self._clean = False
        quiet = max(0.02, 64 * self.spec.byte_s)
        if not full:
            try:
                report = self._handshake(quiet, timeout=max(0.25, 4 * quiet))
            except (LinkTimeout, ProtocolError, IntegrityError, GatewareMismatch):
                pass  # the full resync decides (a mismatch too: it could be misaligned bytes)
            else:
                self._clean = True
                return report
        self._drain(self.spec.silence_s * 1.25 + quiet, quiet)
        report = self._handshake(quiet, timeout=None)
        self.resyncs += 1
        self._clean = True
        return report

    def _handshake(self, quiet: float, timeout: float | None):
        """Steps 2 and 3 of :meth:`resync` (``timeout``: the port's read timeout meanwhile)."""
        from ..hw.isa import LINK_TRAILER_BYTES, STATUS_BYTES, Instruction, Opcode
        from ..protocol import StatusReport, check_link
        from .link import check_identity
        port, where = self._port, f"board on {self.port_name!r}"
        self._drain(0.0, quiet)
        saved = getattr(port, "timeout", None)
        if timeout is not None and saved is not None:
            port.timeout = timeout
        try:
            word = Instruction(Opcode.SYNC).to_bytes()
            answer_bytes = STATUS_BYTES + LINK_TRAILER_BYTES
            port.write(word)
            port.flush()
            first = StatusReport.from_bytes(self._read_exact(answer_bytes,
                                                             "the first resync SYNC"))
            check_identity(self.config, first, where)
            port.write(word)
            port.flush()
            answer = self._read_exact(answer_bytes, "the second resync SYNC")
        finally:
            if timeout is not None and saved is not None:
                port.timeout = saved
        try:
            check_link(self.config, word, answer)
        except IntegrityError as error:
            raise IntegrityError(f"{where}: resync: {error}") from None
        report = StatusReport.from_bytes(answer)
        if not report.ok or report.instructions != 1:
            raise ProtocolError(f"{where}: a SYNC right after a SYNC reported "
                                f"{report.status.name} after {report.instructions} "
                                f"instructions, expected OK after 1")
        if port.in_waiting:
            raise ProtocolError(f"{where} keeps sending after the resync")
        return report

    def _drain(self, hold_s: float, quiet_s: float, limit_s: float = 60.0) -> int:
        """Read and discard for ``hold_s`` seconds and until nothing arrived for ``quiet_s``."""
        port = self._port
        start = last = time.monotonic()
        discarded = 0
        while True:
            waiting = port.in_waiting
            data = port.read(waiting) if waiting else b""
            now = time.monotonic()
            if data:
                discarded += len(data)
                last = now
            elif now - start >= hold_s and now - last >= quiet_s:
                return discarded
            else:
                time.sleep(min(quiet_s / 4, 0.01))
            if now - start > limit_s:
                raise LinkTimeout(f"board on {self.port_name!r} kept sending for {limit_s} s "
                                  f"({discarded} bytes) during a resync")

    def _read_exact(self, size: int, what: str) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self._port.read(size - len(data))
            if not chunk:
                raise LinkTimeout(
                    f"board on {self.port_name!r} did not answer {what}: {len(data)} of {size} "
                    f"bytes within {self.timeout} s (is the bitstream loaded, `tinyaccel "
                    f"program`, and the baud rate {self.spec.baud} right?)")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self._port.close()


#: Environment variables naming the board's serial port and baud rate when none is given.
PORT_ENV, BAUD_ENV = "TINYACCEL_PORT", "TINYACCEL_BAUD"


def _open_serial(port: str | None, baud: int, timeout: float):
    if not port:
        raise BackendUnavailable(
            f"the board backend needs a serial port: pass port='/dev/ttyUSB1' (Python), "
            f"--port /dev/ttyUSB1 (CLI) or set {PORT_ENV}; build and program the bitstream with "
            f"`tinyaccel build --board ...` and `tinyaccel program --board ...` first")
    try:
        import serial
    except ImportError:  # pragma: no cover - pyserial is a dependency
        raise BackendUnavailable("the board backend needs pyserial: pip install pyserial") \
            from None
    try:
        return serial.Serial(port, baudrate=baud, timeout=timeout)
    except (serial.SerialException, OSError) as exc:
        raise BoardNotFound(f"cannot open serial port {port!r}: {exc}") from exc


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
        from ..protocol import check_link, parse_responses, response_length
        program = program.with_final_sync()
        start = time.perf_counter()
        stream = program.to_bytes()
        out = self.backend.exchange(stream, response_length(self.config, program))
        self.stats.wall_s += time.perf_counter() - start
        self.stats.programs += 1
        if not self.backend.checks_link:
            check_link(self.config, stream, out)
        responses = parse_responses(self.config, program, out)
        for index, (instr, resp) in enumerate(zip(program.instructions, responses, strict=True)):
            if instr.opcode != Opcode.SYNC:  # raw words carry a plain int opcode
                continue
            if resp.counters:
                for counter, value in resp.counters.items():
                    self.stats.counters[counter] += value
            if resp.status != Status.OK:
                pc = self.backend.program_pc(index, resp.error_pc)
                raise DeviceError(
                    f"accelerator ({self.backend.name}) reported {resp.status.name} at "
                    f"instruction {pc} (opcode {resp.error_opcode_name})",
                    status=resp.status, pc=pc)
        return responses

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
