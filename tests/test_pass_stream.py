"""PASS streaming (sw/pass_stream.py): the frame loop against the host INT8 reference.

The oracle is :mod:`tinyaccel.sw.reference` (layer by layer on the host, exact integers), never
the stream's own code: with threshold 0 every frame equals the dense reference; with a threshold
the output equals the dense reference on the device's *reference frame*, which stays within the
threshold of the current frame on every pixel; the first layer's accumulators then stay within
``threshold * sum |w|`` of dense compute on the current frame (the bound docs section 7 states).
"""

import numpy as np
import pytest
import torch
from torch import nn

from tinyaccel.errors import (
    CapacityError,
    DTypeError,
    FieldError,
    ShapeError,
    UnsupportedLayerError,
)
from tinyaccel.hw.config import PRESETS
from tinyaccel.sim.randprog import seed_from_env
from tinyaccel.sw.pass_stream import PassStream, plan_stream
from tinyaccel.sw.quant import quantize
from tinyaccel.sw.reference import accumulate, execute_layer, run_quantized
from tinyaccel.sw.runtime import Device

H, W = 16, 32


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 2, 1)).eval()


def _clip(seed: int, frames: int = 6, noise: float = 0.004):
    """A static background, a bright square moving, sensor noise on every pixel."""
    rng = np.random.default_rng(seed)
    bg = np.clip(rng.random((1, H, W)) * 0.2 + 0.4, 0, 1)
    clip = []
    for t in range(frames):
        f = bg.copy()
        y, x = 2 + t, 3 + 3 * t
        f[0, y:y + 4, x:x + 4] = 1.0
        clip.append(np.clip(f + rng.normal(0, noise, f.shape), 0, 1).astype(np.float32))
    return clip


@pytest.fixture(scope="module")
def qmodel():
    return quantize(_net(), torch.from_numpy(np.stack(_clip(99))))


def _dense(qmodel, codes):
    env = {"input": codes[None]}
    for layer in qmodel.layers:
        env[layer.name] = execute_layer(layer, [env[i] for i in layer.inputs])
    return env[qmodel.output][0]


def test_threshold_zero_is_dense_on_every_frame(qmodel):
    seed = seed_from_env()
    stream = PassStream(qmodel, Device("golden", "ecp5"), threshold=0)
    for t, frame in enumerate(_clip(seed)):
        out = stream.step_int(stream.quantize(frame))
        expect = run_quantized(qmodel, frame[None], return_int=True)[0]
        assert np.array_equal(out, expect), f"frame {t}"


@pytest.mark.parametrize("threshold", [3, 12])
def test_threshold_bound_holds_on_every_frame(qmodel, threshold):
    seed = seed_from_env()
    stream = PassStream(qmodel, Device("golden", "ecp5"), threshold=threshold)
    first = qmodel.layers[0]
    w_abs = np.abs(first.weight.astype(np.int64)).reshape(len(first.weight), -1).sum(axis=1)
    skipped = 0
    for t, frame in enumerate(_clip(seed, frames=8)):
        codes = stream.quantize(frame)
        out = stream.step_int(codes)
        ref = stream.reference_codes
        # the reference frame is within the threshold of the current frame on every pixel
        assert np.abs(ref.astype(np.int16) - codes).max() <= threshold, f"frame {t}"
        # the output is dense compute on the reference frame, bit for bit
        assert np.array_equal(out, _dense(qmodel, ref)), f"frame {t}"
        # the first layer's accumulators: within threshold * sum|w| of dense on the frame
        acc_pass = accumulate(first, [ref[None]]).astype(np.int64)
        acc_dense = accumulate(first, [codes[None]]).astype(np.int64)
        assert (np.abs(acc_pass - acc_dense) <= threshold * w_abs).all(), f"frame {t}"
        skipped += stream.history[-1].macs_skipped
    assert skipped > 0  # the bound is not met by computing everything


def test_dense_program_matches_reference_and_counts_all_patches(qmodel):
    stream = PassStream(qmodel, Device("golden", "ecp5"))
    frame = _clip(5)[0]
    out = stream.step_int(stream.quantize(frame), dense=True)
    assert np.array_equal(out, run_quantized(qmodel, frame[None], return_int=True)[0])
    st = stream.history[-1]
    assert st.macs_skipped == 0 and st.computed == st.patches


def test_host_gate_marks_what_is_recomputed(qmodel):
    calls = []

    def gate(new, ref):
        calls.append(ref is not None)
        mask = np.zeros(stream.plan.frame_tiles, bool)
        mask[:5] = True  # only the first five frame patches ever move
        return mask

    stream = PassStream(qmodel, Device("golden", "ecp5"), gate="host", host_gate=gate)
    clip = _clip(3)
    for frame in clip[:3]:
        out = stream.step_int(stream.quantize(frame))
    assert calls == [True, True]  # not called on the first frame (dense)
    ref = stream.reference_codes
    assert np.array_equal(out, _dense(qmodel, ref))
    assert stream.history[-1].changed_tiles == 5


def test_bad_input_is_named(qmodel):
    with pytest.raises(FieldError, match="threshold=256"):
        PassStream(qmodel, Device("golden", "ecp5"), threshold=256)
    with pytest.raises(FieldError, match="host_gate"):
        PassStream(qmodel, Device("golden", "ecp5"), gate="host")
    stream = PassStream(qmodel, Device("golden", "ecp5"))
    with pytest.raises(ShapeError, match=r"frame of shape \(16, 30\)"):
        stream.quantize(np.zeros((H, W - 2), np.float32))
    with pytest.raises(DTypeError, match="uint8"):
        stream.quantize(np.zeros((H, W), np.uint8))
    with pytest.raises(DTypeError, match="float32"):
        stream.step_int(np.zeros((1, H, W), np.float32))
    with pytest.raises(UnsupportedLayerError, match="no PASS unit"):
        plan_stream(qmodel, PRESETS["ice40"])


def test_a_stream_that_does_not_fit_names_the_buffer():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1)).eval()
    q = quantize(big, torch.rand(2, 1, 64, 96))
    with pytest.raises(CapacityError, match=r"^OUT: .* bytes short"):
        plan_stream(q, PRESETS["ecp5"])
