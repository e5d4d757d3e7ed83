"""Each lowered op on the accelerator against PyTorch.

INT32 stage: the accelerator's accumulators (GEMMs run with ``out="int32"``, the INT32 bypass) equal
``torch.nn.functional.conv2d`` / ``linear`` computed in float64 on the integer tensors, exactly.
INT8 stage: the accelerator's requantized outputs equal the documented requant
(``tinyaccel.sim.numerics.requantize``) of those accumulators, exactly.
Seeds are printed; replay with TINYACCEL_SEED.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinyaccel.errors import UnsupportedLayerError
from tinyaccel.sim.numerics import requantize
from tinyaccel.sim.randprog import SEED_ENV, parse_seed
from tinyaccel.sw.compiler import CompiledModel
from tinyaccel.sw.gemm_run import Gemm, run_gemms
from tinyaccel.sw.lowering import assemble, layer_gemms, useful_macs
from tinyaccel.sw.quant import quantize
from tinyaccel.sw.quant_ir import HOST_KINDS, LayerKind
from tinyaccel.sw.reference import accumulate
from tinyaccel.sw.runtime import Device

SEED = parse_seed(os.environ.get(SEED_ENV))  # fixed unless TINYACCEL_SEED says otherwise
BACKENDS = [pytest.param("golden", id="golden"),
            pytest.param("rtl", id="rtl", marks=pytest.mark.rtl)]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.act(self.a(x) + self.b(x))


def _models():
    return {
        "conv-stride2-pad": nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
        "conv-dilated-5x5": nn.Sequential(nn.Conv2d(3, 6, 5, padding=4, dilation=2)),
        "conv-groups": nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU6()),
        "depthwise": nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6)),
        "linear": nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 20), nn.ReLU()),
        "avgpool": nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(2)),
        "maxpool-then-conv": nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 2, padding=1),
                                           nn.Conv2d(4, 4, 3)),
        "global-avgpool": nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)),
        "residual-add-relu6": Residual(),
        # Keras 'same' padding, stride 2 (issue 12): asymmetric, folded into the conv
        "keras-same-pad": nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2),
                                        nn.ReLU()),
        "asymmetric-pad-even-kernel": nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)),
                                                    nn.Conv2d(3, 6, (4, 2), stride=(2, 1),
                                                              padding=(1, 0))),
    }


def _torch_accumulators(layer, inputs):
    """Exact INT32 accumulators from PyTorch in float64, channels last."""
    if layer.kind in (LayerKind.CONV2D, LayerKind.AVGPOOL):
        x = torch.from_numpy(inputs[0].astype(np.float64))
        top, bottom, left, right = layer.pads
        x = F.pad(x, (left, right, top, bottom), value=float(layer.pad_value))
        w = torch.from_numpy(layer.weight.astype(np.float64))
        acc = F.conv2d(x, w, stride=layer.stride, dilation=layer.dilation, groups=layer.groups)
        return acc.permute(0, 2, 3, 1).numpy()
    if layer.kind == LayerKind.LINEAR:
        x = torch.from_numpy(inputs[0].astype(np.float64))
        return F.linear(x, torch.from_numpy(layer.weight.astype(np.float64))).numpy()
    a, b = (torch.from_numpy(t.astype(np.float64)).permute(0, 2, 3, 1) for t in inputs)
    wa, wb = (torch.from_numpy(layer.weight[:, i].astype(np.float64)) for i in (0, 1))
    return (a * wa + b * wb).numpy()


def _device_accumulators(layer, inputs, device):
    """The layer's GEMMs (packed as the compiler packs them) on the device through the INT32
    bypass, channels last."""
    gemms = layer_gemms(layer, inputs, device.config.cols)
    run = run_gemms(device, [Gemm(a, b) for a, b, _ in gemms])
    assert all(r.dtype == np.int32 for r in run.results)
    return assemble(layer, gemms, run.results, inputs[0].shape[0])


@pytest.fixture(scope="module", params=BACKENDS)
def device(request):
    """One device per backend for the whole module (the RTL simulator starts once)."""
    with Device(request.param, "ice40") as dev:
        yield dev


@pytest.mark.parametrize("name", list(_models()))
def test_lowered_op_matches_pytorch(name, device):
    print(f"TINYACCEL_SEED={SEED}")
    torch.manual_seed(SEED % 2**31)
    model = _models()[name].eval()
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    channels = first.in_channels if isinstance(first, nn.Conv2d) else 3
    x = torch.rand(5, channels, 8, 8)
    qmodel = quantize(model, x)
    compiled = CompiledModel(qmodel, device)
    env = compiled.run_int(qmodel.input_q.quantize(x.numpy()), return_all=True)
    checked = 0
    for layer in qmodel.layers:
        if layer.kind in HOST_KINDS:
            continue
        inputs = [env[i] for i in layer.inputs]
        expected_acc = _torch_accumulators(layer, inputs)
        assert np.abs(expected_acc).max() < 2**31
        got_acc = _device_accumulators(layer, inputs, device)
        np.testing.assert_array_equal(got_acc, expected_acc.astype(np.int32),
                                      err_msg=f"{name}/{layer.name} INT32, seed {SEED}")
        # the host reference executor (one GEMM per group, exact_gemm) gives the same integers
        np.testing.assert_array_equal(accumulate(layer, inputs), expected_acc.astype(np.int32),
                                      err_msg=f"{name}/{layer.name} reference, seed {SEED}")
        expected = requantize(expected_acc.astype(np.int32),
                              *(getattr(layer.requant, f) for f in layer.requant.FIELDS))
        if expected.ndim > 2:
            expected = np.moveaxis(expected, -1, 1)
        np.testing.assert_array_equal(env[layer.name], expected,
                                      err_msg=f"{name}/{layer.name} INT8, seed {SEED}")
        checked += 1
    assert checked >= 1


def test_maxpool_on_int8_codes_equals_pooling_the_floats():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2, padding=1)).eval()
    x = torch.rand(4, 1, 8, 8)
    qmodel = quantize(model, x)
    conv, pool = qmodel.layers
    env = CompiledModel(qmodel, Device("golden", "ice40")).run_int(
        qmodel.input_q.quantize(x.numpy()), return_all=True)
    real = torch.from_numpy(conv.output_q.dequantize(env[conv.name]))
    expected = conv.output_q.quantize(F.max_pool2d(real, 2, padding=1).numpy())
    np.testing.assert_array_equal(env[pool.name], expected)


def test_compiled_model_close_to_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).eval()
    x = torch.rand(16, 1, 8, 8)
    compiled = CompiledModel(quantize(model, x), Device("golden", "sim"))
    got = compiled(x)
    ref = model(x).detach()
    # INT8 inference tracks float within a few output quantization steps.
    assert (got - ref).abs().max() < 8 * compiled.qmodel.output_q.scale
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid())
    with pytest.raises(UnsupportedLayerError, match="Sigmoid"):
        quantize(model, torch.rand(4, 1, 8, 8))


def test_useful_macs_counts_the_real_layer():
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 4, 1)).eval()
    qmodel = quantize(model, torch.rand(2, 6, 8, 8))
    dw, pw = qmodel.layers
    assert useful_macs(dw, 3) == 3 * 8 * 8 * 6 * 9  # one 3x3 filter per channel
    assert useful_macs(pw, 3) == 3 * 8 * 8 * 6 * 4
