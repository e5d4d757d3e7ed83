"""Octo INT8 training (sw/octo.py, sw/train.py, `tinyaccel train`).

Seeds are fixed and printed; every test replays exactly. Fast tests run the golden backend (or the
host executor, which a test shows is bit-identical to it) with a handful of steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinyaccel.errors import (
    ResumeError,
    ShapeError,
    TrainingDivergedError,
    UnsupportedLayerError,
)
from tinyaccel.models import zoo
from tinyaccel.models.data import load_digits_split, single_thread
from tinyaccel.sw import octo_autograd
from tinyaccel.sw import train as training
from tinyaccel.sw.im2col import col2im_int, im2col
from tinyaccel.sw.octo import (
    LossAwareCompensation,
    OctoConv2d,
    OctoLinear,
    OctoReLU,
    SavedTensorMeter,
    convert,
    executor_of,
    lac_penalty,
)
from tinyaccel.sw.octo_autograd import GemmExecutor, Int8Conv2dFn, Int8LinearFn, LayerRuntime
from tinyaccel.sw.octo_numerics import (
    OctoOptions,
    clip_range,
    quantize_nearest,
    quantize_stochastic,
    symmetric_scale,
)
from tinyaccel.sw.runtime import Device
from tinyaccel.sw.train import CHECKPOINT, METRICS, TrainConfig, train


@pytest.fixture
def seed(request) -> int:
    value = getattr(request, "param", 1234)
    print(f"seed={value}")
    return value


def _batch(n=32, offset=0):
    split = load_digits_split()
    return (split.x_train[offset:offset + n].clone(), split.y_train[offset:offset + n].clone())


# -- quantizers ---------------------------------------------------------------------------------

def test_round_half_even_and_symmetric_range():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 300.0, -300.0])
    q = quantize_nearest(x, torch.tensor(1.0))
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -127]
    y = torch.tensor([-3.0, 1.0, 2.0])
    s = symmetric_scale(y)
    assert float(s) == pytest.approx(3.0 / 127)
    assert quantize_nearest(y, s).tolist()[0] == -127
    assert float(symmetric_scale(torch.zeros(5))) == 1.0  # all-zero tensor: a usable scale


def test_stochastic_rounding_is_unbiased_bounded_and_replayable(seed):
    x = torch.linspace(-2.0, 2.0, 41)
    scale = torch.tensor(0.25)
    draws = torch.stack([quantize_stochastic(x, scale, torch.Generator().manual_seed(seed + i))
                         for i in range(400)]).to(torch.float32)
    exact = x / scale
    assert bool(((draws - exact).abs() < 1.0).all())  # always one of the two neighbours
    assert float((draws.mean(0) - exact).abs().max()) < 0.1  # unbiased (400 draws: sd <= 0.025)
    assert set(np.unique(draws[:, 1].numpy())) == {-7.0, -8.0}  # -7.6 goes both ways
    a = quantize_stochastic(x, scale, torch.Generator().manual_seed(seed))
    b = quantize_stochastic(x, scale, torch.Generator().manual_seed(seed))
    c = quantize_stochastic(x, scale, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_prc_variants(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10_000, generator=gen)
    x[0] = 40.0  # an outlier that sets the min/max scale
    lo_hi = clip_range(x, "minmax", 0.95)
    assert float(lo_hi.max()) == pytest.approx(0.95 * 40.0)
    assert float(lo_hi.min()) == pytest.approx(0.95 * float(x.min()))
    sig = clip_range(x, "sigma", z=2.576)
    mean, sd = x.double().mean().item(), x.double().std(unbiased=False).item()
    assert float(sig.max()) == pytest.approx(mean + 2.576 * sd, rel=1e-6)
    assert float(sig.min()) == pytest.approx(mean - 2.576 * sd, rel=1e-6)
    # ~99 % of a normal sample is untouched; the outlier is clipped hard
    assert 0.985 < float((sig == x).float().mean()) < 0.995
    with pytest.raises(ShapeError, match="'median'"):
        clip_range(x, "median")


@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (2, 2, 0, 1)])
def test_col2im_is_the_exact_adjoint_of_im2col(geometry, seed):
    k, stride, pad, dil = geometry
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (2, 3, 7, 6)).astype(np.int8)
    cols = im2col(x, k, stride, pad, dil)
    c = rng.integers(-1000, 1000, cols.shape).astype(np.int32)
    back = col2im_int(c, x.shape, k, stride, pad, dil)
    assert back.dtype == np.int64
    assert int((cols.astype(np.int64) * c).sum()) == int((x.astype(np.int64) * back).sum())
    folded = F.fold(torch.from_numpy(c.astype(np.float64)).reshape(2, -1, c.shape[1])
                    .transpose(1, 2), (7, 6), k, dilation=dil, padding=pad, stride=stride)
    assert np.array_equal(folded.numpy().astype(np.int64), back)


# -- autograd Functions against float64 references ----------------------------------------------

def _exact_options(**kw):
    return OctoOptions(stochastic=False, prc=False, lac=False, **kw)


def _nearest_codes(*tensors):
    """Each tensor rounded half to even on its symmetric INT8 grid, dequantized in float64."""
    return [quantize_nearest(t, symmetric_scale(t)).double() * float(symmetric_scale(t))
            for t in tensors]


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1)])
def test_int8_conv_gemms_match_float64_of_the_codes(stride, padding, dilation, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 7, 7, generator=gen, requires_grad=True)
    conv = nn.Conv2d(4, 5, 3, stride, padding, dilation)
    rt = LayerRuntime("conv", _exact_options(), GemmExecutor(None))
    y = Int8Conv2dFn.apply(x, conv.weight, conv.bias, rt, False, (stride,) * 2, (padding,) * 2,
                           (dilation,) * 2)
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    # Reference: float64 conv of the dequantized codes (what exact INT8 GEMMs must equal).
    xq, wq, dyq = _nearest_codes(x, conv.weight, dy)
    y_ref = F.conv2d(xq, wq, conv.bias.double(), stride, padding, dilation)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
    xr, wr = xq.clone().requires_grad_(), wq.clone().requires_grad_()
    F.conv2d(xr, wr, None, stride, padding, dilation).backward(dyq)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv.weight.grad.double(), wr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv.bias.grad, dy.sum((0, 2, 3)), rtol=1e-6, atol=1e-6)


def test_dx_by_transposed_gemm_equals_host_col2im_bit_for_bit(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    dy = torch.randn(2, 4, 6, 6, generator=gen)
    grads = []
    for transposed in (True, False):
        if not transposed:
            monkeypatch.setattr(octo_autograd, "_transposed_padding", lambda *a: None)
        xr = x.clone().requires_grad_()
        rt = LayerRuntime("c", _exact_options(), GemmExecutor(None))
        Int8Conv2dFn.apply(xr, w, None, rt, False, (1, 1), (1, 1), (1, 1)).backward(dy)
        grads.append(xr.grad)
    assert torch.equal(grads[0], grads[1])


def test_int8_linear_matches_float64_of_the_codes(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 20, generator=gen, requires_grad=True)
    lin = nn.Linear(20, 7)
    rt = LayerRuntime("fc", _exact_options(), GemmExecutor(None))
    y = Int8LinearFn.apply(x, lin.weight, lin.bias, rt, False)
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    xq, wq, dyq = _nearest_codes(x, lin.weight, dy)
    torch.testing.assert_close(y.double(), xq @ wq.T + lin.bias.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), dyq @ wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad.double(), dyq.T @ xq, rtol=1e-6, atol=1e-6)


def test_packed_relu_gradient_is_torch_relu_bit_for_bit(seed):
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(seed))
    x[0, 0, :3] = 0.0  # the derivative at 0 is 0, as in torch
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(x.shape)
    OctoReLU()(a).backward(dy)
    torch.relu(b).backward(dy)
    assert torch.equal(a.grad, b.grad)


# -- the device path ----------------------------------------------------------------------------

def _step(model, x, y):
    loss = F.cross_entropy(model(x), y) + lac_penalty(model)
    loss.backward()
    return loss


def test_golden_device_equals_host_exact_gemms_and_runs_every_gemm(seed):
    x, y = _batch(16)
    grads = []
    for device in (Device("golden", "sim"), None):
        with single_thread():
            model = convert(zoo.build("digits-cnn", 0), "octo", device, example_input=x[:1],
                            seed=seed)
            _step(model, x, y)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        stats = executor_of(model).stats
        if device is not None:
            # 4 forward programs; backward: dX+dW for conv2, conv3, fc and dW only for conv1
            assert {k: v.programs for k, v in stats.items()} == {
                (n, p): 1 for n in ("conv1", "conv2", "conv3", "fc")
                for p in ("forward", "backward")}
            assert stats[("conv1", "backward")].gemms == 1
            assert stats[("conv2", "backward")].gemms == 2
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_octo_gradients_point_where_fp32_gradients_point(seed):
    x, y = _batch(64)
    ref = zoo.build("digits-cnn", 0)
    _step(ref, x, y)
    model = convert(zoo.build("digits-cnn", 0), "octo", None, example_input=x[:1], seed=seed)
    _step(model, x, y)
    for name in ("conv1", "conv2", "conv3", "fc"):
        g = model.get_submodule(name).weight.grad.flatten()
        r = ref.get_submodule(name).weight.grad.flatten()
        cos = float(F.cosine_similarity(g, r, 0))
        assert cos > 0.95, f"{name}: cosine {cos:.3f}"


def test_saved_activations_int8_at_least_3_5x_smaller_than_fp32(seed):
    x, y = _batch(64)
    sizes = {}
    for method in ("fp32", "octo"):
        model = convert(zoo.build("digits-cnn", 0), method, None, example_input=x[:1],
                        seed=seed)
        with SavedTensorMeter(model) as meter:
            out = model(x)
        sizes[method] = meter
        F.cross_entropy(out, y).backward()  # what was saved is enough for backward
    fp32, int8 = sizes["fp32"].bytes, sizes["octo"].bytes
    print(f"saved for backward: fp32 {fp32} B, octo {int8} B, ratio {fp32 / int8:.2f}")
    assert fp32 / int8 >= 3.5
    assert set(sizes["fp32"].by_dtype) == {"float32"}
    assert sizes["octo"].by_dtype.get("float32", 0) <= 4 * 4  # only the 4 per-tensor scales
    # the INT8 copies of the 4 layer inputs: 64 images x (64 + 1024 + 512 + 512) values
    assert sizes["octo"].by_dtype["int8"] == 64 * (64 + 1024 + 512 + 512)


# -- modules and convert ------------------------------------------------------------------------

def test_lac_shapes_and_penalty(seed):
    x, _ = _batch(2)
    elem = convert(zoo.build("digits-cnn", 0), "octo", None, example_input=x, seed=seed)
    chan = convert(zoo.build("digits-cnn", 0), "octo", None, lac_mode="channel", seed=seed)
    assert elem.conv2.lac.mu.shape == (32, 4, 4)
    assert chan.conv2.lac.mu.shape == (32, 1, 1)
    assert isinstance(elem.fc, OctoLinear) and isinstance(elem.relu1, OctoReLU)
    lacs = [m for m in elem.modules() if isinstance(m, LossAwareCompensation)]
    expected = sum(0.5 * 0.1 * float(m.mu.detach().square().sum()
                                     + m.offset.detach().square().sum()) for m in lacs)
    assert float(lac_penalty(elem).detach()) == pytest.approx(expected, rel=1e-6)
    assert expected > 0
    naive = convert(zoo.build("digits-cnn", 0), "int8-naive", None)
    assert naive.conv1.lac is None and float(lac_penalty(naive).detach()) == 0.0
    with pytest.raises(ShapeError, match="example_input.*'conv1'"):
        convert(zoo.build("digits-cnn", 0), "octo", None)


def test_convert_a_users_own_module_and_train_it(seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(4, 4, 3, stride=2), nn.ReLU())
            self.head = nn.Linear(4 * 3 * 3, 10)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

    torch.manual_seed(seed)
    net = convert(Net(), "octo", Device("golden", "sim"), lac_mode="channel", seed=seed)
    assert isinstance(net.features[0], OctoConv2d) and isinstance(net.head, OctoLinear)
    x, y = _batch(64)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    with single_thread():
        losses = []
        for _ in range(8):
            opt.zero_grad()
            losses.append(float(_step(net, x, y).detach()))
            opt.step()
    assert losses[-1] < losses[0] - 0.1 and losses == sorted(losses, reverse=True), losses
    assert executor_of(net).totals().programs == 8 * 6


def test_convert_refuses_what_it_cannot_run():
    with pytest.raises(UnsupportedLayerError, match="'0'.*groups=2"):
        convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "octo", None, lac=False)
    with pytest.raises(ShapeError, match="unknown training method 'int4'"):
        convert(nn.Sequential(nn.Linear(2, 2)), "int4", None)
    with pytest.raises(ShapeError, match="fp32"):
        convert(nn.Sequential(nn.Linear(2, 2)), "fp32", None, prc=False)
    with pytest.raises(ShapeError, match="prc_method='sd'"):
        convert(nn.Sequential(nn.Linear(2, 2)), "octo", None, prc_method="sd")


# -- training runs ------------------------------------------------------------------------------

def _weights(run_dir, label):
    state = torch.load(run_dir / label / CHECKPOINT, weights_only=True)
    return state["model"]


def test_training_is_deterministic_on_golden(tmp_path, seed):
    cfg = TrainConfig(method="octo", backend="golden", epochs=1, max_steps=2, seed=seed)
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    train(TrainConfig(method="octo", backend="golden", epochs=1, max_steps=2, seed=seed + 1),
          tmp_path / "c")
    wa, wb, wc = (_weights(tmp_path / d, "octo") for d in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["conv2.weight"], wc["conv2.weight"])
    assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    assert a["accel_programs"] == 2 * 8 + 4  # 2 steps x 8 programs + the evaluation's 4


RTL_CONFIG = "ecp5"  # the configuration tests/test_rtl.py builds too (one cached Verilator build)


@pytest.mark.rtl
def test_training_on_rtl_is_bit_identical_to_golden(tmp_path, seed, rtl_available):
    """N steps from one seed on golden and on the Verilated RTL: identical weights."""
    runs = {}
    for backend in ("golden", "rtl"):
        cfg = TrainConfig(method="octo", backend=backend, config=RTL_CONFIG, epochs=1,
                          max_steps=2, seed=seed)
        runs[backend] = train(cfg, tmp_path / backend)
    wg, wr = _weights(tmp_path / "golden", "octo"), _weights(tmp_path / "rtl", "octo")
    for key in wg:
        assert torch.equal(wg[key], wr[key]), key
    assert runs["rtl"]["accel_cycles"] > 0


@pytest.mark.slow
@pytest.mark.rtl
def test_longer_training_on_rtl_is_bit_identical_to_golden(tmp_path, seed, rtl_available):
    for method in ("int8-naive", "octo"):
        for backend in ("golden", "rtl"):
            train(TrainConfig(method=method, backend=backend, config=RTL_CONFIG, epochs=2,
                              max_steps=6, seed=seed), tmp_path / backend)
        wg = _weights(tmp_path / "golden", method)
        wr = _weights(tmp_path / "rtl", method)
        assert all(torch.equal(wg[k], wr[k]) for k in wg), method


def test_resume_continues_bit_identically(tmp_path, seed, monkeypatch):
    cfg = TrainConfig(method="octo", backend="host", epochs=2, max_steps=2, seed=seed)
    straight = train(cfg, tmp_path / "straight")
    original = training._save_checkpoint

    def interrupt_after_first_epoch(path, cfg_, run, epoch):
        original(path, cfg_, run, epoch)
        if epoch == 0:
            raise KeyboardInterrupt  # the run dies right after its epoch-1 checkpoint

    monkeypatch.setattr(training, "_save_checkpoint", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut")
    monkeypatch.setattr(training, "_save_checkpoint", original)
    assert torch.load(tmp_path / "cut" / "octo" / CHECKPOINT, weights_only=True)["epoch"] == 0
    resumed = train(cfg, tmp_path / "cut", resume=True)
    ws, wr = _weights(tmp_path / "straight", "octo"), _weights(tmp_path / "cut", "octo")
    assert ws.keys() == wr.keys() and all(torch.equal(ws[k], wr[k]) for k in ws)

    def untimed(history):
        return [{k: v for k, v in h.items() if not k.endswith("wall_s")} for h in history]

    assert untimed(resumed["history"]) == untimed(straight["history"])
    assert json.loads((tmp_path / "cut" / "octo" / METRICS).read_text())["epochs"] == 2
    with pytest.raises(ResumeError, match="'lr'"):
        train(TrainConfig(**{**cfg.__dict__, "lr": 0.5}), tmp_path / "cut", resume=True)
    with pytest.raises(ResumeError, match="no checkpoint"):
        train(cfg, tmp_path / "nowhere", resume=True)


def test_divergence_names_step_layer_and_tensor(tmp_path, monkeypatch):
    calls = {"n": 0}
    build = zoo.build

    def poisoned(name, seed=0):
        model = build(name, seed)

        def hook(module, args):
            calls["n"] += module.training  # convert's eval-mode shape probe does not count
            if calls["n"] == 2:  # the second training step
                with torch.no_grad():
                    module.conv2.weight[0, 0, 0, 0] = float("nan")
        model.register_forward_pre_hook(hook)  # on the root: survives convert()
        return model

    monkeypatch.setattr(zoo, "build", poisoned)
    with pytest.raises(TrainingDivergedError,
                       match=r"step 1: .*tensor 'weight' of layer 'conv2'") as info:
        train(TrainConfig(method="octo", backend="host", epochs=1, max_steps=3), tmp_path)
    assert (info.value.step, info.value.layer, info.value.tensor) == (1, "conv2", "weight")
    calls["n"] = 0
    with pytest.raises(TrainingDivergedError, match=r"step 1: .*'loss' of layer 'loss'"):
        train(TrainConfig(method="fp32", epochs=1, max_steps=3), tmp_path / "fp32")


def test_divergence_in_backward_names_the_gradient():
    x, y = _batch(8)
    model = convert(zoo.build("digits-cnn", 0), "int8-naive", None)
    logits = model(x)
    logits.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDivergedError, match="'grad_output' of layer 'fc'"):
        F.cross_entropy(logits, y).backward()


def test_cli_train_compare_writes_json_plot_and_table(tmp_path):
    from click.testing import CliRunner

    from tinyaccel.cli import main
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, [
        "train", "--backend", "host", "--epochs", "1", "--max-steps", "2", "--compare",
        "--seed", "3", "--run-dir", str(tmp_path / "run"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("method", "backend", "epochs", "test_acc", "train_loss", "wall_s",
                "accel_cycles", "activation_bytes"):
        assert key in data, key
    assert data["method"] == "octo" and data["epochs"] == 1
    assert [r["label"] for r in data["runs"]] == ["fp32", "int8-naive", "octo",
                                                  "octo-lac-only", "octo-prc-only"]
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000
    assert "| octo-prc-only |" in result.output
    bad = CliRunner().invoke(main, ["train", "--resume"])
    assert bad.exit_code != 0 and "--run-dir" in bad.output
