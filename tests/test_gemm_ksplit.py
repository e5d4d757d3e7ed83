"""Any K: GEMMs whose K extent does not fit the INP/WGT slots are split into k-tiles that
accumulate into one ACC block, requantized after the last; unplannable shapes name the short
buffer.

Expected values come from sim.numerics.exact_gemm / requantize on the whole operands (and NumPy
int64 matmul), never from the lowering under test. Seeds are fixed.
"""

import dataclasses

import numpy as np
import pytest
import torch
from test_gemm_lowering import _params
from torch import nn

import tinyaccel
from tinyaccel.errors import DeviceError, ShapeError
from tinyaccel.hw.config import get_config
from tinyaccel.hw.isa import Buffer
from tinyaccel.sim.numerics import exact_gemm, requantize
from tinyaccel.sw.gemm import EXACT_K_MAX, plan_gemm
from tinyaccel.sw.gemm_run import Gemm, run_gemms
from tinyaccel.sw.runtime import Device


def _k_step_limit(config) -> int:
    """The longest k-tile of a 1 x 1 block: two INP and two WGT slots of k words."""
    return min(config.depth(Buffer.INP), config.depth(Buffer.WGT)) // 2


def _long_k_cases(name):
    config = get_config(name)
    kt = _k_step_limit(config)
    # 20000 from the issue; one k-tile exactly full / one step over; the longest K that 64 equal
    # k-tiles hold / one step over (from there on the planner needs more than 64 k-tiles).
    ks = sorted({20000, kt, kt + 1, 64 * kt, 64 * kt + 1})
    return [(name, m, n, k) for k in ks for m, n in ((1, 10), (3, 10))]


def _expected(a, b, params):
    acc = exact_gemm(a, b)
    np.testing.assert_array_equal(acc, a.astype(np.int64) @ b.astype(np.int64))
    return acc if params is None else requantize(acc, **params)


@pytest.mark.parametrize("name,M,N,K", _long_k_cases("ice40") + _long_k_cases("ecp5"))
@pytest.mark.parametrize("out", ["int8", "int32"])
def test_long_k_gemm_is_exact_on_golden(name, M, N, K, out):
    config = get_config(name)
    rng = np.random.default_rng([M, N, K, out == "int8"])
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    if K <= EXACT_K_MAX:
        # One row of extreme products: the largest sum a K-long accumulation can reach. (Beyond
        # EXACT_K_MAX it would saturate; random operands stay far inside INT32.)
        a[0, :] = -128
        b[:, 0] = -128
    params = _params(rng, N) if out == "int8" else None
    plan = plan_gemm(config, M, N, K, out)
    assert 2 * plan.mb * plan.kt <= config.depth(Buffer.INP)
    assert 2 * plan.nb * plan.kt <= config.depth(Buffer.WGT)
    assert plan.k_tiles == -(-K // plan.kt)
    if K > _k_step_limit(config):
        assert plan.k_tiles > 1
    with Device("golden", config) as dev:
        run = run_gemms(dev, [Gemm(a, b, params)])
    want = _expected(a, b, params)
    got = run.results[0]
    assert got.dtype == want.dtype and got.shape == (M, N)
    np.testing.assert_array_equal(got, want, err_msg=f"{name} {M}x{N}x{K} {out} plan {plan}")
    if out == "int32" and K <= EXACT_K_MAX:
        assert got[0, 0] == K * 128 * 128  # the extreme row is exact, not saturated
    assert dev.stats.macs == plan.macs


def test_linear_20000_plans_on_ice40_with_k_split():
    """The issue's case: it used to fail with an empty reason."""
    config = get_config("ice40")
    for M in (1, 3):
        plan = plan_gemm(config, M, 10, 20000)
        assert plan.k_tiles > 64 and plan.kt * plan.k_tiles >= 20000
        assert plan.est_cycles > 0


@pytest.mark.parametrize("field,buf", [("inp_depth", Buffer.INP), ("wgt_depth", Buffer.WGT),
                                       ("acc_depth", Buffer.ACC), ("param_depth", Buffer.PARAM),
                                       ("out_depth", Buffer.OUT)])
def test_unplannable_gemm_names_the_short_buffer(field, buf):
    """A buffer that cannot hold the two slots of one 1 x 1 block with k = 1: the message names
    it with the words and bytes it needs and has, for every K."""
    base = get_config("ice40")
    need = {Buffer.INP: 2, Buffer.WGT: 2, Buffer.ACC: 2 * base.rows, Buffer.PARAM: 2,
            Buffer.OUT: 2 * base.rows}[buf]
    config = dataclasses.replace(base, name="short", **{field: need - 1})
    word = config.word_bytes(buf)
    for K in (1, 20000):
        with pytest.raises(ShapeError) as err:
            plan_gemm(config, 3, 10, K, "int8")
        msg = str(err.value)
        assert (f"{buf.name} needs {need} words ({need * word} bytes), "
                f"has {need - 1} words ({(need - 1) * word} bytes)") in msg, msg
        assert msg.count("needs") == 1, msg
    if buf in (Buffer.PARAM, Buffer.OUT):  # only the requantized output uses them
        assert plan_gemm(config, 3, 10, 20000, "int32").k_tiles > 1


def test_saturating_accumulation_is_not_returned():
    """K just above EXACT_K_MAX with extreme operands leaves INT32: the device flags it and
    run_gemms raises; at EXACT_K_MAX the same operands give the exact sum."""
    config = get_config("sim")
    for K in (EXACT_K_MAX, EXACT_K_MAX + 1):
        a = np.full((1, K), -128, np.int8)
        b = np.full((K, 2), -128, np.int8)
        assert plan_gemm(config, 1, 2, K, "int32").k_tiles > 1
        with Device("golden", config) as dev:
            if K * 128 * 128 <= 2**31 - 1:
                got = run_gemms(dev, [Gemm(a, b)]).results[0]
                np.testing.assert_array_equal(got, np.full((1, 2), K * 128 * 128))
            else:
                with pytest.raises(DeviceError, match="saturated an INT32 accumulator"):
                    run_gemms(dev, [Gemm(a, b)])


@pytest.mark.rtl
def test_long_k_gemm_rtl_equals_golden():
    """A K split beyond 64 k-tiles on the RTL of ice40: byte for byte the golden results."""
    config = get_config("ice40")
    K = 64 * _k_step_limit(config) + 1
    rng = np.random.default_rng(12)
    gemms = []
    for out in ("int8", "int32"):
        a = rng.integers(-128, 128, (3, K), dtype=np.int8)
        b = rng.integers(-128, 128, (K, 4), dtype=np.int8)
        gemms.append(Gemm(a, b, _params(rng, 4) if out == "int8" else None))
    assert all(plan_gemm(config, 3, 4, K, g.out).k_tiles > 64 for g in gemms)
    with Device("golden", config) as dev:
        golden = run_gemms(dev, gemms)
    with Device("rtl", config) as dev:
        rtl = run_gemms(dev, gemms)
    for g, want, got in zip(gemms, golden.results, rtl.results, strict=True):
        np.testing.assert_array_equal(want, _expected(g.a, g.b, g.requant))
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert rtl.macs_issued == sum(plan_gemm(config, 3, 4, K, g.out).macs for g in gemms)


def test_compiled_linear_20000_on_ice40_equals_sim():
    """``tinyaccel.compile`` of Linear(20000, 10): the same logits on ice40 (K split into many
    k-tiles) as on sim."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20000, 10)).eval()
    x = torch.randn(3, 20000)
    logits = {}
    for name in ("ice40", "sim"):
        compiled = tinyaccel.compile(model, x, backend="golden", config=name)
        logits[name] = compiled(x)
    assert logits["ice40"].shape == (3, 10)
    assert torch.equal(logits["ice40"], logits["sim"])
    # And they are the model's logits, within a few INT8 output steps.
    with torch.no_grad():
        want = model(x)
    assert (logits["ice40"] - want).abs().max() < 0.05 * want.abs().max()
