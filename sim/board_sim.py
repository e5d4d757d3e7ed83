"""The simulated board: the Verilated board core behind a pseudo-terminal.

:class:`SimulatedBoard` runs the gateware a board runs -- ``UARTAccelerator``: UART receiver and
transmitter, RX FIFO at the board's depth, bridge, accelerator -- in a Verilator process whose
serial line is a pseudo-terminal. A host opens :attr:`SimulatedBoard.port` with pyserial exactly
as it opens a board's ``/dev/ttyUSBn``::

    with SimulatedBoard("ice40") as board:
        port = serial.Serial(board.port, baudrate=board.baud, timeout=2)
        port.write(program.to_bytes())
        answer = port.read(n)
        print(board.stats())                    # cycles, bytes each way, overflows, overruns

The line. Host bytes become 8N1 frames on the board's ``rx`` at ``divisor`` clock cycles per bit,
back to back while bytes wait (never faster than the line; the first frame after an idle line
starts at a random phase of the clock, drawn from ``seed``). Frames on ``tx`` are sampled at
mid-bit and written to the pty. Simulation time is cycles: ``baud`` is what the port is opened
at, the line's speed in wall time is whatever the simulator reaches (:meth:`~SimulatedBoard.stats`
has ``cycles`` and ``seconds``).

The host side. At most ``host_buffer`` response bytes may wait unread (an FTDI chip's buffer and
the kernel's): a board byte that finds them full is DROPPED and counted in ``host_overruns``, so a
host that writes without reading is caught as a real board would catch it. Host bytes the line
cannot take yet wait in the kernel, and the host's ``write`` blocks when that is full.

Counters (:meth:`~SimulatedBoard.stats`): ``cycles``; ``host_bytes`` (taken from the host),
``line_bytes`` (frames driven on ``rx``), ``board_bytes`` (frames decoded from ``tx``),
``host_delivered`` (written to the pty); ``rx_overflow``, the times the board's sticky
``link_error`` rose (its RX FIFO overflowed or a frame had no stop bit); ``host_overruns``;
``resyncs`` (pulses of the bridge's ``resync``, when the gateware has that port); fault
bookkeeping (``faults_applied``, ``deaf_dropped``); ``rx_pending`` / ``tx_pending``, bytes
waiting here for the line / for the host; ``clocking`` (0 while asleep, see below); the levels of
``busy``, ``error``, ``link_error`` (and ``armed``); ``seconds`` since the start and
``clock_seconds`` spent clocking.

Faults (:meth:`~SimulatedBoard.inject`), numbered from 0 since the board started: host byte ``N``
is the ``N``-th byte the host wrote (``stats()["host_bytes"]`` is the next number), board byte
``N`` the ``N``-th frame the board sent (``stats()["board_bytes"]``). ``drop_host`` /
``corrupt_host`` lose byte ``N`` or XOR it with ``mask`` before it reaches the line;
``drop_board`` / ``corrupt_board`` do the same on the way back; ``deaf`` forwards no board byte
from number ``N`` on until :meth:`~SimulatedBoard.recover`.

Clocking policy. The simulator clocks freely while anything is in flight -- host bytes waiting
for the line, a frame on either line, the accelerator working (``busy`` and not ``starved``:
:class:`ObservedBoardCore`; a LOAD waiting for the rest of its data is busy but starved, and
clocking it changes nothing) -- and then for ``idle_cycles`` more. If the gateware has the
bridge's ``armed`` output (its silence-resync count is running) it also clocks as long as that is
high, so that a pending resync fires; with ``resync`` but no ``armed``, ``idle_cycles`` covers the
whole resync silence. Then it sleeps in ``poll()`` on the pty and the control channel until one
of them speaks: an idle board, or one that waits for the host, burns no CPU. Bytes waiting for
the host to read are passed on every millisecond while asleep.

The process is built once per change of the gateware (cached like the RTL backend's simulator,
:mod:`tinyaccel.sim.build_cache`) and never outlives its Python object: :meth:`close`, garbage
collection and interpreter exit all end it, and it exits by itself when its parent dies.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .. import boards, hw
from ..boards.board import UARTAccelerator, default_accelerator
from ..boards.link import BITS_PER_BYTE, LinkSpec, board_for_config, link_for
from ..boards.uart import MIN_DIVISOR
from ..errors import ConfigError, SimulatorError
from ..hw.config import AccelConfig, get_config
from .build_cache import KEEP_BUILDS, MAKE_VARS, _locked, build_root, source_hash
from .toolchain import have_lz4, native_flags, setup_environment

__all__ = ["FAULT_KINDS", "ObservedBoardCore", "BoardSimBuild", "build_board_sim",
           "SimulatedBoard", "measure_speed"]

#: What :meth:`SimulatedBoard.inject` can do to a byte.
FAULT_KINDS = ("drop_host", "corrupt_host", "drop_board", "corrupt_board", "deaf")

TOP_MODULE = "board_top"
HARNESS_FILE = "board_sim.cpp"
#: Ports the harness drives or reads; ``resync`` and ``armed`` are used when the gateware has
#: them.
REQUIRED_PORTS = frozenset({"clk", "rst", "rx", "tx", "busy", "error", "link_error", "starved"})
OPTIONAL_PORTS = ("resync", "armed")

#: Verilator flags: those of the RTL backend's build (sim/build_cache.py) without the cocotb
#: wrapper's --timing.
VERILATOR_ARGS = [
    "-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-lint", "-Wno-style",
    "-O3", "--x-assign", "fast", "--x-initial", "fast",
]

#: Byte times the simulator keeps clocking after everything has settled (the last response
#: byte leaves the narrower a cycle after the accelerator drops ``busy``: this is margin).
IDLE_MARGIN_BYTES = 64

#: Wall time of a first build on the 2-core machine beside other jobs (measured: ice40 16-54 s,
#: ecp5 57-204 s). Quoted by the notice until the cache holds a build of the configuration.
TYPICAL_BUILD_S = 120

#: Seconds to wait for the harness to start or to answer a control command.
CONTROL_TIMEOUT_S = 30.0

_BUILD_FORMAT = 1  # bump when the layout of a build directory changes


@dataclass(frozen=True)
class BoardSimBuild:
    """A built simulated board (see :func:`build_board_sim`)."""

    config: AccelConfig
    link: LinkSpec
    divisor: int
    build_dir: Path
    ports: frozenset[str]
    wave_format: str | None

    @property
    def binary(self) -> Path:
        return self.build_dir / "obj" / "board_sim"

    @property
    def silence_cycles(self) -> int | None:
        """The resync silence the gateware was built with (``None``: it has no resync)."""
        return self.link.silence_cycles(self.divisor) if "resync" in self.ports else None


def _harness_text() -> str:
    return resources.files(__package__).joinpath(HARNESS_FILE).read_text()


def _board_root() -> Path:
    return build_root() / "board"


class ObservedBoardCore(wiring.Component):
    """``UARTAccelerator`` at the board's FIFO depth (with the link's resync silence when the
    class takes one), its ports unchanged, and one output more for the harness's clock policy.

    Members
    -------
    starved : Out(1)
        The accelerator would take a host beat and none is offered: when it is ``busy`` like
        this, it waits for the host (the rest of a LOAD, the next instruction) and clocking it
        changes nothing until the host sends more.
    """

    def __init__(self, config: AccelConfig, link: LinkSpec, divisor: int):
        self._accelerator = default_accelerator(config)
        kwargs = {"fifo_depth": link.rx_fifo_bytes,
                  "accelerator": lambda _config: self._accelerator}
        if "silence_cycles" in inspect.signature(UARTAccelerator).parameters:
            kwargs["silence_cycles"] = link.silence_cycles(divisor)
        self._core = UARTAccelerator(config, divisor, **kwargs)
        super().__init__({**self._core.signature.members, "starved": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.core = core = self._core
        for name, member in self._core.signature.members.items():
            if member.flow == In:
                m.d.comb += getattr(core, name).eq(getattr(self, name))
            else:
                m.d.comb += getattr(self, name).eq(getattr(core, name))
        beats = self._accelerator.i_stream
        m.d.comb += self.starved.eq(beats.ready & ~beats.valid)
        return m


def _ports(verilog: str) -> frozenset[str]:
    """The port names of module ``board_top`` in ``verilog``."""
    found = re.search(rf"^module {TOP_MODULE}\(([^)]*)\);", verilog, re.MULTILINE)
    if found is None:
        raise SimulatorError(f"the generated Verilog has no module {TOP_MODULE}")
    return frozenset(p.strip() for p in found.group(1).split(",") if p.strip())


def _announce(config: AccelConfig, link: LinkSpec, divisor: int, where: Path) -> None:
    from tqdm import tqdm  # writes between the lines of any progress bar on the screen

    records = []
    for record in _board_root().glob(f"{config.name}-*/build.json"):
        try:
            records.append((record.stat().st_mtime, json.loads(record.read_text())["seconds"]))
        except (OSError, ValueError, KeyError):
            continue
    seconds = max(records)[1] if records else None
    took = (f"about {TYPICAL_BUILD_S} s on a busy 2-core machine" if seconds is None
            else f"the previous build of {config.name} here took {seconds:.0f} s")
    tqdm.write(f"tinyaccel: building the simulated board ({config.name!r} accelerator behind the "
               f"UART bridge, divisor {divisor}, {link.rx_fifo_bytes}-byte RX FIFO) with "
               f"Verilator, once per gateware change: {took}; cached in {where}", file=sys.stderr)


def build_board_sim(config: str | AccelConfig, *, link: LinkSpec, divisor: int,
                    waves: bool = False) -> BoardSimBuild:
    """Build (or find in the cache) the simulated board of ``config`` on ``link``.

    The cache key covers the sources of ``tinyaccel.hw`` and ``tinyaccel.boards``, the
    configuration, the divisor, the link, the harness, the flags and the tool versions; a hit
    costs no Verilog generation.

    Raises
    ------
    BackendUnavailable
        Verilator or a C++ compiler is missing.
    SimulatorError
        The gateware lacks a port the harness needs, or Verilator / the compiler failed (the
        message quotes the end of the build log).
    """
    config = get_config(config)
    setup_environment()
    native_args, cpu = native_flags()
    wave_format = ("fst" if have_lz4() else "vcd") if waves else None
    args = VERILATOR_ARGS + native_args + {"fst": ["--trace-fst"], "vcd": ["--trace"]}.get(
        wave_format, [])
    makeflags = " ".join(f"{k}={v}" for k, v in MAKE_VARS.items())
    harness = _harness_text()
    link_text = json.dumps({"baud": link.baud, "rx_fifo_bytes": link.rx_fifo_bytes,
                            "silence_bytes": link.silence_bytes}, sort_keys=True)
    h = hashlib.sha256()
    for part in (source_hash(hw, boards), json.dumps(config.as_dict(), sort_keys=True),
                 str(divisor), link_text, harness, " ".join(args), makeflags,
                 importlib.metadata.version("verilator"), str(_BUILD_FORMAT), cpu):
        h.update(part.encode())
        h.update(b"\0")
    name = f"{config.name}-d{divisor}-{h.hexdigest()[:16]}" + ("-waves" if waves else "")
    build_dir = _board_root() / name
    done = build_dir / "build.ok"
    with _locked(_board_root() / f"{name}.lock"):
        if not done.exists():
            _build(config, link, divisor, args, makeflags, harness, wave_format, build_dir)
    info = json.loads((build_dir / "build.json").read_text())
    _prune(config.name, waves)
    return BoardSimBuild(config, link, divisor, build_dir, frozenset(info["ports"]), wave_format)


def _build(config, link, divisor, args, makeflags, harness, wave_format, build_dir) -> None:
    from amaranth.back import verilog

    _announce(config, link, divisor, build_dir)
    t0 = time.monotonic()
    if build_dir.exists():
        shutil.rmtree(build_dir)
    src = build_dir / "src"
    src.mkdir(parents=True)
    text = verilog.convert(ObservedBoardCore(config, link, divisor), name=TOP_MODULE,
                           emit_src=False)
    ports = _ports(text)
    missing = REQUIRED_PORTS - ports
    if missing:
        raise SimulatorError(f"UARTAccelerator({config.name}) has no port(s) "
                             f"{', '.join(sorted(missing))}; the harness needs "
                             f"{', '.join(sorted(REQUIRED_PORTS))}")
    (src / f"{TOP_MODULE}.v").write_text(text)
    (src / HARNESS_FILE).write_text(harness)
    defines = [f"-DHAS_{p.upper()}" for p in OPTIONAL_PORTS if p in ports]
    if wave_format:
        defines.append(f"-DTRACE_{wave_format.upper()}")
    cmd = ["verilator", "--cc", "--exe", "--build", "--build-jobs", "2",
           "--top-module", TOP_MODULE, "-Mdir", "obj", "-o", "board_sim", *args]
    for d in defines:
        cmd += ["-CFLAGS", d]
    cmd += [f"src/{TOP_MODULE}.v", f"src/{HARNESS_FILE}"]
    env = dict(os.environ)
    env["MAKEFLAGS"] = f"{env['MAKEFLAGS']} {makeflags}" if env.get("MAKEFLAGS") else makeflags
    log = build_dir / "build.log"
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=build_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SimulatorError(f"Verilator build of the simulated board ({config.name}) failed "
                             f"(exit {done.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    (build_dir / "build.json").write_text(json.dumps({
        "config": config.as_dict(), "divisor": divisor,
        "link": {"baud": link.baud, "rx_fifo_bytes": link.rx_fifo_bytes,
                 "silence_bytes": link.silence_bytes},
        "ports": sorted(ports), "args": args, "defines": defines,
        "seconds": round(time.monotonic() - t0, 1)}, indent=1))
    for pch in (build_dir / "obj").glob("*.gch"):
        pch.unlink()
    (build_dir / "build.ok").write_text("ok\n")


def _prune(name: str, waves: bool) -> None:
    """Keep the ``KEEP_BUILDS`` newest completed board builds of configuration ``name`` (with
    or without waveform tracing)."""
    builds = sorted(((d / "build.ok").stat().st_mtime, d) for d in _board_root().glob(f"{name}-*")
                    if d.is_dir() and (d / "build.ok").exists()
                    and d.name.endswith("-waves") == waves)
    for _, d in builds[:-KEEP_BUILDS]:
        shutil.rmtree(d, ignore_errors=True)
        (_board_root() / f"{d.name}.lock").unlink(missing_ok=True)


def _stop(proc: subprocess.Popen, log) -> None:
    """End the harness process and close its files (the finalizer of :class:`SimulatedBoard`)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout, log):
        try:
            f.close()
        except OSError:  # a command still buffered for a process that is gone
            pass


class SimulatedBoard:
    """The board gateware of ``config`` in Verilator, its UART on a pseudo-terminal.

    Parameters
    ----------
    config:
        Preset name or :class:`AccelConfig` of the accelerator.
    link:
        The host link; defaults to the link of the board that runs ``config``
        (:func:`~tinyaccel.boards.link.link_for`): its RX FIFO depth and resync silence are built
        in, its ``baud`` is what :attr:`baud` reports.
    divisor:
        Clock cycles per UART bit in the simulation (a board uses 30 or 40; the line protocol is
        the same at any divisor >= 4, and a small one runs faster).
    seed:
        Seeds the phase of host frames after an idle line.
    host_buffer:
        Response bytes the host side holds unread before it drops one (``host_overruns``).
    waves:
        Trace every clocked cycle to :attr:`wave_path` (FST, or VCD without lz4).

    Raises
    ------
    ConfigError
        A parameter out of range, or no board runs ``config`` and no ``link`` is given.
    BackendUnavailable
        Verilator or a C++ compiler is missing.
    SimulatorError
        The build failed or the process did not start (the message quotes its log).
    """

    def __init__(self, config: str | AccelConfig = "ice40", *, link: LinkSpec | None = None,
                 divisor: int = 4, seed: int = 0, host_buffer: int = 4096, waves: bool = False):
        self.config = get_config(config)
        self.link = self.default_link(self.config) if link is None else link
        if not isinstance(divisor, int) or divisor < MIN_DIVISOR:
            raise ConfigError(f"simulated board: divisor={divisor!r} must be an int >= "
                              f"{MIN_DIVISOR}")
        if not isinstance(host_buffer, int) or host_buffer < 1:
            raise ConfigError(f"simulated board: host_buffer={host_buffer!r} must be an int >= 1")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"simulated board: seed={seed!r} must be an int >= 0")
        self.divisor = divisor
        self.build = build_board_sim(self.config, link=self.link, divisor=divisor, waves=waves)
        margin = IDLE_MARGIN_BYTES * BITS_PER_BYTE * divisor
        silence = self.build.silence_cycles
        #: Cycles clocked after everything settled (see the module docstring).
        self.idle_cycles = (silence + margin if silence is not None
                            and "armed" not in self.build.ports else margin)
        self.wave_path: Path | None = None
        cmd = [str(self.build.binary), "--divisor", str(divisor), "--host-buffer",
               str(host_buffer), "--idle-cycles", str(self.idle_cycles), "--seed", str(seed)]
        if waves:
            fd, name = tempfile.mkstemp(prefix=f"board-sim-{self.config.name}-",
                                        suffix=f".{self.build.wave_format}",
                                        dir=self.build.build_dir)
            os.close(fd)
            self.wave_path = Path(name)
            cmd += ["--waves", name]
        self._log = tempfile.TemporaryFile()
        self._lock = threading.Lock()  # one command at a time on the control channel
        self._pending = b""
        self._closed = False
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._log)
        except OSError as exc:
            self._log.close()
            raise SimulatorError(f"cannot start the simulated board {cmd[0]}: {exc}") from None
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._log)
        hello = self._receive("start")
        self.port: str = hello["port"]

    @staticmethod
    def default_link(config: str | AccelConfig) -> LinkSpec:
        """The link of the board that runs ``config`` by default."""
        return link_for(board_for_config(get_config(config).name))

    # -- the control channel ----------------------------------------------------------------------

    def _fail(self, what: str) -> SimulatorError:
        """Stop the process; the error quotes its exit code and the end of its log."""
        if self._proc.poll() is None:
            self._proc.kill()
        code = self._proc.wait()
        self._log.seek(0)
        tail = self._log.read()[-4000:].decode(errors="replace")
        self._closed = True
        self._finalizer()
        return SimulatorError(f"simulated board ({self.config.name}, {self.build.binary}) {what}"
                              f" (exit code {code}); its log:\n{tail}")

    def _receive(self, what: str) -> dict:
        """The next line of the control channel, as a dict."""
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"did not answer {what!r} within {CONTROL_TIMEOUT_S:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self._proc.wait()
                    raise self._fail(f"exited before answering {what!r}")
                self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def _command(self, refusal: type[Exception] = SimulatorError, **fields) -> dict:
        """Send one command; its answer, or ``refusal`` raised with the harness's reason."""
        with self._lock:
            if self._closed:
                raise SimulatorError(f"simulated board on {self.port} is closed")
            try:
                self._proc.stdin.write((json.dumps(fields) + "\n").encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                raise self._fail(f"is gone (command {fields['cmd']!r})") from None
            answer = self._receive(fields["cmd"])
        if "refused" in answer:
            raise refusal(f"simulated board on {self.port} refused {fields}: {answer['refused']}")
        return answer

    # -- public API -------------------------------------------------------------------------------

    @property
    def baud(self) -> int:
        """The rate to open :attr:`port` at: the board's (the simulation runs in cycles)."""
        return self.link.baud

    @property
    def ports(self) -> frozenset[str]:
        """The gateware's ports (``resync``, ``armed`` when the bridge has them)."""
        return self.build.ports

    def stats(self) -> dict:
        """The harness's counters now (see the module docstring)."""
        return self._command(cmd="stats")

    def inject(self, kind: str, at: int, mask: int | None = None) -> None:
        """Arm a fault on byte number ``at`` (from 0 since the board started).

        ``kind`` is one of :data:`FAULT_KINDS`; ``mask`` (1..255, default 0xFF) is the XOR of the
        ``corrupt_*`` kinds and is refused with the others.

        Raises
        ------
        ConfigError
            An unknown kind, a negative ``at``, a byte that has passed already, a mask out of
            range or given where none applies.
        """
        if kind not in FAULT_KINDS:
            raise ConfigError(f"fault kind {kind!r} is not one of {', '.join(FAULT_KINDS)}")
        if not isinstance(at, int) or at < 0:
            raise ConfigError(f"fault {kind}: at={at!r} must be a byte number >= 0")
        corrupt = kind.startswith("corrupt")
        if mask is not None and not corrupt:
            raise ConfigError(f"fault {kind} takes no mask (got mask={mask!r})")
        if corrupt:
            mask = 0xFF if mask is None else mask
            if not isinstance(mask, int) or not 1 <= mask <= 0xFF:
                raise ConfigError(f"fault {kind}: mask={mask!r} must be an int in 1..255")
        self._command(ConfigError, cmd="inject", kind=kind, at=at, mask=mask or 0)

    def recover(self) -> None:
        """End a ``deaf`` fault: board bytes reach the host again."""
        self._command(cmd="recover")

    def close(self) -> None:
        """Stop the simulator (the pty disappears with it). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._proc.stdin.write(b'{"cmd": "quit"}\n')
                self._proc.stdin.flush()
                self._proc.wait(timeout=5)
            except (BrokenPipeError, ValueError, subprocess.TimeoutExpired):
                pass
            self._finalizer()

    def __enter__(self) -> SimulatedBoard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.port
        return (f"SimulatedBoard({self.config.name!r}, divisor={self.divisor}, "
                f"rx_fifo_bytes={self.link.rx_fifo_bytes}, {state})")


#: Cycles of GEMMs :func:`measure_speed` times (at least).
GEMM_CYCLES = 2_000_000


def measure_speed(config: str | AccelConfig = "ice40", *, divisor: int = 4,
                  payload_bytes: int = 64 * 1024) -> dict:
    """Speed of the simulated board of ``config`` at ``divisor``, through pyserial.

    ``cycles_per_s``: the clock rate while GEMMs run and nothing is on the line;
    ``in_bytes_per_s`` / ``out_bytes_per_s``: host bytes per wall second through the pty for a
    stream of LOADs (host -> board) and of STOREs (board -> host) of ``payload_bytes``, each
    answered by a SYNC; ``*_cycles_per_s`` the clock rate meanwhile (the line then is the work:
    ``BITS_PER_BYTE * divisor`` cycles a byte).
    """
    import numpy as np
    import serial

    from ..hw.isa import Buffer
    from ..protocol import Program, lanes
    from .golden import GoldenMachine

    config = get_config(config)
    golden = GoldenMachine(config)
    result = {"config": config.name, "divisor": divisor}
    with SimulatedBoard(config, divisor=divisor) as board, serial.Serial(
            board.port, baudrate=board.baud, timeout=600) as port:

        def timed(prog: Program) -> tuple[int, float, int]:
            """(bytes written, wall seconds, cycles) of one program, read while written."""
            stream = prog.to_bytes()
            want = golden.run(stream)
            before = board.stats()["cycles"]
            t0 = time.monotonic()
            writer = threading.Thread(target=port.write, args=(stream,))
            writer.start()
            got = port.read(len(want))
            writer.join()
            wall = time.monotonic() - t0
            if got != want[:len(got)] or len(got) != len(want):
                raise SimulatorError(f"simulated board {config.name}: the speed program's "
                                     f"answer differs from the golden model's")
            return len(stream), wall, board.stats()["cycles"] - before

        rng = np.random.default_rng(0)
        words = config.depth(Buffer.WGT)
        data = rng.integers(-128, 128, (words, lanes(config, Buffer.WGT))).astype(np.int8)
        k, m = 64, min(8, config.inp_depth // 64)
        n = min(config.wgt_depth // k, config.acc_depth // (m * config.rows))
        gemms = Program(config).load(Buffer.WGT, 0, data)
        timed(gemms.sync())
        gemms = Program(config)
        for _ in range(board.link.rx_fifo_bytes // 64):  # their words fit the RX FIFO
            gemms.gemm(0, 0, 0, k, m, n)
        gemms.sync()
        cycles = wall = 0
        while cycles < GEMM_CYCLES:
            _, more_wall, more = timed(gemms)
            cycles, wall = cycles + more, wall + more_wall
        result.update(gemm_cycles=cycles, cycles_per_s=cycles / wall)
        loads, stores = Program(config), Program(config)
        reps = max(1, payload_bytes // (words * config.word_bytes(Buffer.WGT)))
        for _ in range(reps):
            loads.load(Buffer.WGT, 0, data)
            stores.store(Buffer.WGT, 0, words)
        sent, wall, cycles = timed(loads.sync())
        result.update(in_bytes=sent, in_bytes_per_s=sent / wall, in_cycles_per_s=cycles / wall)
        out = reps * words * config.word_bytes(Buffer.WGT)
        _, wall, cycles = timed(stores.sync())
        result.update(out_bytes=out, out_bytes_per_s=out / wall,
                      out_cycles_per_s=cycles / wall)
        stats = board.stats()
        result.update(rx_overflow=stats["rx_overflow"], host_overruns=stats["host_overruns"])
    return result
