"""The RTL (Verilator + cocotb) against the golden model, zero tolerance: the fast subset.

Every program runs on one persistent simulator per configuration with idle gaps on the input
stream and back-pressure on the output stream, and every response byte is compared with the
golden model (timing counters only for plausibility). Random programs draw from the run's seed
(fixed; printed): ``TINYACCEL_SEED=<seed> pytest tests/test_rtl.py`` replays or varies it. The
long run is ``tinyaccel regress``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from tinyaccel.errors import BackendUnavailable, ProtocolError, SimulatorHang
from tinyaccel.hw.config import get_config
from tinyaccel.hw.isa import Buffer, Opcode
from tinyaccel.protocol import Program, parse_responses
from tinyaccel.sim import build_cache, randprog
from tinyaccel.sim.regress import program_for_seed, save_failure
from tinyaccel.sim.rtl import RtlSession, build, build_root, estimate_work, run_cocotb_tests
from tinyaccel.sim.scoreboard import Checker, compare_responses, isolated

pytestmark = pytest.mark.rtl

CONFIGS = ["ice40", "ecp5"]
N_RANDOM = int(os.environ.get("TINYACCEL_RTL_PROGRAMS", "30"))
GAPS = (0.0, 0.25, 0.5, 0.8)  # idle / back-pressure probabilities of the corner programs


@pytest.fixture(scope="module", params=CONFIGS)
def checker(request):
    try:
        session = RtlSession(request.param, seed=7).start()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    yield Checker(session)
    session.close()


def test_corner_programs(checker):
    """Every corner program of randprog, alternately at full rate and with gaps."""
    cfg = checker.config
    corners = randprog.corner_programs(cfg)
    # every opcode of the ISA is implemented, so the corner programs exercise each one
    assert {instr.opcode for c in corners for instr, _ in c.program} >= set(Opcode)
    failures = []
    for i, corner in enumerate(corners):
        gap = GAPS[i % len(GAPS)]
        stream = isolated(cfg, corner.program)
        res = checker.check(stream, label=f"corner {corner.name}", valid_gap=gap,
                            ready_gap=gap, seed=i + 1)
        if not res.ok:
            path = save_failure(cfg.name, f"corner-{corner.name}", stream, str(res))
            failures.append(f"{res} (stream saved to {path})")
    assert not failures, f"{cfg.name}: {len(failures)} of {len(corners)} corner programs " \
        "differ from the golden model:\n" + "\n".join(failures)


def test_random_programs(checker):
    """Seeded random programs as the long regression draws them (random lengths, 0-15 %
    illegal instructions, random gaps and back-pressure, now and then whole buffers)."""
    cfg = checker.config
    seed = randprog.seed_from_env()
    rng = np.random.default_rng(seed)
    failures = []
    for i in range(N_RANDOM):
        prog_seed = int(rng.integers(1 << 32))
        stream, options = program_for_seed(cfg, prog_seed, Opcode)
        res = checker.check(stream, label=f"TINYACCEL_SEED={seed} program {i} (replay alone: "
                                          f"tinyaccel regress --config "
                                          f"{cfg.name} --replay {prog_seed}; {options})",
                            **options)
        if not res.ok:
            path = save_failure(cfg.name, str(prog_seed), stream, str(res))
            failures.append(f"{res} (stream saved to {path})")
    assert not failures, f"{cfg.name}: {len(failures)} of {N_RANDOM} random programs differ " \
        "from the golden model:\n" + "\n".join(failures)


def test_unknown_response_length(checker):
    """Without the expected length the run ends when the accelerator falls silent."""
    cfg = checker.config
    prog = randprog.random_program(cfg, 1234, n_instr=24,
                                   opcodes=[Opcode.LOAD, Opcode.STORE, Opcode.NOP])
    stream = isolated(cfg, prog)
    expected = checker.golden.run(stream)
    got = checker.session.run(stream, None, valid_gap=0.5, ready_gap=0.5)
    assert compare_responses(cfg, stream, expected, got) is None


def test_hang_is_reported_and_session_recovers(checker):
    """A LOAD whose data never comes trips the watchdog (SimulatorHang, never a wait forever); the
    session resets the accelerator and the next program runs correctly."""
    cfg = checker.config
    bad = Program(cfg).load(Buffer.INP, 0, np.zeros((4, cfg.rows), np.int8)).to_bytes()
    with pytest.raises(SimulatorHang, match="no beat moved"):
        checker.session.run(bad[:-cfg.beat_bytes], None, watchdog=2000)
    checker.golden.reset()
    prog = randprog.random_program(cfg, 99, n_instr=16)
    res = checker.check(isolated(cfg, prog), label="after hang")
    assert res.ok, str(res)


def test_chunked_streams(checker):
    """Streams longer than the wrapper's memories are fed and drained in chunks."""
    cfg = checker.config
    words = randprog.random_words(cfg, Buffer.WGT, 48, 5)
    prog = Program(cfg).load(Buffer.WGT, 0, words).store(Buffer.WGT, 0, 48).sync(counters=True)
    stream = isolated(cfg, prog)
    expected = checker.golden.run(stream)
    with RtlSession(cfg, chunk_bytes=7 * cfg.beat_bytes) as small:
        got = small.run(stream, len(expected), valid_gap=0.3, ready_gap=0.3)
    assert compare_responses(cfg, stream, expected, got) is None
    stored = parse_responses(cfg, Program.from_bytes(cfg, stream), got)[2]
    assert np.array_equal(stored, words)


def test_stream_must_be_whole_beats():
    cfg = get_config("ice40")
    with pytest.raises(ProtocolError, match="whole number"):
        RtlSession(cfg).run(b"\0" * (cfg.beat_bytes + 1))


def test_build_cache_hit_is_silent(checker, capfd):
    """A first build announces itself on stderr; a cache hit says nothing."""
    capfd.readouterr()
    assert build(checker.config).build_dir == checker.session.build.build_dir
    assert capfd.readouterr() == ("", "")


def test_build_announcement_quotes_the_previous_build(tmp_path, monkeypatch, capsys):
    """The first-run message names the configuration, the cache folder and a duration, taken
    from the newest build of the configuration already in the cache."""
    monkeypatch.setenv("TINYACCEL_BUILD_DIR", str(tmp_path))
    cfg = get_config("ice40")
    old = build_root() / f"{cfg.name}-0123456789abcdef"
    old.mkdir(parents=True)
    (old / "build.json").write_text(json.dumps({"seconds": 100.4, "verilog_seconds": 22.6}))
    build_cache._announce_build(cfg, False, old.parent / "new")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"'{cfg.name}'" in err and str(old.parent / "new") in err
    assert "took 123 s" in err


def test_broken_project_import_fails_loudly(monkeypatch):
    """An ImportError inside tinyaccel propagates: it is no missing tool (BackendUnavailable),
    which would skip the RTL tests instead of failing them."""
    from tinyaccel.sw.runtime import open_backend
    monkeypatch.setitem(sys.modules, "tinyaccel.hw.top", None)  # importing it now fails
    for name in ("tinyaccel.sim.rtl", "tinyaccel.sim.build_cache", "tinyaccel.sim.session"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match="tinyaccel.hw.top"):
        open_backend("rtl", get_config("ice40"))


def test_watchdog_estimate_walks_instructions_not_data():
    """The watchdog's work estimate parses the stream as the decoder does: LOAD data that
    happens to look like a huge GEMM is data, a truncated stream counts up to the cut, and
    more GEMM blocks never shorten the estimate."""
    cfg = get_config("sim")
    gemm = Program(cfg).gemm(0, 0, 0, k=64, m_blocks=15, n_blocks=15).to_bytes()
    assert len(gemm) == cfg.word_bytes(Buffer.WGT)
    as_data = np.frombuffer(gemm, np.int8).reshape(1, cfg.cols)
    load = Program(cfg).load(Buffer.WGT, 0, as_data).to_bytes()
    assert estimate_work(cfg, load) == 0
    assert estimate_work(cfg, gemm) > 0
    assert estimate_work(cfg, gemm + load[:-1]) == estimate_work(cfg, gemm)
    small = Program(cfg).gemm(0, 0, 0, k=64, m_blocks=1, n_blocks=1).to_bytes()
    assert estimate_work(cfg, small) < estimate_work(cfg, gemm)


def test_cocotb_module():
    """The stand-alone cocotb tests: idle after reset, and the watchdog."""
    try:
        tests, failed, log = run_cocotb_tests("ice40", ["reset_state", "hang_is_reported"])
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    assert tests == 2 and failed == 0, log[-3000:]


@pytest.mark.parametrize("out", ["int8", "int32"])
def test_gemm_workload(checker, out):
    """The double-buffered GEMM program of the benchmark (odd sizes: padding, several tiles)
    under gaps and back-pressure; INT32 results equal NumPy's matmul."""
    from tinyaccel.bench.workloads import random_gemm
    cfg = checker.config
    w = random_gemm(cfg, 3 * cfg.rows + 1, 2 * cfg.cols + 3, 70, seed=11, out=out)
    stream = w.to_bytes()
    res = checker.check(stream, label=f"gemm {w.M}x{w.N}x{w.K} {out}", valid_gap=0.3,
                        ready_gap=0.3, seed=3)
    assert res.ok, str(res)
    if out == "int32":
        got = checker.session.run(stream, w.response_bytes())
        checker.golden.run(stream)  # keep the golden machine in step
        result, report = w.parse(got)
        a, b = w.operands
        assert np.array_equal(result, a.astype(np.int32) @ b.astype(np.int32))
        assert report.ok


def test_bench_options_are_checked():
    """The RTL benchmark rejects an unknown part, configuration or repeat count up front."""
    from tinyaccel.bench import rtl as bench_rtl
    with pytest.raises(ValueError, match="unknown bench part"):
        bench_rtl.run(parts=("verilator", "spice"))
    with pytest.raises(Exception, match="nosuch"):
        bench_rtl.run(parts=("verilator",), configs=("nosuch",))
    with pytest.raises(ValueError, match="repeats"):
        bench_rtl.run(parts=("verilator",), configs=("ecp5",), repeats=0)
