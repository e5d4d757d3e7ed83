"""Golden-model speed: one GEMM instruction of 256x256x256 against NumPy's integer matmul.

The golden machine's GEMM gathers every block of the instruction into one exact float BLAS call
(:func:`tinyaccel.sim.numerics.exact_gemm`); NumPy's ``int32 @ int32`` has no BLAS behind it.
Both are timed in the same run on the same operands (best of several repeats).
"""

from __future__ import annotations

import time

import numpy as np

from ..hw.config import get_config
from ..hw.isa import Buffer, Instruction, Opcode
from ..sim.golden import GoldenMachine

__all__ = ["run"]

SIZE = 256  # M = N = K


def _best(fn, repeats: int, progress=None, desc: str = "") -> float:
    steps = range(repeats)
    if progress is not None:
        steps = progress(steps, desc=desc, leave=False)
    best = float("inf")
    for _ in steps:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(progress=None, repeats: int = 30, numpy_repeats: int = 5, seed: int = 0) -> dict:
    """Measure the golden GEMM and NumPy's int32 matmul; return GMAC/s and the speedup.

    ``progress`` is a tqdm-like wrapper for iterables (optional).
    """
    config = get_config("sim")
    rows, cols = config.rows, config.cols
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (SIZE, SIZE), dtype=np.int8)  # (M, K)
    b = rng.integers(-128, 128, (SIZE, SIZE), dtype=np.int8)  # (K, N)
    mb, nb, k = SIZE // rows, SIZE // cols, SIZE

    machine = GoldenMachine(config)
    # Section 4 layouts: INP word i*k + t = A[i*rows + r, t]; WGT word j*k + t = B[t, j*cols + c].
    machine.load_buffer(Buffer.INP, 0, a.reshape(mb, rows, k).transpose(0, 2, 1).reshape(-1, rows))
    machine.load_buffer(Buffer.WGT, 0, b.reshape(k, nb, cols).transpose(1, 0, 2).reshape(-1, cols))
    gemm = Instruction(Opcode.GEMM, inp_addr=0, wgt_addr=0, acc_addr=0, k=k, m_blocks=mb,
                       n_blocks=nb)
    machine.execute(gemm)  # warm up the workspace and BLAS

    a32, b32 = a.astype(np.int32), b.astype(np.int32)
    expect = a32 @ b32
    acc = machine.read_buffer(Buffer.ACC, 0, mb * nb * rows)
    got = acc.reshape(mb, nb, rows, cols).transpose(0, 2, 1, 3).reshape(SIZE, SIZE)
    if not np.array_equal(got, expect):  # a benchmark of a wrong result is worthless
        raise AssertionError("golden GEMM differs from numpy's integer matmul")

    macs = SIZE ** 3
    golden_s = _best(lambda: machine.execute(gemm), repeats, progress, "golden GEMM")
    numpy_s = _best(lambda: a32 @ b32, numpy_repeats, progress, "numpy int32 matmul")
    golden, numpy_rate = macs / golden_s / 1e9, macs / numpy_s / 1e9
    return {
        "golden_gemm_gmacs": round(golden, 3),
        "numpy_int32_gemm_gmacs": round(numpy_rate, 3),
        "golden_speedup_vs_numpy": round(golden / numpy_rate, 2),
    }
