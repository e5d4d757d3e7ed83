"""The resident model: a whole quantized model as ONE program per inference, activations on chip.

The per-layer path (:mod:`tinyaccel.sw.compiler`) sends every layer's im2col tiles to the device
and reads every layer's output back. Here the activations live in the OUT buffer (channels last,
``pitch = ceil(C/cols)`` words per pixel) and IM2COL builds each GEMM's input words on the device
(``docs/resident.md``; the contract: ``Im2colOperands`` in ``hw/isa.py``, REQUANT ``out_gap``).
:func:`~tinyaccel.sw.resident_plan.plan_resident` places the model (arena, residency, the
instructions of each layer); :class:`ResidentModel` runs it: a setup program once per device,
then ``LOAD input -> every layer -> STORE result -> SYNC counters=1 clear=1`` per inference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ShapeError
from ..hw.isa import Buffer, Counter
from ..protocol import Program
from .quant_ir import QuantModel
from .resident_plan import ResidentPlan, TensorPlacement, plan_resident, resident_reason
from .runtime import Device, LinkCounter

__all__ = ["ResidentPlan", "TensorPlacement", "plan_resident", "resident_reason",
           "inference_program", "ResidentModel", "ResidentStats"]


def _pack_input(t: TensorPlacement, x: np.ndarray, cols: int) -> np.ndarray:
    """One sample's int8 codes (C, H, W) or (F,) as OUT words, channels last."""
    if t.pack:
        px = x.reshape(t.c, -1).T  # (pixels, C)
        lanes = cols >> t.pack
        words = np.zeros((-(-len(px) >> t.pack) << t.pack, lanes), np.int8)
        words[:len(px), :t.c] = px
        return words.reshape(-1, cols)
    px = x.reshape(t.c, -1).T
    words = np.zeros((len(px), t.pitch * cols), np.int8)
    words[:, :t.c] = px
    return words.reshape(-1, cols)


def inference_program(plan: ResidentPlan, x: np.ndarray) -> Program:
    """The program of one inference on int8 sample ``x``: LOAD it into OUT, every layer, STORE
    the output tensor, ``SYNC counters=1 clear=1``."""
    cfg = plan.config
    inp_half, acc_half = cfg.depth(Buffer.INP) // 2, cfg.depth(Buffer.ACC) // 2
    wslot = plan.wgt_stream_words
    tensors = plan.tensors
    prog = Program(cfg)
    t_in = tensors[plan.input_tensor]
    prog.load(Buffer.OUT, t_in.base, _pack_input(t_in, x, cfg.cols))
    for lp in plan.layers:
        for op in lp.ops:
            kind = op[0]
            if kind == "im2col":
                _, name, word, fields, half, oy0, mb = op
                prog.im2col(tensors[name].base + word, half * inp_half, oy0=oy0, out_w=lp.out_w,
                            m_blocks=mb, **fields)
            elif kind == "gemm":
                _, half, wgt, acc, k, mb, accumulate = op
                addr = wgt[1] if wgt[0] == "res" else (plan.wgt_stream_base + wgt[1] * wslot
                                                       + wgt[2])
                prog.gemm(half * inp_half, addr, acc * acc_half, k, m_blocks=mb, n_blocks=1,
                          accumulate=accumulate)
            elif kind == "requant":
                _, acc, name, p0, j, param, count = op
                t = tensors[name]
                prog.requant(acc * acc_half, t.base + p0 * t.pitch + j, param, count,
                             out_gap=t.pitch - 1)
            elif kind == "load_wgt":
                _, j, slot = op
                prog.load(Buffer.WGT, plan.wgt_stream_base + slot * wslot,
                          np.concatenate([p.b for p in lp.blocks[j]]))
            else:  # load_param
                _, j, slot = op
                prog.load(Buffer.PARAM, plan.param_stream_base + slot, lp.params[j:j + 1])
    t_out = tensors[plan.output_tensor]
    prog.store(Buffer.OUT, t_out.base, t_out.words)
    prog.sync(counters=True, clear=True)
    return prog


def _unpack_output(t: TensorPlacement, words: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    px = np.asarray(words).reshape(t.h * t.w, -1)[:, :t.c]
    return px.reshape(t.c) if len(shape) == 1 else px.T.reshape(t.c, t.h, t.w)


# -- runtime -----------------------------------------------------------------------------------

@dataclass
class ResidentStats:
    """What the resident runs cost: totals over inferences, and the last inference's figures."""
    inferences: int = 0
    cycles: int = 0
    macs_issued: int = 0
    link_bytes: int = 0  # inference programs only (the setup program: ``setup_link_bytes``)
    setup_link_bytes: int = 0
    last_cycles: int = 0
    last_link_bytes: int = 0
    resident_weight_bytes: int = 0
    streamed_weight_bytes: int = 0  # per inference

    @property
    def link_bytes_per_inference(self) -> float:
        return self.link_bytes / self.inferences if self.inferences else float("nan")


class ResidentModel:
    """A quantized model resident on a device: the calling convention of
    :class:`~tinyaccel.sw.compiler.CompiledModel` (float input -> float logits; :meth:`run_int`
    for int8), one program per inference after a setup program that loads the resident weights
    and requant parameters once.

    The device is owned: another program that writes WGT or PARAM between inferences would
    clobber the resident weights (call :meth:`setup` again after one).

    Raises
    ------
    UnsupportedLayerError, CapacityError
        From :func:`plan_resident`, when the model cannot run resident.
    """

    placement = "resident"

    def __init__(self, qmodel: QuantModel, device: Device, batch_size: int = 1,
                 plan: ResidentPlan | None = None):
        from .compiler import LayerStats
        self.qmodel, self.device, self.batch_size = qmodel, device, batch_size
        self.plan = plan or plan_resident(qmodel, device.config)
        if not isinstance(device.backend, LinkCounter):
            device.backend = LinkCounter(device.backend)
        self.link: LinkCounter = device.backend
        self.res_stats = ResidentStats(resident_weight_bytes=self.plan.resident_weight_bytes,
                                       streamed_weight_bytes=self.plan.streamed_weight_bytes)
        self.stats = {"resident": LayerStats("resident", "model", device.config.macs)}
        self._ready_generation: int | None = None  # backend generation the weights were loaded in
        self.wall_s = 0.0
        self.placement_reason: str | None = None

    def setup(self) -> None:
        """LOAD the resident weights and requant parameters (once per device)."""
        before = self.link.link_bytes
        self.device.run(self.plan.setup)
        self.res_stats.setup_link_bytes += self.link.link_bytes - before
        self._ready_generation = self.link.generation

    def run_one(self, x_int8: np.ndarray) -> np.ndarray:
        """One inference: int8 sample (per-sample input shape) -> int8 output codes."""
        from .lowering import useful_macs
        if self._ready_generation != self.link.generation:  # never loaded, or the board resynced
            self.setup()
        prog = inference_program(self.plan, x_int8)
        before = self.link.link_bytes
        responses = self.device.run(prog)
        counters = responses[-1].counters
        st, layer_st = self.res_stats, self.stats["resident"]
        st.inferences += 1
        st.last_cycles = int(counters[Counter.CYCLES])
        st.cycles += st.last_cycles
        st.macs_issued += int(counters[Counter.MACS_ISSUED])
        st.last_link_bytes = self.link.link_bytes - before
        st.link_bytes += st.last_link_bytes
        layer_st.gemms += sum(op[0] == "gemm" for lp in self.plan.layers for op in lp.ops)
        layer_st.macs += sum(useful_macs(lp.layer, 1) for lp in self.plan.layers)
        layer_st.macs_issued += int(counters[Counter.MACS_ISSUED])
        layer_st.cycles += st.last_cycles
        return _unpack_output(self.plan.tensors[self.plan.output_tensor], responses[-2],
                              self.plan.output_shape)

    def run_int(self, x_int8: np.ndarray) -> np.ndarray:
        """Int8 input batch -> int8 output codes, one program per sample."""
        x_int8 = np.asarray(x_int8)
        if x_int8.ndim != len(self.qmodel.input_shape) + 1 or \
                tuple(x_int8.shape[1:]) != tuple(self.qmodel.input_shape):
            raise ShapeError(f"input of shape {tuple(x_int8.shape)}; the model takes (N, "
                             f"{', '.join(map(str, self.qmodel.input_shape))})")
        return np.stack([self.run_one(x) for x in x_int8])

    def __call__(self, x, progress=None) -> torch.Tensor:
        """Float input (N x C x H x W tensor or array) -> float logits."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.ndim != len(self.qmodel.input_shape) + 1 or \
                tuple(x.shape[1:]) != tuple(self.qmodel.input_shape):
            raise ShapeError(f"input of shape {tuple(x.shape)}; the model takes (N, "
                             f"{', '.join(map(str, self.qmodel.input_shape))})")
        start = time.perf_counter()
        q = self.qmodel.input_q.quantize(x.astype(np.float32))
        samples = range(len(q))
        if progress:
            samples = progress(samples, desc=f"infer resident ({self.link.name})", unit="input")
        out = np.stack([self.run_one(q[i]) for i in samples])
        self.wall_s += time.perf_counter() - start
        return torch.from_numpy(self.qmodel.output_q.dequantize(out))

    @property
    def cycles(self) -> int:
        return self.res_stats.cycles
