"""The resident model (sw/resident.py) on the golden backend: one program per inference, the
activations in OUT, bit-exact against the host reference (sw/reference.py) and the per-layer path.
"""

import math

import numpy as np
import pytest
import torch
from test_compiler import Residual
from torch import nn

import tinyaccel
from tinyaccel.errors import CapacityError, ShapeError, UnsupportedLayerError
from tinyaccel.hw.config import get_config
from tinyaccel.hw.isa import (
    COUNTER_RECORD_BYTES,
    INSTR_BYTES,
    LINK_TRAILER_BYTES,
    STATUS_BYTES,
    Buffer,
)
from tinyaccel.models import mlperf_tiny, zoo
from tinyaccel.sw.compiler import CompiledModel, bind
from tinyaccel.sw.quant import quantize
from tinyaccel.sw.reference import run_quantized
from tinyaccel.sw.resident import ResidentModel, inference_program, plan_resident
from tinyaccel.sw.runtime import Device

#: zoo model -> inputs run (the big ones at batch 1, a few inputs)
ZOO = {"digits-cnn": 3, "mobilenet-block": 3, "ic-resnet8": 2, "kws-dscnn": 2,
       "ad-autoencoder": 2, "vww-mobilenet": 1}


def _zoo_model(name: str):
    spec = zoo.get(name)
    if spec.weights == "digits":
        from tinyaccel.models.data import calibration_batch
        net, _ = zoo.load_or_train(name)
        calib = calibration_batch()
        return quantize(net, calib), calib[:ZOO[name]]
    net, _ = spec.train_fp32(seed=0)
    q = quantize(net, mlperf_tiny.random_inputs(spec.input_shape, 64, seed=100))
    return q, mlperf_tiny.random_inputs(spec.input_shape, ZOO[name], seed=200)


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_case(request):
    return (request.param, *_zoo_model(request.param))


def test_zoo_model_resident_equals_reference_and_per_layer(zoo_case):
    name, q, x = zoo_case
    reference = run_quantized(q, x, return_int=True)
    with Device("golden", "ecp5") as dev:
        model = bind(q, dev, placement="resident")
        assert isinstance(model, ResidentModel)
        got = model.run_int(q.input_q.quantize(x.numpy()))
    assert got.dtype == np.int8 and got.shape == reference.shape
    assert np.array_equal(got, reference), name
    if name in ("vww-mobilenet",):  # its per-layer run is the slow part; the oracle suffices
        return
    with Device("golden", "ecp5") as dev:
        per_layer = CompiledModel(q, dev, batch_size=8).run_int(q.input_q.quantize(x.numpy()))
    assert np.array_equal(got, per_layer)


def _expected_link_bytes(plan, config, n_instructions: int) -> int:
    """Bytes of one inference from the plan's tensor sizes and the protocol's word sizes."""
    cols, wb = config.cols, config.word_bytes(Buffer.OUT)
    first = plan.tensors["input"]
    pack = first.pack
    pixels = first.h * first.w
    in_words = (math.ceil(pixels / 2 ** pack) if pack else pixels * math.ceil(first.c / cols))
    last = plan.tensors[plan.output_tensor]
    out_words = last.h * last.w * math.ceil(last.c / cols)
    return (n_instructions * INSTR_BYTES + (in_words + out_words) * wb
            + plan.streamed_weight_bytes + STATUS_BYTES + COUNTER_RECORD_BYTES + LINK_TRAILER_BYTES)


def test_zoo_model_link_bytes_and_arena(zoo_case):
    name, q, x = zoo_case
    config = get_config("ecp5")
    plan = plan_resident(q, config)
    xq = q.input_q.quantize(x.numpy())
    with Device("golden", config) as dev:
        model = ResidentModel(q, dev, plan=plan)
        model.run_int(xq[:1])
        n = len(inference_program(plan, xq[0]))
        assert model.res_stats.last_link_bytes == _expected_link_bytes(plan, config, n)
        # the setup program carried the resident weights, the inference only the streamed ones
        assert model.res_stats.setup_link_bytes >= plan.resident_weight_bytes
        # the estimate's GEMM cycles are the golden model's MACs issued over the array (ecp5
        # has the shadow bank: no idle cycles between blocks)
        est = plan.estimate_cycles()
        assert est["gemm"] * config.macs == model.res_stats.macs_issued
        assert est["overlapped"] == max(est[u] for u in ("stream", "im2col", "gemm", "requant"))
    if name in ("digits-cnn", "ic-resnet8"):
        # ResNet-8's weights live in WGT on ecp5 (only PARAM words beyond its 32 stream)
        assert all(lp.wgt_resident for lp in plan.layers)
    # the arena: inside OUT, and no two tensors live at once share a word (except the in-place
    # pairs, whose output starts the proven gap below its dying input)
    depth = config.depth(Buffer.OUT)
    tensors = list(plan.tensors.values())
    for t in tensors:
        assert 0 <= t.base and t.base + t.span <= depth
    for i, a in enumerate(tensors):
        for b in tensors[i + 1:]:
            if a.end < b.start or b.end < a.start:
                continue
            for out, inp in ((a, b), (b, a)):
                pair = plan.in_place_pairs.get(out.name)
                if pair and pair[0] == inp.name:  # the output starts `gap` below its input,
                    assert out.base == inp.base - pair[1]  # which dies as the output is born
                    assert inp.end == out.start
                    break
            else:
                assert a.base + a.span <= b.base or b.base + b.span <= a.base, (a, b)
            continue
    # weights and params fit their buffers
    assert plan.wgt_words <= config.depth(Buffer.WGT)
    assert plan.param_words <= config.depth(Buffer.PARAM)


SMALL = {
    "conv-stride2-pad": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
    "conv-dilated-5x5": lambda: nn.Sequential(nn.Conv2d(3, 6, 5, padding=4, dilation=2)),
    "conv-groups": lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU6()),
    "depthwise-mult2": lambda: nn.Sequential(nn.Conv2d(6, 12, 3, padding=1, groups=6)),
    "wide-conv": lambda: nn.Sequential(nn.Conv2d(3, 20, 3, stride=2, padding=1), nn.ReLU(),
                                       nn.Conv2d(20, 20, 3, padding=1, groups=2), nn.ReLU(),
                                       nn.Conv2d(20, 36, 1)),
    "flatten-linear": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                            nn.Linear(6 * 3 * 3, 20), nn.ReLU(),
                                            nn.Linear(20, 7)),
    "avgpool": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(2)),
    "global-avgpool": lambda: nn.Sequential(nn.Conv2d(3, 12, 1), nn.AdaptiveAvgPool2d(1),
                                            nn.Flatten(), nn.Linear(12, 5)),
    "residual-add-relu6": Residual,
    "maxpool": lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(6, 4, 3, padding=1)),
    "maxpool-wide-pad-stride": lambda: nn.Sequential(nn.Conv2d(3, 10, 3, padding=1),
                                                     nn.MaxPool2d(3, stride=2, padding=1)),
    "maxpool-dilated-input": lambda: nn.Sequential(nn.MaxPool2d(2, stride=1, dilation=2),
                                                   nn.Conv2d(3, 5, 1)),
    "keras-same-pad": lambda: nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()),
}


#: Models the planner refuses, and why: a tile is whole output rows, and one row of this 5x5
#: window does not fit half of ice40's INP (then the per-layer path runs it)
REFUSED = {("conv-dilated-5x5", "ice40"): r"'0' \(conv2d\).*one output row"}


@pytest.mark.parametrize("config", ["ice40", "ecp5"])
@pytest.mark.parametrize("name", list(SMALL))
def test_small_models_resident_equal_reference(name, config):
    """Small configurations force many tiles, channel-word splits and streamed weights."""
    torch.manual_seed(0)
    net = SMALL[name]().eval()
    channels = {"residual-add-relu6": 4, "conv-groups": 4, "depthwise-mult2": 6}.get(name, 3)
    x = torch.randn(3, channels, 7, 7)
    q = quantize(net, torch.randn(32, channels, 7, 7))
    reference = run_quantized(q, x, return_int=True)
    with Device("golden", config) as dev:
        if (name, config) in REFUSED:
            with pytest.raises(UnsupportedLayerError, match=REFUSED[name, config]):
                bind(q, dev, placement="resident")
            return
        got = ResidentModel(q, dev).run_int(q.input_q.quantize(x.numpy()))
    assert np.array_equal(got, reference)


def test_streaming_on_a_small_config_and_one_program_per_inference():
    torch.manual_seed(1)
    net = SMALL["wide-conv"]().eval()
    q = quantize(net, torch.randn(16, 3, 7, 7))
    config = get_config("ice40")
    plan = plan_resident(q, config)
    assert plan.streamed_weight_bytes > 0  # WGT 512 words does not hold these weights
    x = q.input_q.quantize(torch.randn(2, 3, 7, 7).numpy())
    with Device("golden", config) as dev:
        model = ResidentModel(q, dev, plan=plan)
        model.run_int(x)
        assert dev.stats.programs == 1 + 2  # setup once, then one per inference
        assert model.res_stats.inferences == 2
        assert model.res_stats.macs_issued > 0


def test_unequal_strides_fall_back_with_their_reason():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, stride=(1, 2))).eval()
    q = quantize(net, torch.randn(16, 3, 8, 8))
    conv = q.layers[-1].name
    with Device("golden", "ecp5") as dev:
        with pytest.raises(UnsupportedLayerError, match=rf"'{conv}' \(conv2d\).*stride"):
            bind(q, dev, placement="resident")
        with pytest.warns(UserWarning, match="per-layer"):
            model = bind(q, dev, placement="auto")
    assert isinstance(model, CompiledModel) and conv in model.placement_reason


def test_activation_bigger_than_out_raises_capacity_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1)).eval()
    q = quantize(net, torch.randn(4, 3, 40, 40))
    # ice40: OUT 256 words of 4 lanes; 40x40 pixels of 8 channels are 3200 words
    with pytest.raises(CapacityError, match=r"OUT: tensor .* bytes short"):
        plan_resident(q, get_config("ice40"))


def test_bad_input_shape_names_both_shapes():
    torch.manual_seed(0)
    q = quantize(SMALL["avgpool"]().eval(), torch.randn(8, 3, 6, 6))
    with Device("golden", "ecp5") as dev:
        model = ResidentModel(q, dev)
        with pytest.raises(ShapeError, match=r"\(2, 3, 5, 6\).*\(N, 3, 6, 6\)"):
            model(torch.zeros(2, 3, 5, 6))
        with pytest.raises(ShapeError, match=r"\(3, 6, 6\).*\(N, 3, 6, 6\)"):
            model.run_int(np.zeros((3, 6, 6), np.int8))


def test_compile_placement_auto_gives_the_per_layer_logits():
    torch.manual_seed(0)
    net = SMALL["flatten-linear"]().eval()
    x = torch.randn(4, 3, 7, 7)
    resident = tinyaccel.compile(net, x, config="ecp5", placement="auto")
    per_layer = tinyaccel.compile(net, x, config="ecp5")
    assert resident.placement == "resident" and per_layer.placement == "per-layer"
    assert torch.equal(resident(x), per_layer(x))


def test_in_place_when_two_activations_do_not_fit_out():
    """ice40's OUT (256 words) holds one 12x12x4 activation (144 words) but not two: the second
    conv writes its output over its dying input, as its trace allows."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)).eval()
    q = quantize(net, torch.randn(16, 1, 12, 12))
    plan = plan_resident(q, get_config("ice40"))
    assert plan.in_place and plan.in_place_pairs
    assert sum(t.span for t in plan.tensors.values() if t.start <= 1 <= t.end) > 256
    x = torch.randn(2, 1, 12, 12)
    with Device("golden", "ice40") as dev:
        got = ResidentModel(q, dev, plan=plan).run_int(q.input_q.quantize(x.numpy()))
    assert np.array_equal(got, run_quantized(q, x, return_int=True))


@pytest.mark.rtl
@pytest.mark.parametrize("config", ["ice40", "ecp5"])
def test_resident_models_on_the_rtl_equal_the_reference(config):
    """The small models (every layer kind, tiles, channel-word splits, streamed weights on
    ice40) and, on ecp5, the digits CNN: one program per inference on the Verilated RTL, every
    output code equal to the host reference's, every cycle counted."""
    cases = []
    for name in SMALL:
        if (name, config) in REFUSED:
            continue
        torch.manual_seed(0)
        net = SMALL[name]().eval()
        channels = {"residual-add-relu6": 4, "conv-groups": 4, "depthwise-mult2": 6}.get(name, 3)
        cases.append((name, quantize(net, torch.randn(32, channels, 7, 7)),
                      torch.randn(2, channels, 7, 7)))
    if config == "ecp5":
        q, x = _zoo_model("digits-cnn")
        cases.append(("digits-cnn", q, x))
    with Device("rtl", config) as dev:
        for name, q, x in cases:
            model = ResidentModel(q, dev)
            got = model.run_int(q.input_q.quantize(x.numpy()))
            assert np.array_equal(got, run_quantized(q, x, return_int=True)), name
            assert model.res_stats.last_cycles > 0 and model.res_stats.macs_issued > 0, name
