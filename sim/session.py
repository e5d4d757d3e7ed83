"""The simulator session: one running Verilator simulator that executes programs on request.

Speed comes from doing no Python work per simulated cycle. The Verilog of
``tinyaccel.hw.top.Accelerator`` is wrapped in ``tinyaccel_tb.sv`` (shipped beside this module),
which runs its own clock (Verilator ``--timing``), holds the whole host -> accelerator byte stream
in a memory, feeds ``i_stream`` from it (with optional LFSR idle gaps), captures ``o_stream`` into
a second memory (with optional LFSR back-pressure) and raises ``done`` when the program is over or
a watchdog fires. A program is therefore one ``$fread`` (of a binary file), one wait for the
wrapper's ``done_seq`` and one ``$writememh`` (see :mod:`tinyaccel.sim.stream_files`). The
wrapper clocks the accelerator in bursts of up to 1000 cycles per simulator time slot, so the
simulator's per-slot work (timing scheduler, cocotb's VPI callbacks) is paid per burst, and the
signals cocotb only reads are read-only to VPI, so Verilator evaluates the design once per cycle
and nothing of it outside the clocked region.

One simulator process serves many programs. :class:`RtlSession` builds the simulator (cached,
see :func:`tinyaccel.sim.build_cache.build`), opens a Unix socket, and starts the simulator
through the cocotb runner with the ``serve`` test of :mod:`tinyaccel.sim.accel_tests`, which
connects back and then executes commands. The parent writes the input file itself and reads the
output hex file itself, so the messages on the socket are a few integers per program. The
simulator (with its scratchpads and counters) lives as long as the session: successive programs
see the state the previous ones left, exactly as a board does. ``reset()`` pulses the
accelerator's reset between programs when wanted; a watchdog timeout resets it automatically.

Waveforms: ``TINYACCEL_WAVES=1`` (or ``waves=True``) builds with tracing and writes the whole
session to ``dump.fst`` in the session directory (:attr:`RtlSession.wave_file`; the directory is
kept). Verilator's FST writer needs the lz4 headers (Debian ``liblz4-dev``); without them the
build falls back to VCD (``dump.vcd``) and says so. Tracing is compiled only into these separate
``-waves`` builds, which also clock the wrapper with two time slots per cycle (no bursts) so that
the waveform shows the clock's edges.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from pathlib import Path

from ..errors import ConfigError, ProtocolError, SimulatorError, SimulatorHang
from ..hw.config import AccelConfig, get_config
from ..hw.isa import Opcode
from ..protocol import decode_fields, iter_stream
from .build_cache import TB_TOPLEVEL, RtlBuild, build
from .stream_files import decode_output_dump, encode_input_file

__all__ = ["RtlResult", "RtlSession", "estimate_work", "run_cocotb_tests"]


@dataclass
class RtlResult:
    """What one program did on the RTL.

    ``data`` is every byte the accelerator sent. ``cycles`` counts clock cycles from the start
    of the program to the last beat that moved on either stream (host transfers included);
    ``sim_cycles`` all cycles simulated (with the final quiet window). ``error_pin`` tells whether
    the ``error`` output was high at any cycle, ``busy_at_end`` whether ``busy`` still was.
    """
    data: bytes
    cycles: int
    sim_cycles: int
    wall_s: float
    timed_out: bool = False
    error_pin: bool = False
    busy_at_end: bool = False
    in_bytes_taken: int = 0
    sim_cpu_s: float = 0.0  # CPU time the simulator process spent on this program

    @property
    def cycles_per_s(self) -> float:
        """Simulated cycles per second of wall time (file transfers included)."""
        return self.sim_cycles / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cycles_per_cpu_s(self) -> float:
        """Simulated cycles per second of the simulator's CPU time (insensitive to load)."""
        return self.sim_cycles / self.sim_cpu_s if self.sim_cpu_s > 0 else 0.0


def estimate_work(config: AccelConfig, stream: bytes) -> int:
    """A generous bound on the cycles of the longest compute instruction in ``stream``.

    Walks the host stream with the protocol's parser (LOAD data skipped) and returns the largest
    cycle estimate of one GEMM, PATCH, DILATE, REQUANT, SGQ, IM2COL or STORE; sizes the hang
    watchdog.
    A stream that ends early (a hang test) is estimated up to where it ends.
    """
    worst = 0
    try:
        for word, _ in iter_stream(config, stream):
            code, f = decode_fields(word)
            if code == Opcode.GEMM.value:
                work = f["m_blocks"] * f["n_blocks"] * (f["k"] + 4 * config.rows + 64)
            elif code == Opcode.PATCH.value:  # compare 2k, copy k, scan and MASK per group
                work = f["blocks"] * (f["k"] * 3 + 64)
            elif code == Opcode.DILATE.value:  # a read per window row (two if it straddles)
                work = f["out_h"] * f["out_w"] * (2 * f["kh"] + 4) + 64
            elif code == Opcode.REQUANT.value:
                work = f["count"] * (config.cols + 64)
            elif code == Opcode.SGQ.value:
                # the serial design: three passes at a value per cycle, then a cycle for t and
                # up to 8 code bits per value; per stripe (at most one a word) two decisions of
                # up to 8 shifts, up to 9 size additions, a 14-bit header; then length, base,
                # padding and the CRC trailer a bit per cycle
                work = f["count"] * (12 * config.cols + 64) + 4 * config.host_width + 128
            elif code == Opcode.STORE.value:
                work = f["count"] * 8
            elif code == Opcode.IM2COL.value:
                # the serial design: ~20 cycles a tap value; with pool as many taps (kh*kw a
                # value of the m_blocks*channels words), so the same bound
                work = f["m_blocks"] * f["kh"] * f["kw"] * f["channels"] * (24 * config.rows + 8)
            else:
                work = 0
            worst = max(worst, work)
    except ProtocolError:  # truncated: the instructions before the cut are counted
        pass
    return worst


def _gap(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"gap probability {p} must be in [0, 1)")
    return int(round(p * 65536))


@dataclass
class _Stats:
    programs: int = 0
    sim_cycles: int = 0
    wall_s: float = 0.0
    launches: int = 0
    extra: dict = field(default_factory=dict)


class RtlSession:
    """One running simulator of ``config`` that executes programs on request.

    Parameters
    ----------
    config:
        Preset name or :class:`AccelConfig`.
    valid_gap, ready_gap:
        Default probability of an idle cycle between input beats and of back-pressure on the
        output (0 = full rate). ``run`` may override them per program.
    seed:
        Seed of the wrapper's gap generators.
    waves:
        Record an FST waveform of the whole session (``None``: read ``TINYACCEL_WAVES``).
    verilog:
        Verilog text to simulate instead of the generated accelerator (see :func:`build`).
    workdir:
        Folder for the session's files (default: a fresh temporary folder, removed on close).
    chunk_bytes:
        Stream at most this many bytes per direction through the wrapper's memories at a time
        (default: their capacity, 8 MiB). Small values exercise the chunking.

    Use as a context manager, or call :meth:`close`. ``run`` may be called any number of times;
    the simulator starts on the first call and serves every later one (no rebuild, no relaunch;
    a few milliseconds of overhead per program). The driver's RTL backend
    (:class:`tinyaccel.sw.runtime.RtlBackend`) is one such session.

    Raises
    ------
    BackendUnavailable
        Verilator, cocotb or a C++ compiler is missing (when the session starts).
    SimulatorError
        The build failed, or the simulator did not start, answer or stay alive.
    """

    def __init__(self, config: str | AccelConfig, *, valid_gap: float = 0.0,
                 ready_gap: float = 0.0, seed: int = 1, waves: bool | None = None,
                 verilog: str | None = None, workdir: str | Path | None = None,
                 start_timeout: float = 120.0, chunk_bytes: int | None = None):
        self.config = get_config(config)
        self.valid_gap = valid_gap
        self.ready_gap = ready_gap
        self.seed = seed
        self._waves = waves
        self._verilog = verilog
        self._workdir_arg = workdir
        self._start_timeout = start_timeout
        self._chunk_bytes = chunk_bytes
        self.build: RtlBuild | None = None
        self.stats = _Stats()
        self.last_result: RtlResult | None = None
        self._conn = None
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self._tmp: Path | None = None  # the temporary session folder we made
        self._wave_path: Path | None = None
        self._sim_pid: int | None = None
        self._sim_exit: BaseException | None = None
        self._runs = 0

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._conn is not None

    @property
    def workdir(self) -> Path:
        if self._workdir_arg is not None:
            return Path(self._workdir_arg)
        assert self._tmp is not None, "session not started"
        return self._tmp

    @property
    def log_file(self) -> Path:
        return self.workdir / "sim.log"

    @property
    def wave_file(self) -> Path | None:
        """The waveform of the session (kept after :meth:`close`), or None without waves."""
        return self._wave_path

    def start(self) -> RtlSession:
        """Build if needed and launch the simulator (idempotent)."""
        if self._conn is not None:
            return self
        if self.build is None:
            self.build = build(self.config, waves=self._waves, verilog=self._verilog)
        if self._workdir_arg is None and self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"tinyaccel-rtl-{self.config.name}-"))
        workdir = self.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        fmt = self.build.wave_format
        self._wave_path = workdir / f"dump.{fmt}" if fmt else None
        self._in_file = workdir / "in.bin"
        self._out_file = workdir / "out.hex"
        sock = workdir / "session.sock"
        sock.unlink(missing_ok=True)
        key = secrets.token_bytes(16)
        self._listener = Listener(str(sock), family="AF_UNIX", authkey=key)
        self._sim_exit = None
        env = {"TINYACCEL_RTL_SERVER": str(sock), "TINYACCEL_RTL_KEY": key.hex()}
        plusargs = [f"+TB_IN={self._in_file}", f"+TB_OUT={self._out_file}"]
        test_args = ["--trace-file", str(self.wave_file)] if self.build.waves else []
        self._thread = threading.Thread(target=self._simulate, args=(env, plusargs, test_args),
                                        name=f"verilator-{self.config.name}", daemon=True)
        self._thread.start()
        self._conn = self._accept()
        hello = self._recv(self._start_timeout)
        self._sim_pid = hello["pid"]
        self.stats.launches += 1
        return self

    def _simulate(self, env: dict, plusargs: list[str], test_args: list[str]) -> None:
        from cocotb_tools.runner import get_runner
        runner = get_runner("verilator")
        try:
            runner.test(test_module="tinyaccel.sim.accel_tests", testcase="serve",
                        hdl_toplevel=TB_TOPLEVEL, hdl_toplevel_lang="verilog",
                        build_dir=self.build.build_dir,
                        test_dir=self.workdir, extra_env=env, plusargs=plusargs,
                        test_args=test_args, waves=self.build.waves,
                        results_xml=str(self.workdir / "results.xml"), log_file=self.log_file)
        except BaseException as exc:  # noqa: BLE001 - reported by the waiting side
            self._sim_exit = exc

    def _accept(self):
        """Accept the simulator's connection, giving up if it dies first."""
        listener = self._listener
        result = {}

        def accept():
            try:
                result["conn"] = listener.accept()
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        deadline = time.monotonic() + self._start_timeout
        while t.is_alive():
            t.join(0.05)
            if not self._thread.is_alive() or time.monotonic() > deadline:
                listener.close()
                t.join(1)
                raise SimulatorError(f"simulator for {self.config.name} did not start "
                                   f"({self._sim_exit!r}); log {self.log_file}:\n"
                                   f"{self._log_tail()}")
        if "conn" not in result:
            raise SimulatorError(f"simulator connection failed: {result.get('error')}")
        return result["conn"]

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_file.read_text()[-n:]
        except OSError:
            return "(no log)"

    def _recv(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._conn.poll(0.05):
            if not self._thread.is_alive() and not self._conn.poll(0):
                self._teardown()
                raise SimulatorError(f"simulator for {self.config.name} exited:\n"
                                   f"{self._log_tail()}")
            if deadline is not None and time.monotonic() > deadline:
                self._kill()
                raise SimulatorError(f"simulator for {self.config.name} did not answer in "
                                   f"{timeout} s; killed it")
        try:
            return self._conn.recv()
        except EOFError:
            self._teardown()
            raise SimulatorError(f"simulator for {self.config.name} closed the connection:\n"
                               f"{self._log_tail()}") from None

    def _command(self, msg: dict, timeout: float | None = None) -> dict:
        self._conn.send(msg)
        return self._recv(timeout)

    def _teardown(self) -> None:
        for obj in (self._conn, self._listener):
            if obj is not None:
                try:
                    obj.close()
                except OSError:
                    pass
        self._conn = None
        self._listener = None

    def _kill(self) -> None:
        import signal
        if self._sim_pid is not None:
            try:
                os.kill(self._sim_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._teardown()
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        """Stop the simulator (it finishes its log and waveform) and remove temporary files."""
        if self._conn is not None:
            try:
                self._conn.send({"op": "quit"})
                self._recv(30)
            except (RuntimeError, OSError):
                pass
            self._teardown()
        if self._thread is not None:
            self._thread.join(30)
            if self._thread.is_alive():
                self._kill()
            self._thread = None
        if self._tmp is not None:
            keep = os.environ.get("TINYACCEL_KEEP_RTL_RUNS", "") not in ("", "0")
            if not keep and not (self.build and self.build.waves):
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> RtlSession:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if self._conn is not None:
            try:
                self.close()
            except Exception:  # noqa: BLE001, S110
                pass

    # -- programs -----------------------------------------------------------------------

    def _sim_cpu(self) -> float:
        """CPU seconds (user + system) the simulator process has used so far."""
        try:
            with open(f"/proc/{self._sim_pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def reset(self) -> None:
        """Hold the accelerator in reset for 8 cycles (scratchpad contents survive)."""
        self.start()
        self._command({"op": "reset"})

    def run(self, stream: bytes, expected_out_bytes: int | None = None, **kwargs) -> bytes:
        """Send ``stream`` to the accelerator and return every byte it sent back.

        See :meth:`run_result` for the arguments; the full record of the last program is in
        :attr:`last_result`.
        """
        return self.run_result(stream, expected_out_bytes, **kwargs).data

    def run_result(self, stream: bytes, expected_out_bytes: int | None = None, *,
                   valid_gap: float | None = None, ready_gap: float | None = None,
                   seed: int | None = None, watchdog: int | None = None,
                   reset: bool = False) -> RtlResult:
        """Execute one program (``stream``: instruction words and LOAD data, host order).

        Parameters
        ----------
        expected_out_bytes:
            How many bytes the program answers with. The run ends once they have arrived, the
            input is consumed, ``busy`` is low and the output stayed silent for 64 cycles (so a
            surplus is caught). ``None``: end when the input is consumed, ``busy`` is low and
            the output is silent.
        valid_gap, ready_gap, seed:
            Override the session's stream gap probabilities; ``seed`` alone then fixes the gap
            pattern (by default it follows from the session seed and the run count).
        watchdog:
            Cycles without any beat moving before the run is declared hung (default: from an
            estimate of the program's compute).
        reset:
            Pulse the accelerator's reset first.

        Raises
        ------
        SimulatorHang
            The watchdog fired; the accelerator was reset afterwards.
        ProtocolError
            The stream (or expected length) is not a whole number of host beats.
        """
        bb = self.config.beat_bytes
        if len(stream) % bb:
            raise ProtocolError(f"stream of {len(stream)} bytes is not a whole number of "
                                f"{bb}-byte host beats")
        if expected_out_bytes is not None and expected_out_bytes % bb:
            raise ProtocolError(f"expected_out_bytes={expected_out_bytes} is not a whole number "
                                f"of {bb}-byte host beats")
        self.start()
        if reset:
            self.reset()
        if watchdog is None:  # three queued compute instructions can keep the streams still
            watchdog = min(50_000 + 4 * estimate_work(self.config, stream), 1 << 26)
        watchdog = min(watchdog, 2 ** 32 - 1)
        self._runs += 1
        base = {
            "valid_gap": _gap(self.valid_gap if valid_gap is None else valid_gap),
            "ready_gap": _gap(self.ready_gap if ready_gap is None else ready_gap),
            # An explicit seed alone fixes the gap pattern (replayable in a fresh session).
            "seed": ((seed * 0x9E3779B1 if seed is not None
                      else self.seed * 0x9E3779B1 + self._runs) & 0xFFFFFFFF) or 1,
            "watchdog": watchdog,
            "expect_beats": None if expected_out_bytes is None else expected_out_bytes // bb,
        }
        cap_beats = self.build.in_beats
        if self._chunk_bytes is not None:
            cap_beats = max(1, min(cap_beats, self._chunk_bytes // bb))
        base["out_cap"] = min(self.build.out_beats, cap_beats)
        cap = cap_beats * bb
        chunks = [stream[i:i + cap] for i in range(0, len(stream), cap)] or [b""]
        out = bytearray()
        cpu0 = self._sim_cpu()
        t0 = time.monotonic()
        resp = {}
        for ci, chunk in enumerate(chunks):
            self._in_file.write_bytes(encode_input_file(chunk, bb))
            first = True
            while True:
                resp = self._command(dict(base, op="run", in_beats=len(chunk) // bb,
                                          new=ci == 0 and first, reload=first,
                                          last=ci == len(chunks) - 1))
                first = False
                if resp["out_count"]:
                    out += decode_output_dump(self._out_file.read_bytes(), bb,
                                              resp["out_count"])
                if resp["timed_out"] or not resp["out_full"]:
                    break
            if resp["timed_out"]:
                break
        wall = time.monotonic() - t0
        cpu = self._sim_cpu() - cpu0
        result = RtlResult(
            data=bytes(out), cycles=resp["last_beat_cycle"], sim_cycles=resp["cycles"],
            wall_s=wall, timed_out=resp["timed_out"], error_pin=resp["error_seen"],
            busy_at_end=resp["busy"],
            in_bytes_taken=sum(len(c) for c in chunks[:-1]) + resp["in_ptr"] * bb,
            sim_cpu_s=cpu)
        self.last_result = result
        self.stats.programs += 1
        self.stats.sim_cycles += result.sim_cycles
        self.stats.wall_s += wall
        if result.timed_out:
            self.reset()
            raise SimulatorHang(
                f"{self.config.name}: no beat moved for {watchdog} cycles (hang) after "
                f"{result.in_bytes_taken} of {len(stream)} input bytes and {len(out)} output "
                f"bytes (expected {expected_out_bytes}); busy={int(result.busy_at_end)}",
                result)
        return result


def run_cocotb_tests(config: str | AccelConfig, testcases: list[str] | None = None,
                     workdir: str | Path | None = None) -> tuple[int, int, str]:
    """Run the stand-alone cocotb tests of :mod:`tinyaccel.sim.accel_tests` (not ``serve``).

    Returns ``(tests, failed, log_text)``.
    """
    config = get_config(config)
    b = build(config)
    from cocotb_tools.runner import get_results, get_runner
    with tempfile.TemporaryDirectory(prefix="tinyaccel-cocotb-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        xml = wd / "results.xml"
        log = wd / "sim.log"
        runner = get_runner("verilator")
        env = {"TINYACCEL_HOST_WIDTH": str(config.host_width)}
        try:
            runner.test(test_module="tinyaccel.sim.accel_tests", testcase=testcases,
                        hdl_toplevel=TB_TOPLEVEL, hdl_toplevel_lang="verilog",
                        build_dir=b.build_dir, test_dir=wd, extra_env=env,
                        results_xml=str(xml), log_file=log)
        except SystemExit:
            pass  # failures are counted from the results file below
        text = log.read_text() if log.exists() else ""
        if not xml.exists():
            return 0, 0, text
        tests, failed = get_results(xml)
        return tests, failed, text
