"""The Verilator build of the simulator, and the cache that keeps it.

A build turns ``tinyaccel.hw.top.Accelerator(config)`` into Verilog (memoized by a hash of the
``hw`` sources and the configuration, because converting a large design takes seconds) and
Verilates it with the wrapper ``tinyaccel_tb.sv`` into a C++ simulator (about a minute). Builds
are cached under ``<repo>/build/rtl/<config>-<hash>`` (``TINYACCEL_BUILD_DIR`` overrides
``<repo>/build``), where the hash covers the generated Verilog, the wrapper, the build flags and
the tool versions, so a change of the RTL rebuilds and nothing else does. The C++ is compiled for
the build machine's CPU (see :func:`~tinyaccel.sim.toolchain.native_flags`; the hash covers the
CPU features, so a cache shared between machines never runs a foreign binary).

A build that has to run says so once on stderr (what, for which configuration, roughly how long,
where it is cached); a cache hit says nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import hw
from ..errors import SimulatorError
from ..hw.config import AccelConfig, get_config
from ..hw.top import generate_verilog
from .toolchain import have_lz4, native_flags, setup_environment

__all__ = [
    "TB_TOPLEVEL", "WRAPPER_FILE", "DUT_NAME", "STREAM_MEM_BYTES", "KEEP_BUILDS", "RtlBuild",
    "build_root", "verilog_for", "build", "source_hash",
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

#: Completed builds (and generated Verilog files) kept per configuration; older ones are deleted
#: after a new build.
KEEP_BUILDS = 3

#: Wall time of a first build on an idle 2-core machine, Verilog conversion included (``make
#: demo``, ecp5: 59 s; on the same 2 cores shared with other jobs, ice40 took 167 s and ecp5
#: 209 s). The first-run message quotes it until the cache holds a build of the configuration
#: whose own time it can quote.
TYPICAL_BUILD_S = 60

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


def _hw_source_hash() -> str:
    """Hash of every source file of the ``tinyaccel.hw`` package and of the Amaranth version."""
    h = hashlib.sha256()
    h.update(importlib.metadata.version("amaranth").encode())
    for path in sorted(Path(hw.__file__).resolve().parent.rglob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def source_hash(*packages) -> str:
    """Hash of every source file of the given packages (modules with ``__file__``) and of the
    Amaranth version: what Verilog generated from them depends on."""
    h = hashlib.sha256()
    h.update(importlib.metadata.version("amaranth").encode())
    for package in packages:
        folder = Path(package.__file__).resolve().parent
        h.update(package.__name__.encode())
        for path in sorted(folder.rglob("*.py")):
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _verilog_path(config: AccelConfig) -> Path:
    """Where the memoized Verilog of ``config`` is (or will be) stored."""
    key = hashlib.sha256((_hw_source_hash() + json.dumps(config.as_dict(), sort_keys=True))
                         .encode()).hexdigest()[:16]
    return build_root() / "verilog" / f"{config.name}-{key}.v"


def verilog_for(config: str | AccelConfig) -> str:
    """Verilog of ``tinyaccel.hw.top.Accelerator(config)``, module name ``tinyaccel_top``.

    Memoized on disk by a hash of the ``hw`` sources and the configuration, because converting
    a large design takes seconds and its output depends on nothing else.
    """
    config = get_config(config)
    path = _verilog_path(config)
    if path.exists():
        return path.read_text()
    text = generate_verilog(config)
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


def _last_build_seconds(name: str) -> float | None:
    """Wall time of the newest completed build of configuration ``name`` in the cache."""
    records = []
    for record in build_root().glob(f"{name}-*/build.json"):
        try:
            info = json.loads(record.read_text())
            seconds = info["seconds"] + info.get("verilog_seconds", 0.0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        records.append((record.stat().st_mtime, seconds))
    return max(records)[1] if records else None


def _announce_build(config: AccelConfig, waves: bool, where: Path) -> None:
    """Say once, on stderr, that a simulator is being built (a first run waits for it)."""
    from tqdm import tqdm  # writes between the lines of any progress bar on the screen

    seconds = _last_build_seconds(config.name)
    if seconds is None:
        took = f"about {TYPICAL_BUILD_S} s on 2 idle cores, minutes on a busy machine"
    else:
        took = f"the previous build of {config.name} here took {seconds:.0f} s"
    what = (f"{config.rows}x{config.cols} MAC array, {config.host_width}-bit host stream"
            + (", with waveform tracing" if waves else ""))
    tqdm.write(f"tinyaccel: building the Verilator simulator of the {config.name!r} accelerator "
               f"({what}), once per RTL change: {took}; cached in {where}", file=sys.stderr)


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
    SimulatorError
        Verilator or the C++ compiler failed (the message quotes the build log).
    """
    config = get_config(config)
    if waves is None:
        waves = os.environ.get("TINYACCEL_WAVES", "") not in ("", "0")
    setup_environment()
    from cocotb_tools.runner import get_runner

    announced = False
    verilog_s = 0.0
    if verilog is None:
        if not _verilog_path(config).exists():  # a new design: the simulator is built too
            _announce_build(config, waves, build_root())
            announced = True
        t0 = time.monotonic()
        verilog = verilog_for(config)
        verilog_s = time.monotonic() - t0
    wrapper = _wrapper_text()
    beat_bytes = config.beat_bytes
    in_beats = out_beats = STREAM_MEM_BYTES // beat_bytes
    params = {"HOST_W": config.host_width, "IN_BEATS": in_beats, "OUT_BEATS": out_beats}
    wave_format = None
    if waves:
        wave_format = "fst" if have_lz4() else "vcd"
        if wave_format == "vcd":
            logging.getLogger(__name__).warning(
                "Verilator's FST writer needs the lz4 headers (apt-get install liblz4-dev); "
                "writing VCD waveforms instead")
    native_args, cpu = native_flags()
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
        if done_marker.exists():  # another process built it while this one waited
            return result
        if not announced:
            _announce_build(config, waves, build_dir)
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
            "seconds": round(time.monotonic() - t0, 1), "verilog_seconds": round(verilog_s, 1)},
            indent=1))
        for pch in build_dir.glob("*.gch"):  # ~100 MB each, needed only while compiling
            pch.unlink()
        done_marker.write_text("ok\n")
    _prune(config.name, waves, keep=KEEP_BUILDS)
    return result


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
