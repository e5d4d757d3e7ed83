"""MLPerf Tiny, resident and per-layer: one inference per model on the golden model and the RTL.

For each of the zoo's four MLPerf Tiny models (:mod:`tinyaccel.models.mlperf_tiny`; seeded
random weights, BatchNorm calibrated, no accuracy claimed) the suite quantizes on seeded random
inputs, then runs ONE inference at batch 1 on the golden model and on the Verilated RTL of the
configuration (default ``ecp5``), on the resident path (:mod:`tinyaccel.sw.resident`: one program
per inference, activations on chip, weights loaded once by a setup program) and on the per-layer
path, and reports, per model ``m`` in ``ic, kws, vww, ad``, the resident figures under the keys
below and the per-layer ones beside them with the suffix ``_per_layer`` (a model the resident
planner refuses on the configuration reports its per-layer run under both, ``resident_<m>``
False and the planner's reason in ``resident_reason_<m>``):

* ``cycles_<m>``: accelerator cycles of the RTL run, summed over the layers' programs;
* ``mac_util_<m>``: useful MACs / (array MACs x cycles);
* ``link_bytes_<m>``: host stream + responses of the inference (counted at the backend);
* ``resident_<m>``: ``True`` when the model runs resident (``resident_<m>_per_layer``:
  ``False``: every layer round-trips through the host, which builds the im2col tiles and reads
  each layer's output back);
* ``setup_link_bytes_<m>``: the resident setup program's bytes (weights loaded once; None when
  the model does not run resident);
* ``est_cycles_<m>``: the resident planner's estimate (the busiest unit,
  :meth:`~tinyaccel.sw.resident_plan.ResidentPlan.estimate_cycles`), beside the RTL's count;
* ``golden_rtl_identical_<m>``: golden and RTL logits are equal;
* ``latency_ms_<m>``: cycles at the clock, the on-device latency as MLPerf Tiny measures it (on
  the per-layer path every layer's operands cross the link, so there it is the accelerator's busy
  time only, and ``latency_with_link_ms_<m>_per_layer`` is the honest figure);
* ``latency_with_link_ms_<m>``: adds ``link_bytes x 10 bits / baud`` (UART 8N1 at
  :data:`tinyaccel.boards.board.DEFAULT_BAUD`).

The clock (``clock_mhz``, ``clock_source``): the board that builds the configuration's preset
(:data:`tinyaccel.boards.build.BOARDS`) at the frequency its bitstream meets, i.e.
``min(fmax_mhz, clock_mhz)`` of the newest ``tinyaccel build`` JSON for that board under
``build_root`` (``<build_root>/<board>/result.json`` or ``<build_root>/*.json``); without one,
the ``clock_mhz`` option; without that, the board top's default clock, with ``clock_source``
``"board default (timing not checked)"``.

Besides the flat metrics, ``run`` prints one table per model with the published MLPerf Tiny
latencies (:data:`ANCHORS`) beside ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..hw.config import get_config
from ..sw.runtime import LinkCounter

__all__ = ["MODELS", "ANCHORS", "ANCHOR_SOURCE", "board_clock", "run",
           "format_tables"]

#: Short key of the metrics -> zoo model name.
MODELS = {"ic": "ic-resnet8", "kws": "kws-dscnn", "vww": "vww-mobilenet", "ad": "ad-autoencoder"}
#: Seeds of the inputs the quantizer is calibrated on and of the one input inferred (those of
#: tests/test_mlperf_tiny.py), and the calibration set's size.
CALIBRATION_SEED, INPUT_SEED, CALIBRATION = 100, 200, 256
#: Link bits per byte: UART 8N1 (start, 8 data, stop).
BITS_PER_BYTE = 10
BOARD_DEFAULT = "board default (timing not checked)"

ANCHOR_SOURCE = ("MLPerf Tiny inference results (v1.x closed division) as quoted in issue 12; "
                 "on-device latency, input already loaded")


@dataclass(frozen=True)
class Anchor:
    """A published MLPerf Tiny latency for one model."""
    model: str  # short key of MODELS
    system: str
    latency_ms: float


#: Published MLPerf Tiny latencies (source: :data:`ANCHOR_SOURCE`).
ANCHORS: tuple[Anchor, ...] = (
    Anchor("ic", "fpgaConvNet, Zynq XC7Z010 @ 125 MHz", 3.15),
    Anchor("ic", "hls4ml, Pynq-Z2", 7.64),
    Anchor("ic", "STM32H7A3 @ 280 MHz", 40.8),
    Anchor("ic", "fpgaConvNet, Zynq XC7Z020", 0.41),
    Anchor("ic", "STM32L4R5 (iCE40 anchor, v1.2/1.3)", 165.0),
    Anchor("kws", "fpgaConvNet, Zynq XC7Z010", 2.15),
    Anchor("kws", "Syntiant NDP9120", 1.48),
    Anchor("kws", "STM32L4R5 (iCE40 anchor, v1.2/1.3)", 43.0),
    Anchor("vww", "Syntiant NDP9120", 4.10),
)


def _board_for(config: str):
    from ..boards.build import BOARDS
    for spec in BOARDS.values():
        if spec.top.default_config == config:
            return spec
    return None


def _newest_build(board: str, config: str, build_root: Path) -> tuple[Path, dict] | None:
    """The newest ``tinyaccel build`` result for ``board`` built with ``config`` that fits."""
    found = []
    for path in [build_root / board / "result.json", *sorted(build_root.glob("*.json"))]:
        if not path.is_file():
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(result, dict) and result.get("board") == board
                and result.get("config") == config and result.get("fmax_mhz")
                and result.get("clock_mhz")):
            found.append((path.stat().st_mtime, path, result))
    if not found:
        return None
    _, path, result = max(found, key=lambda item: item[0])
    return path, result


def board_clock(config: str, clock_mhz: float | None = None,
                build_root: str | Path = "build/boards") -> tuple[float, str]:
    """``(clock_mhz, clock_source)`` for ``config``: see the module docstring for the order.

    Raises
    ------
    ConfigError
        No board builds ``config``, no build result and no ``clock_mhz``; or ``clock_mhz <= 0``.
    """
    if clock_mhz is not None and clock_mhz <= 0:
        raise ConfigError(f"clock_mhz={clock_mhz!r} must be positive")
    spec = _board_for(config)
    if spec is not None:
        newest = _newest_build(spec.name, config, Path(build_root))
        if newest is not None:
            path, result = newest
            return min(float(result["fmax_mhz"]), float(result["clock_mhz"])), str(path)
    if clock_mhz is not None:
        return float(clock_mhz), "clock_mhz option"
    if spec is None or spec.top.default_clock_hz is None:
        raise ConfigError(f"no board builds the {config!r} preset: give clock_mhz")
    return spec.top.default_clock_hz / 1e6, BOARD_DEFAULT


def _measure(qmodel, x, config: str, backend: str, placement: str) -> dict:
    """One inference on ``backend`` with ``placement``: logits, cycles, useful MACs, link bytes
    (the resident path: the inference program only; its setup program is ``setup_bytes``)."""
    from ..sw.compiler import bind
    from ..sw.runtime import Device, open_backend
    link = LinkCounter(open_backend(backend, get_config(config)))
    with Device(link, config) as device:
        compiled = bind(qmodel, device, batch_size=1, placement=placement)
        if placement == "resident":
            compiled.setup()
        setup_bytes = link.link_bytes
        logits = compiled(x).numpy()
    plan = getattr(compiled, "plan", None)
    return {"logits": logits, "cycles": compiled.cycles,
            "est_cycles": plan.estimate_cycles()["overlapped"] if plan else None,
            "macs": sum(s.macs for s in compiled.stats.values()),
            "link_bytes": link.link_bytes - setup_bytes, "setup_bytes": setup_bytes}


def _infer(name: str, config: str, backends=("golden", "rtl")) -> dict:
    """One batch-1 inference of zoo model ``name`` per placement (resident, per-layer) on each of
    ``backends``; the RTL figures (cycles) when ``"rtl"`` is among them. A model the resident
    planner refuses on ``config`` reports its per-layer run under ``"resident"`` too, with
    ``resident`` False and the planner's ``reason``.

    Raises
    ------
    AssertionError
        When golden and RTL move different link bytes for the same programs.
    """
    import numpy as np

    from ..models import mlperf_tiny, zoo
    from ..sw.quant import quantize
    spec = zoo.get(name)
    model, _ = spec.train_fp32(seed=0)
    qmodel = quantize(model, mlperf_tiny.random_inputs(spec.input_shape, CALIBRATION,
                                                       seed=CALIBRATION_SEED))
    x = mlperf_tiny.random_inputs(spec.input_shape, 1, seed=INPUT_SEED)
    from ..sw.resident_plan import resident_reason
    reason = resident_reason(qmodel, get_config(config))
    out = {}
    for placement in ("resident", "per-layer") if reason is None else ("per-layer",):
        runs = {b: _measure(qmodel, x, config, b, placement) for b in backends}
        golden = runs["golden"]
        r = {"resident": placement == "resident", "reason": reason,
             "link_bytes": golden["link_bytes"], "setup_bytes": golden["setup_bytes"],
             "est_cycles": golden["est_cycles"],
             "macs": golden["macs"], "cycles": None, "identical": None}
        if "rtl" in runs:
            rtl = runs["rtl"]
            if rtl["link_bytes"] != golden["link_bytes"]:  # same programs, same responses
                raise AssertionError(f"{name} {config} {placement}: golden moved "
                                     f"{golden['link_bytes']} link bytes, RTL "
                                     f"{rtl['link_bytes']}")
            r["cycles"] = rtl["cycles"]
            r["identical"] = bool(np.array_equal(golden["logits"], rtl["logits"]))
        out[placement] = r
    out.setdefault("resident", {**out["per-layer"], "setup_bytes": None})
    return out


def run(progress=None, config: str = "ecp5", models=tuple(MODELS), clock_mhz: float | None = None,
        build_root: str | Path = "build/boards", baud: int | None = None,
        show: bool = True, backends=("golden", "rtl")) -> dict:
    """One inference per MLPerf Tiny model on golden and RTL of ``config``; flat metrics.

    ``models`` are short keys of :data:`MODELS`; ``clock_mhz`` and ``build_root`` choose the clock
    (:func:`board_clock`); ``baud`` the link rate (default ``DEFAULT_BAUD``); ``show`` prints
    the per-model tables (:func:`format_tables`); ``backends`` without ``"rtl"`` leaves the
    cycle figures None (the golden model counts no cycles).

    Raises
    ------
    ConfigError
        An unknown model key or preset, or no clock for the preset, before anything runs.
    """
    from ..boards.board import DEFAULT_BAUD
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"unknown MLPerf Tiny model(s) {unknown}; models: {', '.join(MODELS)}")
    cfg = get_config(config)
    mhz, source = board_clock(cfg.name, clock_mhz, build_root)
    baud = DEFAULT_BAUD if baud is None else baud
    if baud <= 0:
        raise ConfigError(f"baud={baud!r} must be positive")
    result: dict = {"mlperf_config": cfg.name, "clock_mhz": mhz, "clock_source": source,
                    "link_baud": baud}
    steps = list(models)
    if progress is not None:
        steps = progress(steps, desc=f"mlperf-tiny {cfg.name}", leave=False)
    for m in steps:
        runs = _infer(MODELS[m], cfg.name, backends)
        for placement, suffix in (("resident", ""), ("per-layer", "_per_layer")):
            r = runs[placement]
            cycles = r["cycles"]
            latency_ms = None if cycles is None else cycles / (mhz * 1e3)
            link_ms = r["link_bytes"] * BITS_PER_BYTE / baud * 1e3
            result[f"cycles_{m}{suffix}"] = cycles
            result[f"mac_util_{m}{suffix}"] = (r["macs"] / (cfg.macs * cycles) if cycles
                                               else None)
            result[f"link_bytes_{m}{suffix}"] = r["link_bytes"]
            result[f"resident_{m}{suffix}"] = r["resident"]
            result[f"golden_rtl_identical_{m}{suffix}"] = r["identical"]
            result[f"latency_ms_{m}{suffix}"] = latency_ms
            result[f"latency_with_link_ms_{m}{suffix}"] = (None if latency_ms is None
                                                           else latency_ms + link_ms)
        if runs["resident"]["reason"] is not None:
            result[f"resident_reason_{m}"] = runs["resident"]["reason"]
        result[f"setup_link_bytes_{m}"] = runs["resident"]["setup_bytes"]
        result[f"est_cycles_{m}"] = runs["resident"]["est_cycles"]
    if show:
        print(format_tables(result))
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_tables(metrics: dict) -> str:
    """One text table per model in ``metrics``: our latencies (resident and, when present,
    per-layer) beside the published anchors; ``-`` where no RTL run measured cycles."""
    blocks = []
    ours = f"tinyaccel {metrics['mlperf_config']} @ {metrics['clock_mhz']:.4g} MHz"
    for m, name in MODELS.items():
        if f"cycles_{m}" not in metrics:
            continue
        rows, lines = [], []
        for suffix in ("", "_per_layer"):
            if f"cycles_{m}{suffix}" not in metrics:
                continue
            path = ("resident" if metrics[f"resident_{m}{suffix}"] else "per-layer") + " path"
            rows += [(f"{ours} ({path}, on device)", _fmt(metrics[f"latency_ms_{m}{suffix}"],
                                                          ".4g")),
                     (f"{ours} ({path}, with the link, {metrics['link_baud']:,} baud)",
                      _fmt(metrics[f"latency_with_link_ms_{m}{suffix}"], ".4g"))]
            lines.append(f"  {path}: {_fmt(metrics[f'cycles_{m}{suffix}'], ',')} cycles, MAC "
                         f"utilization {_fmt(metrics[f'mac_util_{m}{suffix}'], '.3f')}, "
                         f"{metrics[f'link_bytes_{m}{suffix}']:,} link bytes, golden == RTL "
                         f"{_fmt(metrics[f'golden_rtl_identical_{m}{suffix}'], '')}")
        rows += [(a.system, f"{a.latency_ms:.4g}") for a in ANCHORS if a.model == m]
        width = max(len(system) for system, _ in rows)
        lines = [f"{name}:", *lines, f"  {'system':<{width}}  latency ms"]
        lines += [f"  {system:<{width}}  {ms:>10}" for system, ms in rows]
        blocks.append("\n".join(lines))
    blocks.append(f"anchors: {ANCHOR_SOURCE}; clock: {metrics['clock_source']}")
    return "\n\n".join(blocks)
