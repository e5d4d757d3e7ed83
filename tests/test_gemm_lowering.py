"""The GEMM lowering (tiling, double buffering, K split) equals integer matmul, on the golden model.

The expected values come from NumPy int64 matmul and the golden requantize function, not from
the lowering under test. Seeds are printed; replay with TINYACCEL_SEED.
"""

import os

import numpy as np
import pytest

from tinyaccel.errors import DTypeError, ShapeError
from tinyaccel.hw.config import AccelConfig, get_config
from tinyaccel.protocol import Program
from tinyaccel.sim.numerics import requantize
from tinyaccel.sim.randprog import SEED_ENV, parse_seed
from tinyaccel.sw.gemm import estimate_cycles, lower_gemm, plan_gemm
from tinyaccel.sw.gemm_run import Gemm, run_gemms
from tinyaccel.sw.runtime import Device

SEED = parse_seed(os.environ.get(SEED_ENV))  # fixed unless TINYACCEL_SEED says otherwise

# A small configuration whose buffers force K splits and many tiles.
TINY = AccelConfig(name="tiny", rows=4, cols=4, host_width=32, inp_depth=64, wgt_depth=64,
                   acc_depth=64, out_depth=64, param_depth=4, mask_bits=64, requant_lanes=2)


def _params(rng, n):
    return {
        "bias": rng.integers(-2**20, 2**20, n),
        "multiplier": rng.integers(2**30, 2**31 - 1, n),
        "shift": rng.integers(-12, 1, n),
        "zero_point": rng.integers(-20, 20, n),
        "clamp_min": np.full(n, -128),
        "clamp_max": np.full(n, 127),
    }


def _run(config, a, b, params, out):
    with Device("golden", config) as dev:
        run = run_gemms(dev, [Gemm(a, b, params if out == "int8" else None)])
    plan = plan_gemm(config, a.shape[0], b.shape[1], a.shape[1], out)
    assert dev.stats.programs == 1 and run.macs_issued == dev.stats.macs
    return plan, run.results[0], dev.stats


@pytest.mark.parametrize("config", [TINY, get_config("ice40"), get_config("sim")],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("out", ["int8", "int32"])
def test_gemm_lowering_matches_integer_matmul(config, out):
    print(f"TINYACCEL_SEED={SEED}")
    rng = np.random.default_rng(SEED)
    for _ in range(6):
        M, N, K = (int(x) for x in rng.integers(1, 70, 3))
        if rng.random() < 0.3:
            K = int(rng.integers(100, 300))  # K split on small buffers
        a = rng.integers(-128, 128, (M, K), dtype=np.int8)
        b = rng.integers(-128, 128, (K, N), dtype=np.int8)
        params = _params(rng, N)
        plan, got, stats = _run(config, a, b, params, out)
        acc = a.astype(np.int64) @ b.astype(np.int64)
        if out == "int32":
            expected = acc.astype(np.int32)
        else:
            expected = requantize(acc.astype(np.int32), **{k: np.asarray(v) for k, v in
                                                           params.items()})
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected, err_msg=f"M,N,K={M},{N},{K} plan "
                                      f"{plan} seed {SEED}")
        assert stats.macs == plan.macs


def test_run_gemms_runs_several_gemms_in_one_program():
    """INT8 and INT32 GEMMs in one program: each result equals NumPy on the golden model and on
    the host path; the program's counter record covers all of them."""
    print(f"TINYACCEL_SEED={SEED}")
    rng = np.random.default_rng(SEED)
    gemms, expected = [], []
    for out in ("int8", "int32", "int8", "int32"):
        M, N, K = (int(x) for x in rng.integers(1, 40, 3))
        a = rng.integers(-128, 128, (M, K), dtype=np.int8)
        b = rng.integers(-128, 128, (K, N), dtype=np.int8)
        params = _params(rng, N) if out == "int8" else None
        gemms.append(Gemm(a, b, params))
        acc = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
        expected.append(acc if params is None else requantize(acc, **params))
    with Device("golden", TINY) as dev:
        run = run_gemms(dev, gemms)
    host = run_gemms(None, gemms)
    assert dev.stats.programs == 1
    assert len(run.results) == len(host.results) == len(gemms)
    for i, (got, on_host, want) in enumerate(zip(run.results, host.results, expected,
                                                 strict=True)):
        assert got.dtype == on_host.dtype == want.dtype, i
        np.testing.assert_array_equal(got, want, err_msg=f"GEMM {i}, seed {SEED}")
        np.testing.assert_array_equal(on_host, want, err_msg=f"host GEMM {i}, seed {SEED}")
    assert run.macs_issued == sum(plan_gemm(TINY, g.a.shape[0], g.b.shape[1], g.a.shape[1],
                                            g.out).macs for g in gemms)
    assert host.macs_issued == host.cycles == 0


def test_plan_respects_buffers_and_overlaps():
    cfg = get_config("sim")
    plan = plan_gemm(cfg, 256, 256, 256)
    assert 2 * plan.mb * plan.kt <= cfg.inp_depth
    assert 2 * plan.nb * plan.kt <= cfg.wgt_depth
    # Overlap: the modelled time is well below the serial sum of loads + compute.
    compute = plan.m_blocks * plan.n_blocks * plan.K
    assert compute <= plan.est_cycles < compute * 1.5, plan
    assert estimate_cycles(plan, cfg) == plan.est_cycles


def test_bad_shapes_and_dtypes_are_named():
    cfg = get_config("ice40")
    with pytest.raises(ShapeError, match="K=0"):
        plan_gemm(cfg, 4, 4, 0)
    with pytest.raises(DTypeError, match="dtype float32"):
        lower_gemm(cfg, Program(cfg), np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int8))
    with pytest.raises(ShapeError, match="requant params"):
        lower_gemm(cfg, Program(cfg), np.zeros((4, 4), np.int8), np.zeros((4, 4), np.int8))
    small = AccelConfig(name="small", rows=4, cols=4, host_width=32, inp_depth=1, wgt_depth=8,
                        acc_depth=8, out_depth=8, param_depth=2, mask_bits=64, requant_lanes=1)
    with pytest.raises(ShapeError,
                       match=r"INP needs 2 words \(8 bytes\), has 1 words \(4 bytes\)"):
        plan_gemm(small, 4, 4, 4)


def test_device_names_the_status_of_a_faulting_program():
    from tinyaccel.errors import DeviceError
    from tinyaccel.hw.isa import Buffer, Status
    cfg = get_config("ice40")
    prog = Program(cfg).raw(0xB).load(Buffer.INP, cfg.inp_depth - 1, np.zeros((2, cfg.rows),
                                                                               np.int8))
    with Device("golden", cfg) as dev, pytest.raises(DeviceError, match="ILLEGAL_OPCODE") as err:
        dev.run(prog)
    assert err.value.status == Status.ILLEGAL_OPCODE and err.value.pc == 0
