"""Benchmark suites for ``tinyaccel bench``.

Each suite is a module here with ``run(progress=None, **options) -> dict`` returning flat, named
metrics. Performance is measured here, never asserted in tests.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable

from tinyaccel.errors import ConfigError

__all__ = ["SUITES", "run_suites"]

SUITES: dict[str, str] = {
    "golden": "tinyaccel.bench.golden",  # golden-model GEMM speed vs numpy's integer matmul
    "rtl": "tinyaccel.bench.rtl",  # Verilator / Amaranth-sim speed and MAC utilization
    "mlperf-tiny": "tinyaccel.bench.mlperf_tiny",  # the four MLPerf Tiny models, golden and RTL
    "pass-video": "tinyaccel.bench.pass_video",  # PASS patch skipping on the default scene
    "board": "tinyaccel.bench.board",  # the driver against the simulated board (UART, FIFO)
}


def run_suites(names: Iterable[str] = (), progress=None,
               options: dict[str, dict] | None = None,
               on_start: Callable[[str], None] | None = None) -> dict:
    """Run the suites ``names`` (default: all, in :data:`SUITES` order); one flat metrics dict.

    ``options`` maps a suite name to keyword arguments of its ``run``; ``progress`` is a
    tqdm-like wrapper passed to every suite; ``on_start(name)`` is called before each suite.
    Each suite adds ``bench_<name>_wall_s``.

    Raises
    ------
    ConfigError
        An unknown suite name, or two suites reporting the same metric.
    """
    names = list(names) or list(SUITES)
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise ConfigError(f"unknown bench suite(s) {', '.join(unknown)}; "
                          f"suites: {', '.join(SUITES)}")
    options = options or {}
    metrics: dict = {}
    for name in names:
        if on_start is not None:
            on_start(name)
        start = time.perf_counter()
        result = importlib.import_module(SUITES[name]).run(progress=progress,
                                                           **options.get(name, {}))
        clash = set(result) & set(metrics)
        if clash:
            raise ConfigError(f"bench suite {name} repeats metric(s) {sorted(clash)}")
        metrics.update(result)
        metrics[f"bench_{name}_wall_s"] = round(time.perf_counter() - start, 3)
    return metrics
