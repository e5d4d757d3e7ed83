"""The ``tinyaccel`` command line. A subcommand exists only when it works."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import click

from . import __version__
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
@click.version_option(__version__, prog_name="tinyaccel")
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


if __name__ == "__main__":  # pragma: no cover
    main()
