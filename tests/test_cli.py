"""The ``tinyaccel`` command line: every command answers --help, option choices are the
registries' names, commands print what the library returns."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from tinyaccel.bench import SUITES
from tinyaccel.boards.build import BOARDS
from tinyaccel.cli import main
from tinyaccel.hw.config import PRESETS, get_config
from tinyaccel.hw.isa import Opcode
from tinyaccel.models import zoo
from tinyaccel.models.zoo import MODELS
from tinyaccel.sw.octo import METHODS
from tinyaccel.sw.runtime import BACKENDS


def _invoke(*args, **kwargs):
    return CliRunner().invoke(main, list(args), **kwargs)


@pytest.fixture(autouse=True)
def _no_board_env(monkeypatch):
    """--port/--baud export TINYACCEL_PORT/BAUD for the process: each test starts without."""
    import os
    for name in ("TINYACCEL_PORT", "TINYACCEL_BAUD"):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in ("TINYACCEL_PORT", "TINYACCEL_BAUD"):
        os.environ.pop(name, None)


def _commands(group: click.Group, path=()):
    """Every command path below ``group``, groups included."""
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = sorted(_commands(main))


def test_one_cli_holds_every_tool():
    top = {path[0] for path in COMMANDS}
    assert {"regress", "build", "zoo", "bench", "infer", "train", "spec", "video"} <= top
    assert ("zoo", "list") in COMMANDS and ("zoo", "train") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help(path):
    result = _invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    assert f"Usage: tinyaccel {' '.join(path)}" in result.output


# (arguments before the bad value, registry whose names are the valid choices)
CHOICES = [
    (("infer", "--model"), MODELS),
    (("infer", "--backend"), BACKENDS),
    (("infer", "--config"), PRESETS),
    (("train", "--method"), METHODS),
    (("train", "--model"), MODELS),
    (("train", "--config"), PRESETS),
    (("build", "--board"), BOARDS),
    (("build", "--board", "icebreaker", "--config"), PRESETS),
    (("regress", "--config"), PRESETS),
    (("bench",), SUITES),
    (("zoo", "train"), MODELS),
]


@pytest.mark.parametrize(("args", "registry"), CHOICES, ids=[" ".join(a) for a, _ in CHOICES])
def test_choice_error_names_the_value_and_the_registry(args, registry):
    result = _invoke(*args, "no-such-name")
    assert result.exit_code == 2, result.output
    assert "'no-such-name'" in result.output
    for name in registry:
        assert f"'{name}'" in result.output


def test_training_backends_are_the_runtime_backends_and_host():
    result = _invoke("train", "--backend", "no-such-name")
    assert result.exit_code == 2
    for name in (*BACKENDS, "host"):
        assert f"'{name}'" in result.output


def test_unknown_opcode_names_the_opcodes_of_the_isa():
    result = _invoke("regress", "--opcodes", "gemm,frobnicate")
    assert result.exit_code == 2
    assert "'frobnicate'" in result.output
    for op in Opcode:
        assert op.name in result.output


def test_rtl_bench_options_need_the_rtl_suite():
    result = _invoke("bench", "golden", "--rtl-repeats", "3")
    assert result.exit_code == 2
    assert "--rtl-repeats" in result.output and "rtl suite" in result.output


def test_zoo_lists_every_model():
    result = _invoke("zoo")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(MODELS)
    for line, spec in zip(lines, MODELS.values(), strict=True):
        assert line.split()[0] == spec.name and spec.description in line
    assert _invoke("zoo", "list").output == result.output


def test_zoo_trains_into_a_directory(tmp_path):
    result = _invoke("zoo", "train", "digits-cnn", "--epochs", "1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.splitlines()[-1])
    assert record["model"] == "digits-cnn"
    assert record["path"] == str(tmp_path / "digits-cnn-seed0-e1.npz")
    assert (tmp_path / "digits-cnn-seed0-e1.npz").exists()
    _, metrics = zoo.load("digits-cnn", tmp_path / "digits-cnn-seed0-e1.npz")
    assert {k: v for k, v in record.items() if k not in ("model", "path")} == metrics
    missing = _invoke("zoo", "train")
    assert missing.exit_code == 2 and "name a model or pass --all" in missing.output


def test_infer_prints_and_writes_what_evaluate_returns(tmp_path):
    from tinyaccel.sw.evaluate import evaluate
    out = tmp_path / "infer.json"
    result = _invoke("infer", "--model", "digits-cnn", "--backend", "golden", "--json", str(out))
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    expected = evaluate("digits-cnn", "golden", "sim")
    reference = expected.as_dict()
    assert written.pop("wall_s") >= 0 and reference.pop("wall_s") >= 0
    assert written == reference
    assert f"accuracy  fp32 {expected.acc_fp32:.4f}   int8 {expected.acc_int8:.4f}" \
        in result.output
    for st in expected.layers:
        assert f"  {st.name:<18}{st.kind:<9}{st.macs:>12}" in result.output


def test_library_errors_become_one_line_and_status_1():
    result = _invoke("infer", "--backend", "board")  # no --port
    assert result.exit_code == 1
    assert "error: BackendUnavailable:" in result.output and "--port" in result.output
    assert "Traceback" not in result.output


def test_regress_exit_status_follows_the_results(monkeypatch):
    """The CLI's verdict (PASS/FAIL line, exit status) comes from the results it is given."""
    from tinyaccel.sim import regress as regression

    def fake_run(configs, programs, seed, **kwargs):
        return [regression.RegressResult(name, seed, programs=programs,
                                         mismatches=int(name == "ecp5"))
                for name in configs]

    monkeypatch.setattr(regression, "run", fake_run)
    bad = _invoke("regress", "--config", "ice40", "--config", "ecp5", "--programs", "3",
                  "--seed", "0x10")
    assert bad.exit_code == 1
    assert "TINYACCEL_SEED=16" in bad.output and "FAIL: 6 random programs, 1 failing" in bad.output
    good = _invoke("regress", "--config", "ice40", "--programs", "3", "--seed", "16")
    assert good.exit_code == 0 and "PASS: 3 random programs, 0 failing" in good.output


@pytest.mark.rtl
def test_regress_runs_and_replays(tmp_path, monkeypatch):
    """A short real regression on ice40; the printed seed, given back, replays the same run."""
    out = tmp_path / "regress.json"
    first = _invoke("regress", "--programs", "2", "--config", "ice40", "--no-progress",
                    "--json", str(out))
    assert first.exit_code == 0, first.output
    seed = int(first.output.split("TINYACCEL_SEED=")[1].split()[0])
    [record] = json.loads(out.read_text())
    assert record["config"] == "ice40" and record["seed"] == seed
    assert record["programs"] == 2 and record["corners"] > 0
    assert record["mismatches"] == 0 and record["hangs"] == 0
    assert "PASS: 2 random programs, 0 failing" in first.output
    monkeypatch.setenv("TINYACCEL_SEED", str(seed))
    again = _invoke("regress", "--programs", "2", "--config", "ice40", "--no-progress",
                    "--json", str(out))
    assert again.exit_code == 0, again.output
    assert f"TINYACCEL_SEED={seed}" in again.output
    assert json.loads(out.read_text())[0]["cycles"] == record["cycles"]


@pytest.mark.rtl
def test_regress_checks_a_saved_stream(tmp_path):
    from tinyaccel.sim.regress import program_for_seed
    stream, _ = program_for_seed(get_config("ice40"), 12345, list(Opcode))
    path = tmp_path / "program.bin"
    path.write_bytes(stream)
    result = _invoke("regress", "--config", "ice40", "--stream", str(path))
    assert result.exit_code == 0, result.output
    verdicts = [line for line in result.output.splitlines() if str(path) in line]
    assert len(verdicts) == 2 and all(": ok (" in line for line in verdicts)


@pytest.mark.parametrize("baud", [None, 115200])
def test_board_backend_opens_the_port_at_the_links_rate(monkeypatch, baud):
    """Without --baud the board backend opens the port at the board's link rate."""
    import serial

    from tinyaccel.boards.link import DEFAULT_BAUD
    opened = []

    def fake_serial(port, baudrate, timeout):
        opened.append((port, baudrate))
        raise serial.SerialException("no such device (test)")

    monkeypatch.setattr(serial, "Serial", fake_serial)
    args = ["infer", "--backend", "board", "--config", "ice40", "--port", "/dev/ttyTEST"]
    result = _invoke(*args, *(["--baud", str(baud)] if baud else []))
    assert result.exit_code == 1 and "cannot open serial port '/dev/ttyTEST'" in result.output
    assert "BoardNotFound" in result.output
    assert opened == [("/dev/ttyTEST", DEFAULT_BAUD if baud is None else baud)]


@pytest.mark.parametrize("command", [
    ["train", "--max-steps", "1", "--epochs", "1"],
    ["collab", "--model", "digits-cnn", "--epochs", "1", "--max-steps", "1", "--seeds", "0",
     "--codec", "fp32"],
    ["video", "--frames", "3"],
])
def test_every_board_command_takes_port_and_baud(monkeypatch, tmp_path, command):
    """train, collab and video with --backend board open the port given, at the rate given."""
    import serial
    opened = []

    def fake_serial(port, baudrate, timeout):
        opened.append((port, baudrate))
        raise serial.SerialException("no such device (test)")

    monkeypatch.setattr(serial, "Serial", fake_serial)
    monkeypatch.chdir(tmp_path)
    result = _invoke(*command, "--backend", "board", "--config", "ecp5", "--port", "/dev/ttyX",
                     "--baud", "230400")
    assert result.exit_code == 1, result.output
    assert "cannot open serial port '/dev/ttyX'" in result.output
    assert opened and set(opened) == {("/dev/ttyX", 230400)}


def test_program_prints_what_was_programmed(monkeypatch):
    import tinyaccel.boards.program as prog
    calls = []

    def fake(board, bitstream=None, *, flash=False, cable=None, progress=None):
        calls.append((board, bitstream, flash, cable))
        return {"board": board, "bitstream": "build/boards/icebreaker/top.bin",
                "bitstream_bytes": 104090, "seconds": 2.5, "tool_version": "v1.1.1"}

    monkeypatch.setattr(prog, "program", fake)
    result = _invoke("program", "--board", "icebreaker", "--flash")
    assert result.exit_code == 0, result.output
    assert calls == [("icebreaker", None, True, None)]
    assert "programmed icebreaker (flash)" in result.output and "104,090 bytes" in result.output


def test_board_check_on_the_golden_link(monkeypatch, tmp_path):
    """board check through the real driver, the port replaced by the golden-model link."""
    import serial

    from tinyaccel.sim.serial_link import SimulatedSerial
    monkeypatch.setattr(serial, "Serial", lambda port, baudrate, timeout:
                        SimulatedSerial("ice40", timeout=timeout))
    out = tmp_path / "check.json"
    result = _invoke("board", "check", "--config", "ice40", "--port", "/dev/ttyTEST",
                     "--json", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["config"] == "ice40" and record["status"] == "OK"
    assert record["config_id"] == f"0x{get_config('ice40').config_id:06x}"
    assert f"config_id {record['config_id']} (matches the driver)" in result.output


def test_bench_prints_and_writes_the_suites_metrics(tmp_path):
    """What is measured is not asserted here (bench/ measures); only that it is all reported."""
    from tinyaccel.bench import golden
    out = tmp_path / "bench.json"
    result = _invoke("bench", "golden", "--json", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert set(metrics) == {*golden.run(repeats=1, numpy_repeats=1), "bench_golden_wall_s"}
    printed = {line.split()[0] for line in result.stdout.splitlines()}
    assert printed == set(metrics)


def test_train_writes_its_run_folder_and_prints_its_table(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "train.json"
    result = _invoke("train", "--method", "int8-naive", "--backend", "host", "--epochs", "1",
                     "--max-steps", "2", "--run-dir", str(run_dir), "--json", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert (record["method"], record["backend"], record["epochs"]) == ("int8-naive", "host", 1)
    table = (run_dir / "table.md").read_text()
    assert table.strip() in result.stdout
    assert "| int8-naive | host | 1 |" in table
    assert (run_dir / "training.png").exists()


def test_train_resume_needs_the_run_folder():
    result = _invoke("train", "--resume")
    assert result.exit_code == 2 and "--resume needs --run-dir" in result.output


def test_build_passes_its_options_and_reports_the_result(monkeypatch, tmp_path):
    """The board flow itself is tested in test_boards/test_build_ecp5; here: the command's
    options reach it, its result is printed, a missed clock warns, an unfit design shows what
    it needs."""
    from tinyaccel.boards import build as board_build
    from tinyaccel.errors import BuildError
    calls = []

    def fake_build(board, json_path, **kwargs):
        calls.append((board, json_path, kwargs))
        if kwargs["config"] == "sim":
            error = BuildError("the design does not fit the icebreaker FPGA (test)")
            error.result = {"board": board, "config": "sim", "fits": False, "dsp_used": 256}
            raise error
        return {"board": board, "config": kwargs["config"], "fmax_mhz": 27.5, "clock_mhz": 30.0,
                "timing_met": False, "fits": True}

    monkeypatch.setattr(board_build, "build", fake_build)
    out = tmp_path / "b.json"
    result = _invoke("build", "--board", "icebreaker", "--config", "ice40", "--baud", "115200",
                     "--seed", "3", "--allow-timing-failure", "--json", str(out))
    assert result.exit_code == 0, result.output
    board, json_path, kwargs = calls[-1]
    assert (board, json_path) == ("icebreaker", out)
    assert kwargs["config"] == "ice40" and kwargs["seed"] == 3 and kwargs["baud"] == 115200
    assert kwargs["allow_timing_failure"] is True
    assert "fmax_mhz          27.5" in result.stdout
    assert "--clock-mhz 27" in result.stderr
    unfit = _invoke("build", "--board", "icebreaker", "--config", "sim")
    assert unfit.exit_code == 1
    assert "fits              False" in unfit.stdout and "dsp_used          256" in unfit.stdout
    assert "error: BuildError: the design does not fit" in unfit.stderr


def test_video_writes_its_json_plots_and_animation(tmp_path):
    """`tinyaccel video` end to end on the golden model (a short clip; the model trains once
    into the cache when it is not there): the files, the checks it reports, and the figures it
    prints equal those it writes."""
    out, folder = tmp_path / "video.json", tmp_path / "video"
    result = _invoke("video", "--frames", "4", "--sweep", "--json", str(out), "--out",
                     str(folder))
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())
    assert m["threshold0_identical"] is True and m["frames"] == 4
    assert (folder / "pass.gif").stat().st_size > 0 and (folder / "frames.png").exists()
    assert (folder / "tradeoff.png").exists() and len(m["sweep"]) > 3
    assert f"speedup macs: {m['speedup_macs']:.2f}x" in result.output
    assert m["task_metric_dense"] > 0.5  # the model segments the digits at all


def test_video_names_a_clip_too_short(tmp_path):
    import imageio.v3 as iio
    clip = tmp_path / "two.gif"
    frames = np.zeros((2, 48, 64), np.uint8)
    frames[1] = 200  # (two equal frames would be one in a GIF)
    iio.imwrite(clip, frames)
    result = _invoke("video", "--input", str(clip))
    assert result.exit_code == 1
    assert "ShapeError" in result.output and "2 frames" in result.output


def test_collab_writes_its_json_table_and_plot(tmp_path):
    out, js = tmp_path / "collab", tmp_path / "collab.json"
    result = _invoke("collab", "--model", "digits-cnn", "--epochs", "1", "--max-steps", "2",
                     "--seeds", "0,1", "--codec", "fp32", "--codec", "sgq", "--budget", "3",
                     "--headline", "3", "--backend", "host", "--jobs", "1", "--out", str(out),
                     "--json", str(js))
    assert result.exit_code == 0, result.output
    record = json.loads(js.read_text())
    labels = [r["label"] for r in record["summary"]]
    assert labels == ["fp32", "sgq-3b"]
    assert len(record["runs"]) == 4 and {r["seed"] for r in record["runs"]} == {0, 1}
    head = record["headline"]
    assert head["label"] == "sgq-3b" and head["uplink_reduction_vs_fp32"] > 1
    assert (out / "table.md").read_text().strip() in result.stdout
    assert (out / "tradeoff.png").stat().st_size > 0
    assert "headline SGQ at 3 bits/value" in result.stdout


def test_collab_bad_split_names_the_layers():
    result = _invoke("collab", "--model", "digits-cnn", "--split", "conv9")
    assert result.exit_code != 0
    assert "conv9" in result.output and "relu2" in result.output
