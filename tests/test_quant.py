"""Post-training quantization and the INT8 reference executor.

Error bound of one quantized layer (used by ``test_layer_error_within_derived_bound``)
-------------------------------------------------------------------------------------
The layer's INT8 inputs are exact reals ``x = s_in (q - zp_in)``; padding is exactly 0 because
the executor pads with ``zp_in``. Against the FP32 layer on those same inputs, output element
``(n, c, ...)`` of a GEMM layer differs by at most

- weights: ``|w - s_w[c] q_w| <= s_w[c] / 2`` each, so ``E_w = s_w[c] / 2 * sum_k |x_k|``
  (avgpool: 0, its weights 1 * 1/(kh kw) are exact; add: ``sum_i |s_i - s_w w_i| |q_i - zp_i|``);
- bias: ``E_b = s_acc[c] / 2`` (rounded to the accumulator LSB ``s_acc = s_in s_w[c]``);
- multiplier: ``multiplier * 2^(shift-31)`` is within ``2^-31`` relative of the real scale, so
  ``E_m <= 2^-31 |y_acc|`` with ``|y_acc| <= |y_pre| + E_w + E_b`` (we use ``2^-30``);
- rounding: SaturatingRoundingDoublingHighMul rounds to ``2^-rs`` of an output step and
  RoundingDivideByPOT by ``rs = max(-shift, 0)`` rounds again:
  ``E_r = s_out (1/2 + 2^-(rs+1))``.

ReLU / ReLU6 and the INT8 range clamp are 1-Lipschitz and the quantized ``6`` lies within half a
step of 6, so with the FP32 result clamped to ``[real_min, real_max]`` of the output,
``|y_int8 - y_fp32| <= E_w + E_b + E_m + E_r``. The test checks this per element.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from amaranth.lib import data as adata
from torch import nn

from tinyaccel.errors import DTypeError, FieldError, ShapeError, UnsupportedLayerError
from tinyaccel.hw.isa import ChannelParams
from tinyaccel.models import data, zoo
from tinyaccel.sim.numerics import requantize
from tinyaccel.sim.randprog import seed_from_env
from tinyaccel.sw import quant, reference
from tinyaccel.sw.fx_frontend import float_layer
from tinyaccel.sw.quant import quantize_multiplier
from tinyaccel.sw.quant_ir import Activation, LayerKind, QuantLayer, QuantParams, RequantParams


def deq64(qp: QuantParams, q: np.ndarray) -> np.ndarray:
    """Dequantize in float64 (exact reals of the codes)."""
    return qp.scale * (q.astype(np.float64) - qp.zero_point)


@pytest.fixture(scope="module")
def trained(pytestconfig, tmp_path_factory):
    """Both zoo models trained (FP32, seed 0, default epochs) and quantized on 256 train images.

    Training is cached in pytest's cache directory under the current training recipe (see
    ``zoo.load_or_train``), shared with test_models.py.
    """
    cache = getattr(pytestconfig, "cache", None)
    directory = cache.mkdir("tinyaccel-models") if cache else tmp_path_factory.mktemp("models")
    out = {}
    for name in zoo.DIGITS_MODELS:
        model, metrics = zoo.load_or_train(name, seed=0, directory=directory)
        out[name] = (model, metrics, quant.quantize(model, data.calibration_batch(256, seed=0)))
    return out


# -- round trips and parameter encodings -------------------------------------------------------

def test_activation_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lo, hi = sorted(rng.normal(0, 10, 2) * rng.choice([1e-3, 1, 1e3]))
        qp = QuantParams.from_range(lo, hi)
        # the integer zero point moves the range by at most half a step
        assert qp.real_min <= min(lo, 0) + qp.scale / 2 and qp.real_max >= max(hi, 0) - qp.scale / 2
        assert qp.dequantize(qp.quantize(0.0))[()] == 0.0  # zero is exact
        x = rng.uniform(qp.real_min, qp.real_max, 1000)
        err = np.abs(deq64(qp, qp.quantize(x)) - x)
        assert err.max() <= qp.scale / 2 * (1 + 1e-9)
    qp = QuantParams.from_range(-1.0, 1.0)
    assert qp.quantize([1e9, -1e9]).tolist() == [127, -128]  # saturates


def test_weight_round_trip_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (6, 3, 3, 3)) * np.array([1e-4, 1e-2, 1, 3, 100, 0]).reshape(-1, 1, 1, 1)
    q, scale = quant.quantize_weight_per_channel(w)
    assert q.dtype == np.int8 and scale.shape == (6,)
    err = np.abs(w - scale.reshape(-1, 1, 1, 1) * q).reshape(6, -1).max(1)
    assert np.all(err <= scale / 2 * (1 + 1e-12))
    assert np.abs(q[:5]).reshape(5, -1).max(1).tolist() == [127] * 5  # full range per channel
    assert q.min() >= -127 and not q[5].any() and scale[5] == 1.0  # zero channel


def test_bias_round_trip_and_overflow():
    acc_scale = np.array([1e-3, 2e-5, 0.5])
    b = np.array([0.1234, -0.5, 7.0])
    q = quant.quantize_bias(b, acc_scale)
    assert q.dtype == np.int32
    assert np.all(np.abs(q * acc_scale - b) <= acc_scale / 2)
    with pytest.raises(FieldError, match=r"layer 'head': bias\[1\]=1e\+06 .*outside INT32"):
        quant.quantize_bias(np.array([0.0, 1e6]), np.array([1.0, 1e-6]), "head")


def test_multiplier_reconstructs_real_scale():
    rng = np.random.default_rng(2)
    scales = np.exp(rng.uniform(np.log(1e-8), np.log(1e3), 5000))
    m, shift = quantize_multiplier(scales)
    rebuilt = m.astype(np.float64) * np.exp2(shift.astype(np.float64) - 31)
    assert np.all(np.abs(rebuilt - scales) <= 2.0 ** -31 * scales)
    assert np.all((m >= 1 << 30) & (shift >= -31) & (shift <= 31))


def test_quantize_multiplier_reconstructs_scales():
    rng = np.random.default_rng(seed_from_env())
    scales = np.concatenate([2.0 ** rng.uniform(-30, 30, 500), [1.0, 0.5, 0.75, 2.0 ** -31]])
    mult, shift = quantize_multiplier(scales)
    for s, m, e in zip(scales, mult.tolist(), shift.tolist(), strict=True):
        assert (1 << 30) <= m < (1 << 31), s
        assert abs(m * 2.0 ** (e - 31) - s) <= s * 2.0 ** -31, s
        assert (int(m), int(e)) == quantize_multiplier(float(s))
    assert quantize_multiplier(1.0) == (1 << 30, 1)
    assert quantize_multiplier(0.0) == (0, 0)
    # m * 2^31 within 0.25 of 2^31 rounds up to 2^31: becomes 2^30 with shift + 1.
    assert quantize_multiplier((1 - 2.0 ** -33) * 2.0 ** 5) == (1 << 30, 6)
    assert quantize_multiplier(2.0 ** -40) == (0, 0)  # below a shift of -31: flushed
    assert quantize_multiplier(2.0 ** 40) == (2 ** 31 - 1, 31)  # beyond +31: saturated
    for bad in (-0.5, math.inf, math.nan):
        with pytest.raises(FieldError, match=f"real_scale={bad}"):
            quantize_multiplier(bad)


def test_quantize_multiplier_drives_requantize():
    rng = np.random.default_rng(seed_from_env())
    for scale in 2.0 ** rng.uniform(-12, -2, 40):
        m, e = quantize_multiplier(scale)
        acc = rng.integers(-(1 << 18), 1 << 18, 200).astype(np.int32)
        got = requantize(acc, 0, m, e, 0, -128, 127).astype(np.int64)
        ideal = np.clip(np.round(acc * scale), -128, 127)
        assert np.abs(got - ideal).max() <= 1, scale


def test_layer_requant_params_reconstruct_scale_and_pack(trained):
    layout = adata.Layout.cast(ChannelParams)
    for _, _, qmodel in trained.values():
        for layer in qmodel.layers:
            if layer.kind == LayerKind.FLATTEN:
                continue
            rq = layer.requant
            np.testing.assert_array_equal(rq.real_scale, layer.acc_scale / layer.output_q.scale)
            rebuilt = rq.multiplier.astype(np.float64) * np.exp2(rq.shift.astype(np.float64) - 31)
            assert np.all(np.abs(rebuilt - rq.real_scale) <= 2.0 ** -31 * rq.real_scale), layer.name
            for c in range(len(rq)):
                fields = rq.channel_params(c)
                back = layout.const(fields)
                assert {k: int(getattr(back, k)) for k in fields} == fields, (layer.name, c)


def test_add_weights_ratio():
    assert quant.add_weights(0.05, 0.05)[:2] == (1, 1)
    for s_a, s_b in [(0.0452, 0.0429), (0.01, 0.3), (1.0, 1 / 3), (0.02, 0.0200001)]:
        w_a, w_b, s_w = quant.add_weights(s_a, s_b)
        assert 1 <= w_a <= 127 and 1 <= w_b <= 127
        assert abs(s_w * w_a / s_a - 1) < 2e-3 and abs(s_w * w_b / s_b - 1) < 2e-3


# -- one layer of every kind against FP32 ------------------------------------------------------

class Residual(nn.Module):
    """``x + conv(x)``: an add whose operand is the model input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class TwoBranchAdd(nn.Module):
    """``relu(a(x) + b(x))`` with branches of very different scales; ReLU fuses into the add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.b.weight.mul_(7.0)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


def _bn_depthwise():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False), bn, nn.ReLU6())


LAYER_CASES = {
    "conv-relu": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
    "conv-relu6-stride2": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU6()),
    "conv-dilated-linear": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2)),
    "conv-grouped": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.ReLU()),
    "depthwise-bn-relu6": _bn_depthwise,
    "flatten-linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 7 * 7, 10)),
    "avgpool-2": lambda: nn.Sequential(nn.AvgPool2d(2)),
    "avgpool-3-stride2": lambda: nn.Sequential(nn.AvgPool2d(3, stride=2)),
    "global-avgpool": lambda: nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU6(),
                                            nn.AdaptiveAvgPool2d(1)),
    "residual-add": Residual,
    "two-branch-add-relu": TwoBranchAdd,
}


def _layer_bound(layer: QuantLayer, x: list[torch.Tensor], pre: torch.Tensor):
    """Per-element bound (float64 tensor shaped like the output) derived in the module doc."""
    shape = (1, pre.shape[1]) + (1,) * (pre.ndim - 2)
    s_out = layer.output_q.scale
    rs = np.maximum(-layer.requant.shift.astype(np.int64), 0)
    e_r = torch.from_numpy(s_out * (0.5 + np.exp2(-(rs + 1.0)))).reshape(shape)
    e_w = torch.zeros_like(pre)
    e_b = torch.zeros(shape, dtype=torch.float64)
    if layer.kind in (LayerKind.CONV2D, LayerKind.LINEAR):
        ones = torch.ones(layer.weight.shape, dtype=torch.float64)
        if layer.kind == LayerKind.CONV2D:
            sum_abs = F.conv2d(x[0].abs(), ones, None, layer.stride, layer.padding,
                               layer.dilation, layer.groups)
        else:
            sum_abs = F.linear(x[0].abs(), ones)
        e_w = torch.from_numpy(layer.weight_scale / 2).reshape(shape) * sum_abs
        if layer.float_bias is not None:
            e_b = torch.from_numpy(layer.acc_scale / 2).reshape(shape)
    elif layer.kind == LayerKind.ADD:
        s_w = layer.acc_scale.reshape(shape[1:])
        for i, (xi, qi) in enumerate(zip(x, layer.input_q, strict=True)):
            rel = np.abs(qi.scale - s_w * layer.weight[:, i].reshape(shape[1:])) / qi.scale
            e_w = e_w + torch.from_numpy(rel) * xi.abs()
    e_m = 2.0 ** -30 * (pre.abs() + e_w + e_b)
    return e_w + e_b + e_m + e_r


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_error_within_derived_bound(case):
    torch.manual_seed(10)
    model = LAYER_CASES[case]().eval()
    x = torch.rand(48, 3, 7, 7) * 3 - 1  # signed input: input zero point is not -128
    qmodel = quant.quantize(model, x)
    env = reference.run_quantized(qmodel, x, return_all=True)
    kinds = set()
    for layer in qmodel.layers:
        kinds.add(layer.kind)
        xs = [torch.from_numpy(deq64(qp, env[name]))
              for name, qp in zip(layer.inputs, layer.input_q, strict=True)]
        got = deq64(layer.output_q, env[layer.name])
        if layer.kind == LayerKind.FLATTEN:
            np.testing.assert_array_equal(got, xs[0].flatten(1).numpy())
            continue
        with torch.no_grad():
            pre = float_layer(dataclasses.replace(layer, activation=Activation.NONE), xs)
            ref = float_layer(layer, xs).clamp(layer.output_q.real_min,
                                                     layer.output_q.real_max)
        bound = _layer_bound(layer, xs, pre).numpy()
        err = np.abs(got - ref.numpy())
        s_out = layer.output_q.scale
        print(f"\n{case} {layer.name} ({layer.kind.value}, {layer.activation.value}): "
              f"max error {err.max() / s_out:.3f} steps, bound {bound.max() / s_out:.3f} steps")
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert np.all(err <= bound + 1e-9 * s_out), (
            f"{layer.name}: error {err[worst]:.4g} > bound {bound[worst]:.4g} at {worst}")
        assert err.max() <= 2 * s_out  # and in practice within two output steps
    assert kinds - {LayerKind.FLATTEN}


def test_integer_accumulators_fold_zero_points(trained):
    """acc + ChannelParams.bias == sum (q - zp_in) w_q + bias_q, computed independently."""
    _, _, qmodel = trained["mobilenet-block"]
    x = data.load_digits_split().x_test[:24]
    env = reference.run_quantized(qmodel, x, return_all=True)
    for layer in qmodel.layers:
        if layer.kind == LayerKind.FLATTEN:
            continue
        centered = [torch.from_numpy(env[name].astype(np.float64) - qp.zero_point)
                    for name, qp in zip(layer.inputs, layer.input_q, strict=True)]
        w = torch.from_numpy(layer.weight.astype(np.float64))
        if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
            ref = F.conv2d(centered[0], w, None, layer.stride, layer.padding, layer.dilation,
                           layer.groups).movedim(1, -1)
        elif layer.kind == LayerKind.LINEAR:
            ref = centered[0] @ w.T
        else:
            ref = sum(c.movedim(1, -1) * w[:, i] for i, c in enumerate(centered))
        acc = reference.accumulate(layer, [env[name] for name in layer.inputs])
        lhs = acc.astype(np.int64) + layer.requant.bias
        np.testing.assert_array_equal(lhs, ref.numpy().astype(np.int64) + layer.bias,
                                      err_msg=layer.name)


# -- whole models ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(zoo.DIGITS_MODELS))
def test_int8_accuracy_within_1pp_of_fp32(trained, name, record_property):
    model, metrics, qmodel = trained[name]
    split = data.load_digits_split()
    logits = reference.run_quantized(qmodel, split.x_test)
    acc_int8 = float((logits.argmax(1) == split.y_test.numpy()).mean())
    with torch.no_grad():
        fp32 = model(split.x_test).numpy()
    agree = float((logits.argmax(1) == fp32.argmax(1)).mean())
    record_property("fp32_acc", metrics["test_acc"])
    record_property("int8_acc", acc_int8)
    print(f"\n{name}: FP32 {metrics['test_acc']:.4f}, INT8 {acc_int8:.4f}, "
          f"top-1 agreement {agree:.4f} on {len(split.y_test)} test images")
    assert metrics["test_acc"] >= 0.95
    assert abs(acc_int8 - metrics["test_acc"]) <= 0.01
    np.testing.assert_allclose(reference.run_float(qmodel, split.x_test), fp32, atol=1e-4)


def test_quantization_is_replayable(trained):
    model, _, qmodel = trained["digits-cnn"]
    again = quant.quantize(model, data.calibration_batch(256, seed=0))
    for a, b in zip(qmodel.layers, again.layers, strict=True):
        if a.weight is not None:
            np.testing.assert_array_equal(a.weight, b.weight)
            for f in RequantParams.FIELDS:
                np.testing.assert_array_equal(getattr(a.requant, f), getattr(b.requant, f))
        assert a.output_q == b.output_q


def test_quantized_model_structure(trained):
    _, _, qmodel = trained["mobilenet-block"]
    by_name = {layer.name: layer for layer in qmodel.layers}
    assert by_name["stem.0"].fused == ("stem.1", "stem.2")  # BatchNorm and ReLU6 folded in
    assert by_name["block.dw.0"].groups == 32 and by_name["block.dw.0"].weight.shape == (
        32, 1, 3, 3)
    assert by_name["add"].inputs == ("stem.0", "block.project.0")
    assert by_name["gap"].kind == LayerKind.AVGPOOL and by_name["gap"].kernel_size == (4, 4)
    relu6 = by_name["sep_pw.0"]
    assert relu6.activation == Activation.RELU6
    assert relu6.requant.clamp_min[0] == relu6.output_q.zero_point
    q6 = relu6.output_q.zero_point + round(6 / relu6.output_q.scale)
    assert relu6.requant.clamp_max[0] == min(127, q6)
    assert qmodel.output == "fc" and "conv2d" in qmodel.summary()


def test_percentile_calibration_clips_outliers():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.rand(64, 1, 8, 8)
    x[0, 0, 0, 0] = 50.0  # one outlier
    q_mm = quant.quantize(model, x)
    q_pc = quant.quantize(model, x, method="percentile", percentile=99.9)
    assert q_mm.input_q.real_max >= 50.0 - q_mm.input_q.scale
    assert q_pc.input_q.real_max < 2.0
    assert q_pc.meta == {"method": "percentile", "samples": 64, "percentile": 99.9}
    with pytest.raises(FieldError, match="method='mean'"):
        quant.quantize(model, x, method="mean")


# -- errors ------------------------------------------------------------------------------------

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv(x)
        return torch.relu(a) + a


class Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return torch.sigmoid(self.fc(x.flatten(1)))


class ViewNotFlat(nn.Module):
    """A view that splits the batch axis: not a flatten."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(x.view(-1, 32))


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.BatchNorm1d(6)),
     r"layer '3' \(BatchNorm1d\): BatchNorm1d folds only into a Linear directly before it, not "
     r"into linear '1'"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.BatchNorm1d(72)),
     r"layer '2' \(BatchNorm1d\): BatchNorm1d folds only into a Linear directly before it, not "
     r"into flatten '1'"),
    (nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.ReLU()),
     r"layer '1' \(ReLU\): its input '_0' is zero padding; padding is supported only "
     r"directly before a Conv2d"),
    (nn.Sequential(nn.ConstantPad2d(1, 0.5), nn.Conv2d(1, 2, 3)),
     r"layer '0' \(ConstantPad2d\): padding \(1, 1, 1, 1\) with value 0.5"),
    (ViewNotFlat(), r"node 'view' \(method view\): only a reshape to \(batch, -1\)"),
    (Branchy(), r"node 'relu' .*cannot be fused into 'conv'.*feeds other layers"),
    (Sigmoid(), r"node 'sigmoid' \(function torch.sigmoid\): not supported"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
     r"layer '0' \(Conv2d\): padding_mode='reflect'"),
    (nn.Sequential(nn.ReLU(), nn.Conv2d(1, 2, 3)), r"layer '0' \(ReLU\): ReLU.*model input"),
])
def test_unsupported_layers_are_named(model, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        quant.quantize(model, torch.rand(4, 1, 8, 8))


class WithLSTM(nn.Module):
    """A linear head followed by an LSTM nested one module deep (path ``body.rnn``)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
        self.body = nn.Module()
        self.body.rnn = nn.LSTM(8, 8)

    def forward(self, x):
        return self.body.rnn(self.head(x))[0]


def test_lstm_is_named_with_path_and_type():
    with pytest.raises(UnsupportedLayerError,
                       match=r"layer 'body.rnn' \(LSTM\): not supported by the INT8 quantizer; "
                             r"supported: Conv2d"):
        quant.quantize(WithLSTM(), torch.rand(4, 1, 8, 8))


def test_bias_overflow_names_the_layer():
    with pytest.raises(FieldError, match=r"layer 'fc': bias\[1\]=1000 .*outside INT32"):
        quant.quantize_bias(np.array([1.0, 1e3]), np.array([1.0, 1e-12]), "fc")


def test_vanishing_weight_scale_is_floored_so_the_bias_fits():
    """Channel 0: weights 1e-12 next to a bias of 1000 (an INT32 overflow at s_in * max|w| / 127);
    channel 1: ordinary weights, which the floor must leave alone."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1e-12, 0.5]).reshape(2, 1, 1, 1))
        model[0].bias.copy_(torch.tensor([1e3, 0.25]))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    qmodel = quant.quantize(model, x)
    layer = qmodel.layer("0")
    s_in = qmodel.input_q.scale
    # channel 0: the scale is the floor |b| / (s_in 2^30), so the bias is 2^30 LSBs exactly
    assert layer.weight_scale[0] == pytest.approx(1e3 / (s_in * 2 ** 30), rel=1e-12)
    assert layer.bias[0] == 2 ** 30 and layer.weight[0, 0, 0, 0] == 0
    # channel 1: what the plain per-channel scheme gives
    q, scale = quant.quantize_weight_per_channel(model[0].weight.detach().double().numpy())
    assert layer.weight_scale[1] == scale[1] and layer.weight[1, 0, 0, 0] == q[1, 0, 0, 0] == 127
    # the constant channel is exact to an output step, the other within the usual error
    y_q = reference.run_quantized(qmodel, x)
    y_f = model(x).detach().numpy()
    step = qmodel.output_q.scale
    assert np.abs(y_q - y_f).max() <= step
    assert np.abs(y_q[:, 0] - 1e3).max() <= step / 2 + 1e3 * 2 ** -30


def test_executor_checks_its_inputs(trained):
    _, _, qmodel = trained["digits-cnn"]
    with pytest.raises(ShapeError, match=r"shape \(2, 1, 7, 7\); the model takes \(N, 1, 8, 8\)"):
        reference.run_quantized(qmodel, np.zeros((2, 1, 7, 7)))
    layer = qmodel.layer("conv1")
    with pytest.raises(DTypeError, match="layer 'conv1': input 0 has dtype float32"):
        reference.execute_layer(layer, [np.zeros((1, 1, 8, 8), np.float32)])
    with pytest.raises(KeyError, match="no layer 'conv9'"):
        qmodel.layer("conv9")
    assert math.isclose(qmodel.input_q.scale, 1 / 255) and qmodel.input_q.zero_point == -128


# -- front-end forms of the MLPerf Tiny models (issue 12) ----------------------------------------

class PadThenConv(nn.Module):
    """Keras 'same' with stride 2 on an even input: 0 rows/columns before, 1 after."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=(1, 0))

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.functional else self.pad(x))


@pytest.mark.parametrize("functional", [True, False], ids=["F.pad", "ZeroPad2d"])
def test_asymmetric_padding_folds_into_the_conv_and_pads_with_the_zero_point(functional):
    model = PadThenConv(functional).eval()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.3
    qmodel = quant.quantize(model, x)
    (layer,) = qmodel.layers
    # conv padding (1, 0) plus the pad (top 0, bottom 1, left 0, right 1)
    assert layer.padding == (1, 0) and layer.padding_end == (2, 1)
    assert layer.pads == (1, 2, 0, 1) and layer.input_shapes == ((1, 8, 8),)
    assert layer.output_shape == tuple(model(x[:1]).shape[1:]) == (4, 5, 4)
    zp = qmodel.input_q.zero_point
    assert zp != 0  # the input is signed: padding with 0 instead of zp would be wrong
    xq = qmodel.input_q.quantize(x.numpy())
    # independent integer convolution: (x - zp) padded with 0, by torch in float64 (exact here)
    centred = torch.from_numpy(xq.astype(np.float64) - zp)
    want = F.conv2d(F.pad(centred, (0, 1, 1, 2)), torch.from_numpy(layer.weight.astype(np.float64)),
                    stride=2).permute(0, 2, 3, 1).numpy().astype(np.int64)
    acc = reference.accumulate(layer, [xq]).astype(np.int64)
    offset = zp * layer.weight.reshape(4, -1).astype(np.int64).sum(axis=1)
    assert np.array_equal(acc - offset, want)
    # the FP32 lowering computes what the model computes
    np.testing.assert_allclose(reference.run_float(qmodel, x), model(x).detach().numpy(),
                               atol=1e-6)


class ViewFlatten(nn.Module):
    """The common PyTorch flatten, ``x.view(x.size(0), -1)``."""

    def __init__(self, reshape: bool = False):
        super().__init__()
        self.reshape = reshape
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(128, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.reshape(x.size(0), -1) if self.reshape else x.view(x.size(0), -1))


@pytest.mark.parametrize("reshape", [False, True], ids=["view", "reshape"])
def test_view_flatten_is_a_flatten(reshape):
    torch.manual_seed(4)
    model = ViewFlatten(reshape)
    twin = nn.Sequential(model.conv, nn.ReLU(), nn.Flatten(), model.fc)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    qmodel, qtwin = quant.quantize(model, x), quant.quantize(twin, x)
    kinds = [layer.kind for layer in qmodel.layers]
    assert kinds == [LayerKind.CONV2D, LayerKind.FLATTEN, LayerKind.LINEAR]
    assert qmodel.layers[1].input_shapes == ((2, 8, 8),) and qmodel.layers[1].output_shape == (128,)
    # the same quantized numbers as with nn.Flatten
    assert np.array_equal(reference.run_quantized(qmodel, x, return_int=True),
                          reference.run_quantized(qtwin, x, return_int=True))


def test_batchnorm1d_folds_into_the_linear_before_it():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(6))
    qmodel = quant.quantize(model, x)
    first = qmodel.layers[0]
    assert [layer.kind for layer in qmodel.layers] == [LayerKind.LINEAR, LayerKind.LINEAR]
    assert first.fused == ("1", "2") and first.activation == Activation.RELU
    gain = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().numpy()
    np.testing.assert_allclose(first.float_weight, model[0].weight.detach().numpy() * gain[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(reference.run_float(qmodel, x), model(x).detach().numpy(),
                               atol=1e-5)


def test_vanishing_input_scale_is_floored_so_the_bias_fits():
    """A layer after a near-dead one: its input scale (~1e-12) makes s_in * s_w vanish."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 3, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e-9)
        model[0].bias.zero_()
        model[1].weight.copy_(torch.linspace(-1, 1, 6).reshape(3, 2, 1, 1))
        model[1].bias.copy_(torch.tensor([0.5, -0.25, 0.125]))
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    qmodel = quant.quantize(model, x)
    layer = qmodel.layer("1")
    s_in = layer.input_q[0].scale
    assert s_in < 1e-10
    assert np.array_equal(layer.bias, np.full(3, 2 ** 30, np.int32) * np.sign([1, -1, 1]))
    np.testing.assert_allclose(layer.weight_scale, np.abs(model[1].bias.detach().numpy())
                               / (s_in * 2 ** 30), rtol=1e-6)
    y_q = reference.run_quantized(qmodel, x)
    assert np.abs(y_q - model(x).detach().numpy()).max() <= qmodel.output_q.scale
