"""The ``tinyaccel`` command line. A subcommand exists only when it works."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import click

from .errors import TinyAccelError


class _Group(click.Group):
    """Turns tinyaccel errors into one clear line and exit status 1 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TinyAccelError as exc:
            click.secho(f"error: {type(exc).__name__}: {exc}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Group)
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
@click.argument("suites", nargs=-1)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the metrics as one flat JSON object to this file.")
def bench(suites: tuple[str, ...], json_path: Path | None):
    """Run benchmark SUITES (default: all) and print/write their metrics."""
    from tqdm import tqdm

    from .bench import SUITES
    names = list(suites) or list(SUITES)
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise click.BadParameter(f"unknown suite(s) {', '.join(unknown)}; "
                                 f"available: {', '.join(SUITES)}", param_hint="SUITES")
    metrics: dict = {}
    for name in names:
        click.echo(f"== bench {name}", err=True)
        start = time.perf_counter()
        result = importlib.import_module(SUITES[name]).run(progress=tqdm)
        clash = set(result) & set(metrics)
        if clash:
            raise click.ClickException(f"suite {name} repeats metric(s) {sorted(clash)}")
        metrics.update(result)
        metrics[f"bench_{name}_wall_s"] = round(time.perf_counter() - start, 3)
    width = max(map(len, metrics), default=0)
    for key, value in metrics.items():
        click.echo(f"{key:<{width}}  {value:.4g}" if isinstance(value, float)
                   else f"{key:<{width}}  {value}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(metrics, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)


@main.command()
@click.option("--model", "model_name", default="digits-cnn", show_default=True,
              help="Model from the zoo (digits-cnn, mobilenet-block).")
@click.option("--backend", type=click.Choice(["golden", "rtl", "board"]), default="golden",
              show_default=True)
@click.option("--config", "config_name", default="sim", show_default=True,
              help="Accelerator configuration preset.")
@click.option("--port", help="Serial port of the board backend.")
@click.option("--batch", "batch_size", default=120, show_default=True,
              help="Images per accelerator program.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def infer(model_name, backend, config_name, port, batch_size, json_path):
    """Quantized inference of a zoo model on the digits test split, on a backend.

    With --backend rtl the golden model runs the same programs too, and every logit is compared.
    """
    import numpy as np
    from tqdm import tqdm

    from .models import zoo
    from .models.data import accuracy, calibration_batch, load_digits_split
    from .sw.compiler import CompiledModel
    from .sw.quant import quantize
    from .sw.runtime import Device

    split = load_digits_split()
    model, _ = zoo.load_or_train(model_name)
    acc_fp32 = accuracy(model, split.x_test, split.y_test)
    qmodel = quantize(model, calibration_batch())
    options = {"port": port} if backend == "board" else {}
    with Device(backend, config_name, **options) as device:
        compiled = CompiledModel(qmodel, device, batch_size)
        logits = compiled(split.x_test, progress=tqdm)
    acc_int8 = float((logits.argmax(1) == split.y_test).float().mean())
    result = {"model": model_name, "backend": backend, "config": config_name,
              "images": len(split.y_test), "acc_fp32": round(float(acc_fp32), 4),
              "acc_int8": round(acc_int8, 4), "cycles": compiled.cycles,
              "wall_s": round(compiled.wall_s, 3)}
    if backend != "golden":
        with Device("golden", config_name) as golden:
            reference = CompiledModel(qmodel, golden, batch_size)(split.x_test)
        result["golden_rtl_identical"] = bool(np.array_equal(logits.numpy(),
                                                             reference.numpy()))
    click.echo(f"{model_name} on {backend} ({config_name}, {device.config.macs} MACs): "
               f"{result['images']} test images")
    click.echo(f"  accuracy  fp32 {acc_fp32:.4f}   int8 {acc_int8:.4f}")
    if "golden_rtl_identical" in result:
        click.echo(f"  golden vs {backend} logits identical: {result['golden_rtl_identical']}")
    click.echo(f"  {'layer':<18}{'kind':<9}{'MACs':>12}{'cycles':>12}{'MAC util':>10}")
    for st in compiled.stats.values():
        util = f"{st.utilization:.3f}" if st.cycles else "-"
        result[f"util_{st.name}"] = round(st.utilization, 4) if st.cycles else None
        click.echo(f"  {st.name:<18}{st.kind:<9}{st.macs:>12}{st.cycles:>12}{util:>10}")
    click.echo(f"  total cycles {compiled.cycles}, wall {compiled.wall_s:.1f} s")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)


@main.command("train")
@click.option("--model", "model_name", default="digits-cnn", show_default=True,
              help="Model from the zoo.")
@click.option("--method", type=click.Choice(["fp32", "int8-naive", "octo"]), default="octo",
              show_default=True, help="fp32 (torch), int8-naive (RTN, no LAC/PRC) or octo.")
@click.option("--backend", type=click.Choice(["golden", "rtl", "board", "host"]),
              default="golden", show_default=True,
              help="Where the INT8 GEMMs run (host: exact NumPy GEMMs, no accelerator).")
@click.option("--config", "config_name", default="sim", show_default=True,
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
    from dataclasses import replace

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

    results = []
    for s in seed_list:
        cfg = replace(base, seed=s)
        folder = run_dir / f"seed{s}" if len(seed_list) > 1 else run_dir
        if compare:
            results += training.compare(cfg, folder, resume=resume, progress=True, log=log)
        else:
            results.append(training.train(cfg, folder, resume=resume, progress=True, log=log))
    run_dir.mkdir(parents=True, exist_ok=True)
    table = training.comparison_table(results)
    (run_dir / "table.md").write_text(table + "\n")
    plot = training.plot_runs(results, run_dir / "training.png")
    click.echo(table)
    if len(seed_list) > 1 and compare:
        click.echo("\n" + training.comparison_table(
            [r for r in results if r["seed"] == seed_list[0]]))
    click.echo(f"run folder {run_dir} (metrics.json, checkpoint.pt per run; {plot.name})",
               err=True)
    if json_path:
        head = next((r for r in results if r["label"] == "octo"), results[0])
        out = {k: v for k, v in head.items() if k != "history"}
        if len(results) > 1:
            out["runs"] = results
            out["summary"] = training.summarize_seeds(results)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)


@main.command("build")
@click.option("--board", type=click.Choice(["icebreaker", "ulx3s-85f"]), required=True)
@click.option("--config", "config_name", help="Accelerator preset (default: the board's).")
@click.option("--clock-mhz", type=float, help="PLL frequency (default: the board top's).")
@click.option("--seed", default=1, show_default=True, help="nextpnr placement seed.")
@click.option("--synth-opts", help="Extra synth_ice40/synth_ecp5 options, e.g. -noabc9.")
@click.option("--build-root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/boards"), show_default=True,
              help="The build goes into BUILD_ROOT/BOARD/.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def build_cmd(board, config_name, clock_mhz, seed, synth_opts, build_root, json_path):
    """Build a bitstream with the YoWASP tools; report Fmax, resources and peak GOPS."""
    from .boards.build import build as build_board
    result = build_board(board, json_path, config=config_name, clock_mhz=clock_mhz, seed=seed,
                         synth_opts=synth_opts, build_root=build_root)
    for key in ("board", "config", "macs", "fmax_mhz", "peak_gops", "dsp_used", "dsp_total",
                "lut_used", "lut_total", "bram_used", "bram_total", "fits", "timing_met",
                "bitstream", "wall_s"):
        if key in result:
            click.echo(f"{key:<11} {result[key]}")
    if json_path:
        click.echo(f"wrote {json_path}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
