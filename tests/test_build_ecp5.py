"""The ECP5 bitstream flow in CI: a ULX3S-85F bitstream, from Amaranth to ecppack.

The full ``ecp5`` preset (128 MACs, ~32 k LUTs) takes tens of minutes to place and route and runs
under ``make regress``. ``make test`` builds the same board top, PLL, UART bridge and accelerator
with the small ``ice40`` preset (8 MACs) through the same tools: Yosys ``synth_ecp5`` with the
multipliers on MULT18X18D, nextpnr-ecp5 for the LFE5U-85F, ecppack. A few minutes on 2 cores.
"""

import json

from tinyaccel.boards import build as board_build
from tinyaccel.boards.link import link_for
from tinyaccel.hw.config import get_config

ECP5_PREAMBLE = b"\xff\xff\xbd\xb3"  # the ECP5 configuration preamble word


def test_build_ulx3s_bitstream_small_preset(tmp_path):
    json_path = tmp_path / "ulx3s.json"
    steps = []
    result = board_build.build("ulx3s-85f", json_path, config="ice40", build_root=tmp_path,
                               progress=lambda step, done, total, detail: steps.append(step))
    cfg = get_config("ice40")

    # the JSON keys the issue names, written to the file
    written = json.loads(json_path.read_text())
    for key in ("fmax_mhz", "macs", "dsp_used", "dsp_total", "lut_used", "lut_total",
                "bram_used", "peak_gops", "peak_gops_at_fmax", "baud", "rx_fifo_bytes",
                "silence_bytes", "divisor"):
        assert written[key] == result[key], key
    assert result["board"] == "ulx3s-85f" and result["config"] == "ice40"
    assert result["macs"] == cfg.macs
    assert result["fits"] is True
    # every MAC of the array on a MULT18X18D, nothing else on the DSPs of this preset
    assert result["dsp_used"] == cfg.macs and result["dsp_total"] == 156
    assert 0 < result["lut_used"] < result["lut_total"] == 83640
    assert result["fmax_mhz"] > 0
    # the default 40 MHz clock: met (build() raises TimingError otherwise), the peak rate at it
    assert result["clock_mhz"] == 40.0 and result["timing_met"] is True
    assert result["peak_gops"] == round(2 * cfg.macs * 40.0 / 1000, 3)
    assert result["peak_gops_at_fmax"] == round(2 * cfg.macs * result["fmax_mhz"] / 1000, 3)
    assert result["divisor"] == 40
    assert result["rx_fifo_bytes"] == link_for("ulx3s-85f").rx_fifo_bytes
    assert steps[-1] == "done"

    bitstream = (tmp_path / "ulx3s-85f" / "top.bit").read_bytes()
    assert result["bitstream"].endswith("top.bit")
    assert b"LFE5U-85F" in bitstream[:64]
    assert ECP5_PREAMBLE in bitstream[:64]
    assert len(bitstream) > 100_000
