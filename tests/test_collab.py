"""Collaborative learning: the cut, the SGQ plan and its programs, the decoder against the encoder
(golden and RTL) on random and real features, and split training on golden == RTL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tinyaccel.errors import BudgetError, ProtocolError, ShapeError, SplitError
from tinyaccel.hw.config import get_config
from tinyaccel.models import zoo
from tinyaccel.models.clutter import SIZE, load_clutter_split
from tinyaccel.models.data import load_digits_split
from tinyaccel.sw import sgq
from tinyaccel.sw.collab import CODECS, CollabConfig, Link, run, split_model, summarize
from tinyaccel.sw.runtime import Device

RTL_CONFIG = "ecp5"  # the configuration tests/test_rtl.py builds too (one cached Verilator build)


@pytest.fixture
def seed() -> int:
    """The run's seed (``TINYACCEL_SEED``; fixed under ``make test``), printed."""
    from tinyaccel.sim.randprog import seed_from_env
    value = seed_from_env() % 1000
    print(f"seed={value}")
    return value


# -- the cut ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits-cnn", "clutter-cnn"])
@pytest.mark.parametrize("split", ["relu1", "conv2", "relu2", "relu3", "flatten"])
def test_split_halves_compose_to_the_model(name, split, seed):
    model = zoo.build(name, seed)
    shape = zoo.get(name).input_shape
    x = torch.rand((3, *shape), generator=torch.Generator().manual_seed(seed))
    dev, srv = split_model(model, split)
    with torch.no_grad():
        assert torch.equal(srv(dev(x)), model(x))
        assert torch.equal(dev(x), getattr(model, split)(_prefix(model, split, x)))
    # the halves share the model's parameters: nothing is copied
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in dev.parameters()} | {id(p) for p in srv.parameters()} == ids


def _prefix(model, split, x):
    """The input of ``split`` by walking the model's children in order (an independent path)."""
    for name, child in model.named_children():
        if name == split:
            return x
        x = child(x)
    raise AssertionError(split)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        y = self.relu1(self.conv1(x))
        z = self.conv2(y) + y  # y crosses a cut after conv2
        return self.fc(z.flatten(1))


def test_split_errors_name_the_layer():
    with pytest.raises(SplitError, match=r"'conv9' is not a module.*conv1, relu1"):
        split_model(zoo.build("digits-cnn"), "conv9")
    with pytest.raises(SplitError, match=r".conv2.: .add. after the cut uses .relu1.*residual"):
        split_model(_Residual(), "conv2")
    with pytest.raises(SplitError, match="last layer"):
        split_model(zoo.build("digits-cnn"), "fc")
    model = _Residual()
    dev, srv = split_model(model, "relu1")  # the branch starts at the cut: only y crosses
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(srv(dev(x)), model(x))


# -- the plan and its layout ----------------------------------------------------------------------

def _features(n, c, h, w, seed, sparsity=0.5):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 128, size=(n, c, h, w))
    q[rng.random(q.shape) < sparsity] = 0
    return q.astype(np.int8)


@pytest.mark.parametrize("group,rows", [(16, 1), (4, 2), (1, 4)])
def test_layout_round_trip(group, rows, seed):
    q = _features(3, 20, 4, 4, seed)
    order = tuple(np.random.default_rng(seed).permutation(20).tolist())
    plan = sgq.SgqPlan(20, 4, 4, 16, order, group, rows, (0,) * -(-20 // group))
    words = plan.layout(q)
    assert len(words) == plan.groups and all(w.shape == (3 * plan.words_per_sample, 16)
                                             for w in words)
    # group j, word 0 of sample 0 holds the first positions of channels order[j*g:(j+1)*g]
    first = words[0][0].reshape(plan.positions_per_word, group)
    assert first[0].tolist() == [q[0, c, 0, 0] for c in order[:group]]
    assert np.array_equal(plan.unlayout(words, 3), q)


def test_plan_rejects_what_the_hardware_cannot_hold():
    with pytest.raises(ShapeError, match="does not divide cols"):
        sgq.SgqPlan(8, 4, 4, 16, tuple(range(8)), 3, 1, (0, 0, 0))
    with pytest.raises(ShapeError, match="not a permutation"):
        sgq.SgqPlan(4, 4, 4, 16, (0, 1, 2, 2), 4, 1, (0,))
    with pytest.raises(ShapeError, match="shifts"):
        sgq.SgqPlan(4, 4, 4, 16, tuple(range(4)), 4, 1, (sgq.MAX_SHIFT + 1,))


def test_significance_order_sorts_by_mean_magnitude():
    q = np.zeros((2, 3, 2, 2), np.int8)
    q[:, 0] = 5
    q[:, 1] = 50
    q[:, 2] = -20
    assert sgq.significance_order(q) == (1, 2, 0)


# -- the decoder against the encoder --------------------------------------------------------------

def _bound(plan: sgq.SgqPlan) -> np.ndarray:
    """Per channel: half the largest step its group may use, ``2^max_shift >> 1``."""
    out = np.zeros(plan.channels, np.int64)
    for j in range(plan.groups):
        for c in plan.order[j * plan.group:(j + 1) * plan.group]:
            out[c] = (1 << plan.shifts[j]) >> 1
    return out


def _round_trip(plan, q, device):
    prog, emitted = sgq.encode_program(plan, q, device.config)
    responses = device.run(prog)
    payloads = [r for r in responses if isinstance(r, bytes)]
    return sgq.decode_responses(plan, payloads, emitted, q.shape[0]), payloads


@pytest.mark.parametrize("config", ["sim", "ecp5", "ice40"])
def test_decoder_inverts_the_golden_encoder_within_the_bound(config, seed):
    cfg = get_config(config)
    q = _features(9, 12, 4, 4, seed)
    rng = np.random.default_rng(seed)
    group = [g for g in range(cfg.cols, 0, -1) if cfg.cols % g == 0][rng.integers(0, 2)]
    shifts = tuple(int(s) for s in rng.integers(0, sgq.MAX_SHIFT + 1, size=-(-12 // group)))
    plan = sgq.SgqPlan(12, 4, 4, cfg.cols, sgq.significance_order(q), group, 2, shifts)
    with Device("golden", cfg) as dev:
        decoded, _ = _round_trip(plan, q, dev)
    err = np.abs(decoded.astype(np.int64) - q)
    assert (err <= _bound(plan)[None, :, None, None]).all()
    lossless = plan.with_shifts((0,) * plan.groups)
    with Device("golden", cfg) as dev:
        assert np.array_equal(_round_trip(lossless, q, dev)[0], q)


@pytest.fixture(scope="module")
def real_features():
    """INT8 features of the trained digits CNN after relu2 (the default split), 96 test images."""
    model, _ = zoo.load_or_train("digits-cnn")
    dev, _ = split_model(model, "relu2")
    with torch.no_grad():
        f = dev(load_digits_split().x_test[:96])
    return torch.round(f / (f.max() / 127)).clamp(-127, 127).numpy().astype(np.int8)


@pytest.mark.parametrize("budget", [None, 4.0, 2.5])
def test_calibrated_plan_meets_its_budget_on_real_features(real_features, budget):
    cfg = get_config("sim")
    plan = sgq.calibrate(real_features, cfg, budget)
    with Device("golden", cfg) as dev:
        decoded, payloads = _round_trip(plan, real_features, dev)
    err = np.abs(decoded.astype(np.int64) - real_features)
    assert (err <= _bound(plan)[None, :, None, None]).all()
    from tinyaccel.protocol import sgq_response_length
    wire_bits = 8 * sum(sgq_response_length(cfg, len(p)) for p in payloads)
    if budget is None:
        assert np.array_equal(decoded, real_features)
    else:  # calibrated on these very features, so the budget holds exactly here
        assert wire_bits <= budget * real_features.size


def test_budget_below_the_floor_is_a_named_error(real_features):
    with pytest.raises(BudgetError, match=r"budget 0.05 bits per value.*fewest reached"):
        sgq.calibrate(real_features, get_config("sim"), 0.05)


def test_corrupted_payload_is_never_decoded_silently(real_features):
    cfg = get_config("sim")
    plan = sgq.calibrate(real_features[:4], cfg, None)
    with Device("golden", cfg) as dev:
        _, payloads = _round_trip(plan, real_features[:4], dev)
    count = 4 * plan.words_per_sample
    with pytest.raises(ProtocolError, match="truncated"):
        sgq.decode_payload(payloads[0][:-1], count, cfg.cols, plan.stripe_len)
    with pytest.raises(ProtocolError):
        sgq.decode_payload(payloads[0] + b"\0", count, cfg.cols, plan.stripe_len)


@pytest.mark.rtl
def test_rtl_payloads_equal_golden_on_real_features(real_features, rtl_available):
    cfg = get_config(RTL_CONFIG)
    for budget in (None, 2.5):
        plan = sgq.calibrate(real_features, cfg, budget)
        prog, _ = sgq.encode_program(plan, real_features, cfg)
        with Device("golden", cfg) as gold, Device("rtl", cfg) as rtl:
            want = [r for r in gold.run(prog) if isinstance(r, bytes)]
            got = [r for r in rtl.run(prog) if isinstance(r, bytes)]
        assert len(want) == plan.groups and got == want  # byte for byte


# -- split training -------------------------------------------------------------------------------

@pytest.mark.rtl
def test_split_training_on_rtl_is_bit_identical_to_golden(seed, rtl_available):
    runs = {b: run(CollabConfig(model="digits-cnn", codec="sgq", budget=3.0, backend=b,
                                config=RTL_CONFIG, epochs=1, max_steps=3, seed=seed))
            for b in ("golden", "rtl")}
    g, r = runs["golden"], runs["rtl"]
    assert r["golden_rtl_identical"] is True and r["golden_rtl_programs_compared"] >= 4
    assert g["payload_sha256"] == r["payload_sha256"]
    assert g["history"][0]["train_loss"] == r["history"][0]["train_loss"]
    assert g["test_acc"] == r["test_acc"]
    assert r["encoder_cycles"] > 0 and r["gemm_cycles"] > 0


def test_host_and_golden_runs_agree_and_count_bytes(seed):
    """The host executor (NumPy GEMMs) and the golden model give the same run; the uplink bytes
    are the SGQ responses plus the scale, the FP32 figure is 4 bytes per value."""
    runs = {b: run(CollabConfig(model="digits-cnn", codec="sgq", budget=3.0, backend=b,
                                epochs=1, max_steps=2, seed=seed)) for b in ("host", "golden")}
    assert runs["host"]["payload_sha256"] == runs["golden"]["payload_sha256"]
    assert runs["host"]["test_acc"] == runs["golden"]["test_acc"]
    r = runs["golden"]
    assert r["feature_shape"] == [32, 4, 4]
    assert r["fp32_bytes_per_sample"] == 4 * 512
    assert r["uplink_reduction_vs_fp32"] == pytest.approx(2048 / r["uplink_bytes_per_sample"])
    assert r["downlink_bytes_per_sample"] == pytest.approx(512 + 4 / 64)


def test_link_codecs_bytes_and_error():
    f = torch.rand((2, 3, 4, 4), generator=torch.Generator().manual_seed(0)) * 5
    sizes = {}
    for codec in [c for c in CODECS if c != "sgq"]:
        link = Link(CollabConfig(codec=codec, backend="host"), device=None)
        out = link.uplink(f)
        kind, bits, per = CODECS[codec]
        ranges = 3 if per == "channel" else 1
        expected = {"float": 4 * f.numel(), "symmetric": f.numel() + 4,
                    "uniform": f.numel() * bits // 8 + 8 * ranges}[kind]
        assert link.stats.up_bytes == expected, codec
        step = {"float": 0.0, "symmetric": float(f.abs().max()) / 127,
                "uniform": 5.0 / ((1 << bits) - 1)}[kind]
        assert float((out - f).abs().max()) <= step / 2 + 1e-5, codec
        sizes[codec] = expected
    assert sizes["u2-tensor"] < sizes["u4-tensor"] < sizes["int8"] < sizes["fp32"]


def test_summary_compares_against_fp32_on_the_same_seeds():
    rows = [{"label": lab, "codec": codec, "budget": b, "seed": s, "test_acc": acc,
             "uplink_bytes_per_sample": up, "uplink_bits_per_value": 8 * up / 512,
             "uplink_reduction_vs_fp32": 2048 / up, "downlink_bytes_per_sample": 512,
             "fp32_bytes_per_sample": 2048, "link_s_per_step": 0.1,
             "encoder_cycles_per_step": None, "golden_rtl_identical": None}
            for lab, codec, b, s, acc, up in [
                ("fp32", "fp32", None, 0, 0.90, 2048), ("fp32", "fp32", None, 1, 0.80, 2048),
                ("int8", "int8", None, 0, 0.89, 512), ("int8", "int8", None, 1, 0.80, 512),
                ("sgq-1.5b", "sgq", 1.5, 0, 0.88, 100), ("sgq-1.5b", "sgq", 1.5, 1, 0.79, 100)]]
    by = {r["label"]: r for r in summarize(rows, headline=1.5)}
    assert by["sgq-1.5b"]["acc_loss_pp"] == pytest.approx(1.5)
    assert by["sgq-1.5b"]["acc_loss_pp_max"] == pytest.approx(2.0)
    assert by["sgq-1.5b"]["headline"] and not by["int8"]["headline"]
    assert by["sgq-1.5b"]["uplink_reduction_vs_int8"] == pytest.approx(5.12)


# -- the clutter task ---------------------------------------------------------------------------

def test_clutter_split_is_fixed_and_in_range():
    a = load_clutter_split()
    assert a.x_train.shape[1:] == (1, SIZE, SIZE) and a.x_test.shape == (3 * 360, 1, SIZE, SIZE)
    assert len(a.x_train) == 3 * 1437 and float(a.x_train.min()) >= 0 <= 1 >= float(
        a.x_train.max())
    load_clutter_split.cache_clear()
    b = load_clutter_split()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    # the labels are the digits split's: the test set is the digits test set, drawn 3 times
    assert torch.equal(a.y_test, load_digits_split().y_test.repeat(3))


def test_allocation_meets_the_limit_and_uses_it(seed):
    """The per-group shift choice: within the limit, lossless when that fits, near the exhaustive
    optimum on small random cases (every one of 8^3 choices tried), ``None`` when infeasible."""
    import itertools

    from tinyaccel.sw.sgq import _allocate
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(40):
        # bits fall and error rises with the shift, as in SGQ
        bits = np.sort(rng.integers(10, 200, size=(3, 8)), axis=1)[:, ::-1].astype(float)
        err = np.sort(rng.random((3, 8)) * 100, axis=1)
        err[:, 0] = 0.0
        limit = float(rng.uniform(bits[:, -1].sum(), bits[:, 0].sum()))
        choice, total_err = _allocate(bits, err, limit)
        assert bits[np.arange(3), choice].sum() <= limit
        best = min(err[np.arange(3), c].sum() for c in itertools.product(range(8), repeat=3)
                   if bits[np.arange(3), c].sum() <= limit)
        worst = max(worst, total_err - best)
        assert total_err <= best + 0.25 * err.max()  # a heuristic, but never far off
    print(f"largest excess over the optimum: {worst:.3f}")
    assert _allocate(bits, err, bits[:, 0].sum())[1] == 0.0
    assert _allocate(bits, err, bits[:, -1].sum() - 1) is None
