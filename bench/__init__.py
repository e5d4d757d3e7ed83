"""Benchmark suites for ``tinyaccel bench``.

Each suite is a module here with ``run(progress=None) -> dict`` returning flat, named metrics.
Performance is measured here, never asserted in tests.
"""

SUITES: dict[str, str] = {
    "golden": "tinyaccel.bench.golden",  # golden-model GEMM speed vs numpy's integer matmul
    "rtl": "tinyaccel.bench.rtl",  # Verilator / Amaranth-sim speed and MAC utilization
}
