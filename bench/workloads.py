"""Whole programs for benchmarks and end-to-end tests: one GEMM with its host transfers.

:func:`gemm_program` is the driver's GEMM program (:class:`tinyaccel.sw.gemm_run.GemmProgram`:
the lowering of :mod:`tinyaccel.sw.gemm` with double-buffered INP/WGT/ACC/OUT/PARAM slots, each
tile's GEMM issued before the LOAD of the next tile, the REQUANT + STORE of a finished tile behind
the next tile's GEMM) between a ``SYNC clear=1`` that zeroes the counters and a final ``SYNC
counters=1``, so the counter record of one program measures exactly that program, host transfers
included. The benchmarks time its bytes on a simulator themselves; :meth:`GemmWorkload.parse`
reads the answer with the same reassembly as :func:`tinyaccel.sw.gemm_run.run_gemms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ShapeError
from ..hw.config import AccelConfig, get_config
from ..hw.isa import Counter
from ..protocol import Program, StatusReport, parse_responses, response_length
from ..sim.randprog import random_channel_params
from ..sw.gemm import GemmLowering
from ..sw.gemm_run import Gemm, GemmProgram

__all__ = ["GemmWorkload", "gemm_program", "random_gemm"]


@dataclass
class GemmWorkload:
    """A GEMM program and what is needed to read its answer."""
    config: AccelConfig
    gemm: GemmProgram
    M: int
    N: int
    K: int
    operands: tuple | None = None  # (a, b) when known

    @property
    def program(self) -> Program:
        return self.gemm.program

    @property
    def lowering(self) -> GemmLowering:
        """The GEMM's lowering (its plan: ``lowering.plan``)."""
        return self.gemm.lowerings[0]

    @property
    def macs(self) -> int:
        """Useful multiply-accumulates, M * N * K."""
        return self.M * self.N * self.K

    def to_bytes(self) -> bytes:
        return self.program.to_bytes()

    def response_bytes(self) -> int:
        return response_length(self.config, self.program)

    def parse(self, response: bytes) -> tuple[np.ndarray, StatusReport]:
        """The (M, N) result and the final status report (with counters) from the response."""
        items = parse_responses(self.config, self.program, response)
        (result,) = self.gemm.results(items)
        return result, items[-1]

    def utilization(self, report: StatusReport) -> dict:
        """MAC utilization from a counter record: over COMPUTE_CYCLES and over all CYCLES."""
        c = report.counters
        array = self.config.macs
        return {
            "macs": self.macs,
            "macs_issued": c[Counter.MACS_ISSUED],
            "cycles": c[Counter.CYCLES],
            "busy_cycles": c[Counter.BUSY_CYCLES],
            "compute_cycles": c[Counter.COMPUTE_CYCLES],
            "mac_util_compute": (c[Counter.MACS_ISSUED] / (array * c[Counter.COMPUTE_CYCLES])
                                 if c[Counter.COMPUTE_CYCLES] else 0.0),
            "mac_util_e2e": (self.macs / (array * c[Counter.CYCLES])
                             if c[Counter.CYCLES] else 0.0),
        }


def gemm_program(config: AccelConfig | str, a: np.ndarray, b: np.ndarray, params=None,
                 out: str = "int8") -> GemmWorkload:
    """The whole program computing ``a @ b`` (int8 (M, K) x int8 (K, N)).

    With ``out="int8"`` the result is requantized with ``params`` (per output channel, a dict
    of arrays with the ChannelParams field names; default: a unit-ish scale that keeps the
    values informative); ``out="int32"`` stores the raw accumulators.
    """
    config = get_config(config)
    if out not in ("int8", "int32"):
        raise ShapeError(f"GEMM out={out!r} must be 'int8' or 'int32'")
    if out == "int8" and params is None:
        n = b.shape[1]
        params = {"bias": np.zeros(n, np.int32), "multiplier": np.full(n, 1 << 30, np.int32),
                  "shift": np.full(n, -10, np.int8), "zero_point": np.zeros(n, np.int8),
                  "clamp_min": np.full(n, -128, np.int8), "clamp_max": np.full(n, 127, np.int8)}
    program = GemmProgram(config, [Gemm(a, b, params if out == "int8" else None)],
                          clear_first=True)
    return GemmWorkload(config, program, a.shape[0], b.shape[1], a.shape[1], (a, b))


def random_gemm(config: AccelConfig | str, M: int, N: int, K: int, seed: int = 0,
                out: str = "int8") -> GemmWorkload:
    """:func:`gemm_program` on random full-range int8 operands (and random requant params)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    params = None
    if out == "int8":
        p = random_channel_params(rng, (N,))
        params = {name: p[name] for name in p.dtype.names}
    return gemm_program(config, a, b, params, out=out)
