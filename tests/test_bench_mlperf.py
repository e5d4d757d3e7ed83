"""`tinyaccel bench mlperf-tiny` (issue 12 item 7): the metrics against independent counts.

The suite runs on the smallest model (``ad``) on ``ecp5``; its cycles are compared with the
CompiledModel's own stats of the same inference and its link bytes with the counting wrapper of
tests/test_mlperf_tiny.py. No timing is asserted.
"""

import json
import math
import os

import pytest
from click.testing import CliRunner

from tinyaccel.bench import SUITES, mlperf_tiny
from tinyaccel.boards.board import DEFAULT_BAUD
from tinyaccel.boards.build import BOARDS
from tinyaccel.cli import main
from tinyaccel.errors import ConfigError
from tinyaccel.hw.config import get_config
from tinyaccel.models import zoo
from tinyaccel.models.mlperf_tiny import random_inputs
from tinyaccel.sw.compiler import CompiledModel, bind
from tinyaccel.sw.quant import quantize
from tinyaccel.sw.runtime import Device, LinkCounter, open_backend

KEYS = ("cycles", "mac_util", "link_bytes", "resident", "golden_rtl_identical", "latency_ms",
        "latency_with_link_ms")


@pytest.mark.rtl
def test_suite_on_the_autoencoder_matches_independent_counts(tmp_path):
    metrics = mlperf_tiny.run(config="ecp5", models=("ad",), build_root=tmp_path, show=False)
    for key in KEYS:
        assert f"{key}_ad" in metrics
    assert {"clock_mhz", "clock_source", "mlperf_config"} <= set(metrics)
    assert metrics["mlperf_config"] == "ecp5"
    assert metrics["golden_rtl_identical_ad"] is True
    assert metrics["golden_rtl_identical_ad_per_layer"] is True
    assert metrics["resident_ad"] is True and metrics["resident_ad_per_layer"] is False

    # The same inference, measured here: RTL backend, batch 1, counted by the tests' wrapper.
    spec = zoo.get("ad-autoencoder")
    model, _ = spec.train_fp32(seed=0)
    qmodel = quantize(model, random_inputs(spec.input_shape, mlperf_tiny.CALIBRATION,
                                           seed=mlperf_tiny.CALIBRATION_SEED))
    x = random_inputs(spec.input_shape, 1, seed=mlperf_tiny.INPUT_SEED)
    link = LinkCounter(open_backend("rtl", get_config("ecp5")))
    with Device(link, "ecp5") as device:
        compiled = CompiledModel(qmodel, device, batch_size=1)
        compiled(x)
    cycles = sum(s.cycles for s in compiled.stats.values())
    macs = sum(s.macs for s in compiled.stats.values())
    assert cycles > 0
    assert metrics["cycles_ad_per_layer"] == cycles
    assert metrics["link_bytes_ad_per_layer"] == link.sent + link.received > 0
    assert math.isclose(metrics["mac_util_ad_per_layer"], macs / (device.config.macs * cycles))
    assert 0 < metrics["mac_util_ad"] <= 1 and metrics["cycles_ad"] > 0

    # Latency: cycles at the clock, plus 10 bits per link byte at the default baud.
    ulx3s = next(s for s in BOARDS.values() if s.top.default_config == "ecp5")
    assert metrics["clock_source"] == mlperf_tiny.BOARD_DEFAULT  # no build under tmp_path
    assert metrics["clock_mhz"] == ulx3s.top.default_clock_hz / 1e6
    mhz = metrics["clock_mhz"]
    assert math.isclose(metrics["latency_ms_ad_per_layer"], cycles / (mhz * 1e3))
    assert math.isclose(metrics["latency_ms_ad"], metrics["cycles_ad"] / (mhz * 1e3))
    for suffix in ("", "_per_layer"):
        assert math.isclose(
            metrics[f"latency_with_link_ms_ad{suffix}"] - metrics[f"latency_ms_ad{suffix}"],
            metrics[f"link_bytes_ad{suffix}"] * 10 / DEFAULT_BAUD * 1e3)


def test_clock_from_the_newest_build_result(tmp_path):
    board = next(s for s in BOARDS.values() if s.top.default_config == "ice40").name
    old = tmp_path / f"{board}.json"
    old.write_text(json.dumps({"board": board, "config": "ice40", "fmax_mhz": 20.0,
                               "clock_mhz": 30.0}))
    (tmp_path / board).mkdir()
    new = tmp_path / board / "result.json"
    new.write_text(json.dumps({"board": board, "config": "ice40", "fmax_mhz": 32.33,
                               "clock_mhz": 30.019}))
    (tmp_path / "other.json").write_text(json.dumps({"board": "ulx3s-85f", "config": "ecp5",
                                                     "fmax_mhz": 1.0, "clock_mhz": 1.0}))
    stamp = old.stat().st_mtime
    os.utime(new, (stamp + 10, stamp + 10))
    assert mlperf_tiny.board_clock("ice40", build_root=tmp_path) == (30.019, str(new))
    os.utime(old, (stamp + 20, stamp + 20))  # now the slower build is the newest
    assert mlperf_tiny.board_clock("ice40", build_root=tmp_path) == (20.0, str(old))


def test_clock_option_and_board_default(tmp_path):
    assert mlperf_tiny.board_clock("ecp5", 64.0, tmp_path) == (64.0, "clock_mhz option")
    ulx3s = next(s for s in BOARDS.values() if s.top.default_config == "ecp5")
    assert mlperf_tiny.board_clock("ecp5", build_root=tmp_path) == (
        ulx3s.top.default_clock_hz / 1e6, mlperf_tiny.BOARD_DEFAULT)
    with pytest.raises(ConfigError, match="no board builds the 'sim' preset"):
        mlperf_tiny.board_clock("sim", build_root=tmp_path)
    with pytest.raises(ConfigError, match="must be positive"):
        mlperf_tiny.board_clock("ecp5", 0, tmp_path)


def test_bad_options_fail_before_anything_runs(tmp_path):
    assert SUITES["mlperf-tiny"] == "tinyaccel.bench.mlperf_tiny"
    with pytest.raises(ConfigError, match="unknown MLPerf Tiny model"):
        mlperf_tiny.run(models=("resnet",), build_root=tmp_path)
    with pytest.raises(ConfigError):
        mlperf_tiny.run(config="nope", models=("ad",), build_root=tmp_path)


def test_tables_put_the_anchors_beside_our_latencies():
    metrics = {"mlperf_config": "ecp5", "clock_mhz": 64.0, "clock_source": "x",
               "link_baud": DEFAULT_BAUD}
    for m in ("ic", "ad"):
        metrics.update({f"cycles_{m}": 64_000, f"mac_util_{m}": 0.5, f"link_bytes_{m}": 1000,
                        f"resident_{m}": False, f"golden_rtl_identical_{m}": True,
                        f"latency_ms_{m}": 1.0, f"latency_with_link_ms_{m}": 11.0})
    text = mlperf_tiny.format_tables(metrics)
    assert "ic-resnet8" in text and "ad-autoencoder" in text and "kws-dscnn" not in text
    ic = text.split("\n\n")[0]
    for anchor in (a for a in mlperf_tiny.ANCHORS if a.model == "ic"):
        assert anchor.system in ic and f"{anchor.latency_ms:.4g}" in ic
    assert mlperf_tiny.ANCHOR_SOURCE in text
    assert sum(a.model == "ic" for a in mlperf_tiny.ANCHORS) == 5


def test_mlperf_options_need_the_mlperf_suite():
    result = CliRunner().invoke(main, ["bench", "golden", "--mlperf-config", "ice40"])
    assert result.exit_code == 2
    assert "--mlperf-config" in result.output and "mlperf-tiny suite" in result.output


def test_golden_suite_reports_resident_and_per_layer_link_bytes(tmp_path):
    """Without the RTL: link bytes of both placements, counted here independently."""
    metrics = mlperf_tiny.run(config="ecp5", models=("ad",), build_root=tmp_path, show=False,
                              backends=("golden",))
    assert metrics["cycles_ad"] is None and metrics["latency_ms_ad"] is None
    assert metrics["est_cycles_ad"] > 0
    spec = zoo.get("ad-autoencoder")
    model, _ = spec.train_fp32(seed=0)
    qmodel = quantize(model, random_inputs(spec.input_shape, mlperf_tiny.CALIBRATION,
                                           seed=mlperf_tiny.CALIBRATION_SEED))
    x = random_inputs(spec.input_shape, 1, seed=mlperf_tiny.INPUT_SEED)
    counts = {}
    for placement in ("per-layer", "resident"):
        link = LinkCounter(open_backend("golden", get_config("ecp5")))
        with Device(link, "ecp5") as device:
            compiled = bind(qmodel, device, batch_size=1, placement=placement)
            compiled(x)
        counts[placement] = link.sent + link.received
    assert metrics["link_bytes_ad_per_layer"] == counts["per-layer"]
    # the resident count excludes the setup program, reported on its own
    assert metrics["link_bytes_ad"] + metrics["setup_link_bytes_ad"] == counts["resident"]
    assert metrics["link_bytes_ad"] < metrics["link_bytes_ad_per_layer"]


@pytest.mark.rtl
def test_cli_writes_the_metrics_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no build/boards here: the board's default clock
    out = tmp_path / "mlperf.json"
    result = CliRunner().invoke(main, ["bench", "mlperf-tiny", "--mlperf-config", "ecp5",
                                       "--mlperf-model", "ad", "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert {f"{key}_ad" for key in KEYS} <= set(metrics)
    assert metrics["mlperf_config"] == "ecp5" and metrics["golden_rtl_identical_ad"] is True
    assert "ad-autoencoder:" in result.stdout and "cycles_ic" not in metrics


def test_link_counter_counts_stream_and_responses():
    """LinkCounter: the bytes sent are the program's stream, the bytes received the protocol's
    response lengths (computed from the program, not from the counter)."""
    from tinyaccel.hw.isa import Buffer
    from tinyaccel.protocol import Program, response_length
    cfg = get_config("ecp5")
    program = Program(cfg).sync(clear=True)
    program.store(Buffer.OUT, 0, 3).sync(counters=True)
    link = LinkCounter(open_backend("golden", cfg))
    with Device(link, cfg) as device:
        device.run(program)
        device.run(program)
    stream = len(program.to_bytes())
    responses = sum(response_length(cfg, instr) or 0 for instr, _ in program)
    assert (link.sent, link.received) == (2 * stream, 2 * responses)
    assert link.link_bytes == 2 * (stream + responses) and responses > 0


def test_a_model_the_planner_refuses_reports_its_per_layer_run(tmp_path):
    """ice40 cannot hold the autoencoder resident: the suite says so and why, and the figures
    under the unsuffixed keys are the per-layer run's."""
    metrics = mlperf_tiny.run(config="ice40", models=("ad",), build_root=tmp_path, show=False,
                              backends=("golden",))
    assert metrics["resident_ad"] is False
    assert "cannot run resident" in metrics["resident_reason_ad"]
    assert metrics["setup_link_bytes_ad"] is None and metrics["est_cycles_ad"] is None
    assert metrics["link_bytes_ad"] == metrics["link_bytes_ad_per_layer"] > 0
