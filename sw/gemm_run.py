"""Run a list of INT8 GEMMs on a device: one program, the results and its counter record back.

The one path from "these GEMMs" to "their results": :class:`GemmProgram` lowers each GEMM
(:func:`tinyaccel.sw.gemm.lower_gemm`: tiling, double buffering, schedule) into one
:class:`~tinyaccel.protocol.Program` that ends with a counter report, and reassembles the STORE
responses into matrices; :func:`run_gemms` runs it on a :class:`~tinyaccel.sw.runtime.Device`.
The compiler (one program per layer), Octo training (one per layer and pass) and the benchmark
workloads (:mod:`tinyaccel.bench.workloads`, which time the same program's bytes on a simulator)
all go through it.

A GEMM with requantization parameters comes back requantized to INT8 (``REQUANT`` + ``STORE
OUT``); without, as raw INT32 accumulators (``STORE ACC``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DeviceError
from ..hw.config import AccelConfig, get_config
from ..hw.isa import Counter, Opcode
from ..protocol import Program
from ..sim.numerics import exact_gemm, requantize
from .gemm import EXACT_K_MAX, GemmLowering, lower_gemm

__all__ = ["Gemm", "GemmProgram", "GemmRun", "run_gemms"]


@dataclass(frozen=True, eq=False)
class Gemm:
    """``a @ b``: int8 ``a`` (M, K) and ``b`` (K, N).

    ``requant`` (per output channel, a dict of N-entry arrays with the
    :class:`~tinyaccel.hw.isa.ChannelParams` field names) makes the result INT8; without it the
    result is the INT32 accumulators.
    """

    a: np.ndarray
    b: np.ndarray
    requant: dict | None = None

    @property
    def out(self) -> str:
        """``"int8"`` (requantized) or ``"int32"`` (raw accumulators)."""
        return "int32" if self.requant is None else "int8"


class GemmProgram:
    """GEMMs lowered into one program that ends with a counter record.

    By default the program ends with ``SYNC counters=1 clear=1``: on a device that runs only such
    programs, each one's counter record measures exactly that program. ``clear_first`` instead
    starts with ``SYNC clear=1`` and ends with ``SYNC counters=1``, so the record measures the
    program on a device in any state (the benchmarks).
    """

    def __init__(self, config: AccelConfig | str, gemms: Sequence[Gemm],
                 clear_first: bool = False):
        self.config = get_config(config)
        self.gemms = list(gemms)
        self.program = Program(self.config)
        if clear_first:
            self.program.sync(clear=True)
        self.lowerings: list[GemmLowering] = [
            lower_gemm(self.config, self.program, g.a, g.b, g.requant, out=g.out)
            for g in self.gemms]
        self.program.sync(counters=True, clear=not clear_first)

    def results(self, responses: list) -> list[np.ndarray]:
        """The GEMM results (in order) from the program's parsed responses (one per instruction,
        as :meth:`~tinyaccel.sw.runtime.Device.run` or
        :func:`~tinyaccel.protocol.parse_responses` return them)."""
        stores = [r for instr, r in zip(self.program.instructions, responses, strict=True)
                  if instr.opcode == Opcode.STORE]
        out, pos = [], 0
        for lowering in self.lowerings:
            n = lowering.store_count
            out.append(lowering.collect(stores[pos:pos + n]))
            pos += n
        return out


@dataclass
class GemmRun:
    """What :func:`run_gemms` returns: the results and the program's counter record."""

    results: list[np.ndarray]
    #: the final SYNC's counters (all 0 on the host, which has no accelerator)
    counters: dict[Counter, int] = field(default_factory=lambda: {c: 0 for c in Counter})

    @property
    def cycles(self) -> int:
        """Accelerator cycles of the program (0 on the golden model and the host)."""
        return int(self.counters[Counter.CYCLES])

    @property
    def macs_issued(self) -> int:
        """MACs the array performed (padded blocks included)."""
        return int(self.counters[Counter.MACS_ISSUED])


def run_gemms(device, gemms: Sequence[Gemm], clear_first: bool = False) -> GemmRun:
    """Run ``gemms`` in one program on ``device`` and return their results and counters.

    ``device`` is a :class:`~tinyaccel.sw.runtime.Device`, or ``None`` for the host: the same
    results from :func:`~tinyaccel.sim.numerics.exact_gemm` and
    :func:`~tinyaccel.sim.numerics.requantize` (the golden numerics), without an accelerator.

    Raises
    ------
    DeviceError
        When the device reports a status other than OK, or that an INT32 accumulator saturated
        (only possible for K > :data:`~tinyaccel.sw.gemm.EXACT_K_MAX`): the result would not be
        the exact product. The host path (``device=None``) returns
        :func:`~tinyaccel.sim.numerics.exact_gemm`'s INT32 saturation of the whole sum instead.
    ShapeError, DTypeError
        For operands that are not int8 matrices of matching shapes, or a GEMM that fits no tiling.
    """
    if device is None:
        results = []
        for g in gemms:
            acc = exact_gemm(g.a, g.b)
            results.append(acc if g.requant is None else requantize(
                acc, *(g.requant[name] for name in ("bias", "multiplier", "shift", "zero_point",
                                                    "clamp_min", "clamp_max"))))
        return GemmRun(results)
    gp = GemmProgram(device.config, gemms, clear_first)
    responses = device.run(gp.program)
    if responses[-1].acc_saturated:  # sticky over the program, cleared by its final SYNC
        long_k = [g.a.shape[1] for g in gemms if g.a.shape[1] > EXACT_K_MAX]
        raise DeviceError(f"accelerator ({device.backend.name}) saturated an INT32 accumulator "
                          f"(K={long_k}, above {EXACT_K_MAX} products a sum can leave INT32): "
                          "the results are not the exact products")
    return GemmRun(gp.results(responses), dict(responses[-1].counters))
