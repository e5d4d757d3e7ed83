"""Compile a quantized model (``sw/quant``) onto the accelerator and run it on any backend.

Every arithmetic layer of a :class:`~tinyaccel.sw.quant_ir.QuantModel` is a GEMM plus per-channel
requantization, and runs on the accelerator:

=========  =========================================================================  ==========
layer      lowering                                                                    where
=========  =========================================================================  ==========
conv2d     per group: ``im2col`` on the host (padding = input zero point), GEMM +       accelerator
           REQUANT (bias, BN, zero points and ReLU/ReLU6 folded into ChannelParams)
linear     GEMM + REQUANT                                                              accelerator
avgpool    a depthwise conv with unit weights; the 1/(kh*kw) lives in the multiplier   accelerator
add        ``[a | b] @ blockdiag(w_a, w_b)`` (K = 2C) + REQUANT                         accelerator
maxpool    max over windows of INT8 codes (exact: max commutes with quantization)       host
           (resident placement: on the device, IM2COL ``pool``)
flatten    reshape                                                                     host
=========  =========================================================================  ==========

The mapping of each layer to GEMMs is :mod:`tinyaccel.sw.lowering` (shared with the host
reference executor); each layer's GEMMs run as one program (all groups of a grouped conv in one
program, :func:`tinyaccel.sw.gemm_run.run_gemms`) that ends with ``SYNC counters=1 clear=1``, so
each layer reports its own cycles and MACs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ShapeError
from .gemm_run import Gemm, run_gemms
from .lowering import assemble, host_layer, layer_gemms, useful_macs
from .quant_ir import HOST_KINDS, INPUT, LayerKind, QuantLayer, QuantModel
from .runtime import Device

__all__ = ["LayerStats", "CompiledModel", "PLACEMENTS", "bind"]

#: Where a model's activations and weights live (:func:`bind`).
PLACEMENTS = ("per-layer", "resident", "auto")


@dataclass
class LayerStats:
    """What one layer cost on the accelerator, summed over the batches run."""
    name: str
    kind: str
    array_macs: int  # MAC units of the configuration
    gemms: int = 0
    macs: int = 0  # useful MACs (M x N x K of the real shapes)
    macs_issued: int = 0  # MACs the array performed (padding included)
    cycles: int = 0  # accelerator cycles (RTL and board backends; 0 on golden)

    @property
    def utilization(self) -> float:
        """Useful MACs per array-MAC-cycle over the layer's whole program (loads included)."""
        return self.macs / (self.cycles * self.array_macs) if self.cycles else float("nan")


class CompiledModel:
    """A quantized model bound to a device: call it with float input, get float logits.

    Parameters
    ----------
    qmodel:
        The output of :func:`tinyaccel.sw.quant.quantize`.
    device:
        A :class:`~tinyaccel.sw.runtime.Device` (golden, RTL or board).
    batch_size:
        Images per device program (larger batches fill the array better).
    """

    placement = "per-layer"

    def __init__(self, qmodel: QuantModel, device: Device, batch_size: int = 64):
        self.placement_reason: str | None = None
        self.qmodel = qmodel
        self.device = device
        self.batch_size = batch_size
        self.stats = {layer.name: LayerStats(layer.name, layer.kind.value, device.config.macs)
                      for layer in qmodel.layers if layer.kind not in HOST_KINDS}
        self.wall_s = 0.0

    def run_layer(self, layer: QuantLayer, inputs: list[np.ndarray]) -> np.ndarray:
        """One layer on the device: int8 inputs (NCHW or NC) -> int8 output."""
        if layer.kind in HOST_KINDS:
            return host_layer(layer, inputs[0])
        gemms = layer_gemms(layer, inputs, self.device.config.cols)
        run = run_gemms(self.device, [
            Gemm(a, b, {name: getattr(layer.requant, name)[channels]
                        for name in layer.requant.FIELDS})
            for a, b, channels in gemms])
        st = self.stats[layer.name]
        st.gemms += len(gemms)
        st.macs += useful_macs(layer, inputs[0].shape[0])
        st.macs_issued += run.macs_issued
        st.cycles += run.cycles
        out = assemble(layer, gemms, run.results, inputs[0].shape[0])
        return out if layer.kind == LayerKind.LINEAR else np.moveaxis(out, -1, 1)

    def run_int(self, x_int8: np.ndarray, return_all: bool = False):
        """Run on already-quantized int8 input; int8 output codes (or every layer's)."""
        env = {INPUT: x_int8}
        for layer in self.qmodel.layers:
            env[layer.name] = self.run_layer(layer, [env[i] for i in layer.inputs])
        return env if return_all else env[self.qmodel.output]

    def __call__(self, x, progress=None) -> torch.Tensor:
        """Float input (N x C x H x W tensor or array) -> float logits, batch by batch."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if tuple(x.shape[1:]) != tuple(self.qmodel.input_shape):
            raise ShapeError(f"input of shape {tuple(x.shape)}; the model takes (N, "
                             f"{', '.join(map(str, self.qmodel.input_shape))})")
        start = time.perf_counter()
        q = self.qmodel.input_q.quantize(x.astype(np.float32))
        outs = []
        batches = range(0, len(q), self.batch_size)
        for i in (progress(batches, desc=f"infer ({self.device.backend.name})", unit="batch")
                  if progress else batches):
            outs.append(self.run_int(q[i:i + self.batch_size]))
        self.wall_s += time.perf_counter() - start
        return torch.from_numpy(self.qmodel.output_q.dequantize(np.concatenate(outs)))

    @property
    def cycles(self) -> int:
        return sum(s.cycles for s in self.stats.values())


def bind(qmodel: QuantModel, device: Device, batch_size: int = 64, placement: str = "per-layer"):
    """``qmodel`` on ``device`` with a placement: ``"per-layer"`` (:class:`CompiledModel`, every
    layer round-trips through the host), ``"resident"``
    (:class:`~tinyaccel.sw.resident.ResidentModel`: one program per inference, activations on
    chip) or ``"auto"`` (resident when the planner accepts the model, else per-layer with the
    planner's reason in ``placement_reason`` and a warning). Both compute the same integers.

    Raises
    ------
    ConfigError
        An unknown ``placement``.
    UnsupportedLayerError, CapacityError
        ``placement="resident"`` for a model the planner refuses (a stride differing between
        the axes, too big for OUT).
    """
    from ..errors import CapacityError, ConfigError, UnsupportedLayerError
    from .resident import ResidentModel, plan_resident
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement={placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if placement == "per-layer":
        return CompiledModel(qmodel, device, batch_size)
    try:
        plan = plan_resident(qmodel, device.config)
    except (UnsupportedLayerError, CapacityError) as exc:
        if placement == "resident":
            raise
        import warnings
        warnings.warn(f"placement auto: per-layer path, as the resident planner refused: {exc}",
                      stacklevel=2)
        compiled = CompiledModel(qmodel, device, batch_size)
        compiled.placement_reason = str(exc)
        return compiled
    return ResidentModel(qmodel, device, batch_size, plan=plan)
