"""RTL speed and MAC utilization: a whole 256x256x256 GEMM program on the Verilated accelerator.

The program (:func:`tinyaccel.bench.workloads.gemm_program`) is the driver's double-buffered GEMM
lowering between ``SYNC clear=1`` and ``SYNC counters=1``: every operand byte is LOADed over the
host stream, the GEMM of a tile is issued before the LOAD of the next one, and the REQUANT +
STORE of a finished tile run behind the next tile's GEMM. It runs through the RTL backend
(:class:`tinyaccel.sim.rtl.RtlSession`, full stream rate) and its results are checked against
NumPy before anything is reported.

* ``verilator_cycles_per_s``: simulated cycles / wall seconds of the whole program (stream
  files, ``$readmemh``/``$writememh`` and the final quiet window included) on
  ``verilator_config``; ``..._cpu`` divides by the simulator's CPU time instead, which does not
  depend on what else the machine runs. The same for every configuration in ``configs``.
* ``pysim_cycles_per_s``: Amaranth's own simulator on a smaller GEMM program (``pysim_program``)
  on ``pysim_config``, with a Python testbench driving the streams at full rate.
* ``mac_util_compute_256``: MACS_ISSUED / (array MACs x COMPUTE_CYCLES) of the 256^3 program;
  ``mac_util_e2e_256`` / ``mac_util_e2e_64``: M*N*K / (array MACs x CYCLES) over the whole
  256^3 / 64^3 programs (counter record; loads, requantization and stores included), on
  ``mac_util_config``; suffixed keys give them for every configuration.

Parts can be left out: ``run(parts=("verilator",), configs=("ecp5",))`` measures only the Verilator
speed of ecp5 (the headline keys then name the first configuration measured). From the command
line: ``tinyaccel bench rtl --rtl-part verilator --rtl-config ecp5 --rtl-repeats 3 --json PATH``
(or ``TINYACCEL_BENCH_RTL_PARTS=verilator``, ``TINYACCEL_BENCH_RTL_CONFIGS=ecp5``,
``TINYACCEL_BENCH_RTL_REPEATS=3``).
"""

from __future__ import annotations

import time

from ..errors import ConfigError
from ..hw.config import get_config
from .workloads import GemmWorkload, random_gemm

__all__ = ["run"]

CONFIGS = ("ice40", "ecp5")
PRIMARY = "ice40"  # the board configuration: verilator_cycles_per_s and mac_util_* headline it
PARTS = ("verilator", "pysim")
REPEATS = 2  # runs of each program; the fastest (wall time) is reported


def _check(w: GemmWorkload, response: bytes, golden: bytes | None = None) -> dict:
    """Parse the response, compare with the golden model, return the utilization record."""
    from ..sim.golden import GoldenMachine
    from ..sim.scoreboard import compare_responses
    stream = w.to_bytes()
    expected = golden if golden is not None else GoldenMachine(w.config).run(stream)
    mismatch = compare_responses(w.config, stream, expected, response)
    if mismatch is not None:  # a benchmark of a wrong result is worthless
        raise AssertionError(f"{w.config.name} GEMM {w.M}x{w.N}x{w.K}: RTL differs from the "
                             f"golden model: {mismatch}")
    _, report = w.parse(response)
    return w.utilization(report)


def _verilator(config: str, sizes=(256, 64), progress=None, repeats: int = 2) -> dict:
    from ..sim.rtl import RtlSession
    out: dict = {}
    with RtlSession(config) as session:
        for size in sizes:
            w = random_gemm(config, size, size, size, seed=size)
            stream = w.to_bytes()
            n = w.response_bytes()
            best = None
            steps = range(repeats)
            if progress is not None:
                steps = progress(steps, desc=f"rtl {config} gemm {size}^3", leave=False)
            for _ in steps:
                r = session.run_result(stream, n)
                if best is None or r.wall_s < best.wall_s:
                    best = r
            util = _check(w, best.data)
            out[size] = {"result": best, "util": util, "stream_bytes": len(stream),
                         "response_bytes": n, "plan": w.lowering.plan}
    return out


def _pysim(config: str, size: int) -> dict:
    """A size^3 GEMM program on Amaranth's simulator; returns cycles, seconds, response."""
    from amaranth.sim import Simulator

    from ..hw.top import Accelerator
    cfg = get_config(config)
    w = random_gemm(cfg, size, size, size, seed=size)
    stream = w.to_bytes()
    expect_bytes = w.response_bytes()
    bb = cfg.beat_bytes
    beats = [int.from_bytes(stream[i:i + bb], "little") for i in range(0, len(stream), bb)]
    dut = Accelerator(cfg)
    out = bytearray()
    state = {"cycles": 0}
    limit = 50 * (size ** 3 // cfg.macs + len(beats)) + 100_000

    async def testbench(ctx):
        i = 0
        ctx.set(dut.o_stream.ready, 1)
        while i < len(beats) or len(out) < expect_bytes:
            if i < len(beats):
                ctx.set(dut.i_stream.payload, beats[i])
            ctx.set(dut.i_stream.valid, i < len(beats))
            _, _, i_ready, o_valid, o_payload = await ctx.tick().sample(
                dut.i_stream.ready, dut.o_stream.valid, dut.o_stream.payload)
            state["cycles"] += 1
            if i < len(beats) and i_ready:
                i += 1
            if o_valid:
                out.extend(int(o_payload).to_bytes(bb, "little"))
            if state["cycles"] > limit:
                raise AssertionError(f"pysim GEMM {size}^3 did not finish in {limit} cycles")

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    t0 = time.perf_counter()
    sim.run()
    seconds = time.perf_counter() - t0
    util = _check(w, bytes(out))
    return {"cycles": state["cycles"], "seconds": seconds, "util": util, "program": w}


def run(progress=None, configs=CONFIGS, primary: str | None = None, pysim_config: str = "ice40",
        pysim_size: int = 16, parts=PARTS, repeats: int = REPEATS) -> dict:
    """Measure Verilator and Amaranth simulation speed and MAC utilization; return the metrics.

    ``progress`` is a tqdm-like wrapper for iterables (optional). ``configs`` (presets),
    ``parts`` (a subset of :data:`PARTS`) and ``repeats`` (runs per program, the fastest counts)
    select what is measured; ``primary`` (default :data:`PRIMARY` if measured, else the first
    configuration) names the configuration of the unsuffixed keys.

    Raises
    ------
    ConfigError
        An unknown part or preset, or ``repeats < 1``, before anything runs.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"unknown bench part(s) {sorted(unknown)}; parts: {', '.join(PARTS)}")
    for name in configs:
        get_config(name)  # an unknown name fails before anything runs
    if repeats < 1:
        raise ConfigError(f"repeats={repeats} must be at least 1")
    result: dict = {}
    if "verilator" in parts and configs:
        if primary is None:
            primary = PRIMARY if PRIMARY in configs else configs[0]
        result.update(_verilator_metrics(configs, primary, progress, repeats))
    if "pysim" in parts:
        ps = _pysim(pysim_config, pysim_size)
        result["pysim_config"] = pysim_config
        result["pysim_program"] = (f"gemm {pysim_size}x{pysim_size}x{pysim_size} int8->int8, "
                                   "loads and stores included")
        result["pysim_cycles"] = ps["cycles"]
        result["pysim_cycles_per_s"] = round(ps["cycles"] / ps["seconds"])
    return result


def _verilator_metrics(configs, primary: str, progress, repeats: int) -> dict:
    result: dict = {}
    per_config = {}
    for name in configs:
        per_config[name] = _verilator(name, progress=progress, repeats=repeats)
    for name, runs in per_config.items():
        r256, u256, u64 = runs[256]["result"], runs[256]["util"], runs[64]["util"]
        result[f"verilator_cycles_per_s_{name}"] = round(r256.cycles_per_s)
        result[f"verilator_cycles_per_s_cpu_{name}"] = round(r256.cycles_per_cpu_s)
        result[f"verilator_cycles_256_{name}"] = r256.sim_cycles
        result[f"mac_util_compute_256_{name}"] = round(u256["mac_util_compute"], 4)
        result[f"mac_util_e2e_256_{name}"] = round(u256["mac_util_e2e"], 4)
        result[f"mac_util_e2e_64_{name}"] = round(u64["mac_util_e2e"], 4)
        result[f"counter_cycles_256_{name}"] = u256["cycles"]
        result[f"compute_cycles_256_{name}"] = u256["compute_cycles"]
        result[f"host_bytes_256_{name}"] = runs[256]["stream_bytes"] + runs[256]["response_bytes"]
        result[f"array_macs_{name}"] = get_config(name).macs
    p = per_config[primary]
    result["verilator_config"] = primary
    result["verilator_program"] = "gemm 256x256x256 int8->int8, loads and stores included"
    result["verilator_cycles_per_s"] = round(p[256]["result"].cycles_per_s)
    result["verilator_cycles_per_s_cpu"] = round(p[256]["result"].cycles_per_cpu_s)
    result["mac_util_config"] = primary
    result["mac_util_compute_256"] = round(p[256]["util"]["mac_util_compute"], 4)
    result["mac_util_e2e_256"] = round(p[256]["util"]["mac_util_e2e"], 4)
    result["mac_util_e2e_64"] = round(p[64]["util"]["mac_util_e2e"], 4)
    result["host_width_bits"] = get_config(primary).host_width
    for name in configs:
        result[f"host_width_bits_{name}"] = get_config(name).host_width
    return result
