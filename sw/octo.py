"""Octo-style INT8 training: every Conv2d/Linear GEMM, forward and backward, on the accelerator.

Octo (Zhou et al., USENIX ATC'21) trains with INT8 arithmetic in both passes and keeps accuracy
with *Loss-aware Compensation* (LAC) and *Parameterized Range Clipping* (PRC). :func:`convert`
swaps a user's ``nn.Conv2d``/``nn.Linear`` (and ``nn.ReLU``) modules for :class:`OctoConv2d` /
:class:`OctoLinear` (and :class:`OctoReLU`), whose three GEMMs (forward, dX, dW) run as
INT8 x INT8 -> INT32 on a :class:`~tinyaccel.sw.runtime.Device`
(:mod:`tinyaccel.sw.octo_autograd`); the host does quantization
(:mod:`tinyaccel.sw.octo_numerics`), im2col/col2im, bias, LAC, loss and optimizer::

    model = convert(MyNet(), "octo", Device("golden", "sim"), example_input=x[:1])
    loss = F.cross_entropy(model(x), y) + lac_penalty(model)
    loss.backward()                      # dX and dW GEMMs run on the device

What we took from Octo's demo code and why, the choices made by measurement and the measured
accuracy and memory figures: ``docs/octo.md``. Runs are replayable bit for bit (seeded SR
generators, exact GEMMs, NumPy statistics); run the torch host math single-threaded
(``tinyaccel.models.data.single_thread``, as :mod:`tinyaccel.sw.train` does).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ShapeError, UnsupportedLayerError
from .octo_autograd import GemmExecutor, Int8Conv2dFn, Int8LinearFn, LayerRuntime, PackedReluFn
from .octo_numerics import METHODS, OctoOptions, options_for

# The training methods and their options are part of this public API (``convert(model, method)``
# takes a key of METHODS; the CLI offers METHODS as --method choices); they are defined beside
# the numerics they switch.
__all__ = [
    "METHODS", "OctoOptions", "options_for",
    "LossAwareCompensation", "OctoConv2d", "OctoLinear", "OctoReLU", "convert", "octo_layers",
    "lac_penalty", "octo_state", "load_octo_state", "executor_of", "SavedTensorMeter",
]


class LossAwareCompensation(nn.Module):
    """Octo's LAC layer: ``y = x + alpha * mu + offset``, all three learned.

    ``shape`` is ``(C, H, W)`` (element-wise) or ``(C, 1, 1)`` (channel-wise); ``alpha`` starts at
    1, ``mu`` and ``offset`` at ``1e-3 N(0, 1)`` drawn from ``generator``. :meth:`penalty` is
    ``0.5 * lambda * (|mu|^2 + |offset|^2)``, added to the loss by :func:`lac_penalty`.
    """

    def __init__(self, shape: tuple[int, ...], lam: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.lam = lam
        self.alpha = nn.Parameter(torch.ones(shape))
        self.mu = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
        self.offset = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha * self.mu + self.offset)

    def penalty(self) -> torch.Tensor:
        return 0.5 * self.lam * (self.mu.square().sum() + self.offset.square().sum())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.alpha.shape)}, lambda={self.lam}"


class _OctoLayer(nn.Module):
    def _setup(self, source: nn.Module, rt: LayerRuntime):
        self.weight = source.weight
        self.bias = source.bias
        self.runtime = rt

    @property
    def stochastic(self) -> bool:
        return self.training and self.runtime.options.stochastic


class OctoConv2d(_OctoLayer):
    """A ``Conv2d`` whose GEMMs run in INT8 on the accelerator (:class:`Int8Conv2dFn`), followed
    by its :class:`LossAwareCompensation` when LAC is on. Shares the original's parameters."""

    def __init__(self, conv: nn.Conv2d, rt: LayerRuntime,
                 lac: LossAwareCompensation | None = None):
        super().__init__()
        if conv.groups != 1:
            raise UnsupportedLayerError(f"layer {rt.name!r}: Conv2d with groups={conv.groups}; "
                                        "INT8 training supports groups=1")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedLayerError(
                f"layer {rt.name!r}: Conv2d padding={conv.padding!r} mode "
                f"{conv.padding_mode!r}; INT8 training supports numeric zero padding")
        self._setup(conv, rt)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.lac = lac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = Int8Conv2dFn.apply(x, self.weight, self.bias, self.runtime, self.stochastic,
                               tuple(self.stride), tuple(self.padding), tuple(self.dilation))
        return self.lac(y) if self.lac is not None else y

    def extra_repr(self) -> str:
        o, c, kh, kw = self.weight.shape
        return (f"{c}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, options={self.runtime.options}")


class OctoLinear(_OctoLayer):
    """A ``Linear`` whose GEMMs run in INT8 on the accelerator (:class:`Int8LinearFn`)."""

    def __init__(self, linear: nn.Linear, rt: LayerRuntime):
        super().__init__()
        self._setup(linear, rt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = Int8LinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.runtime,
                               self.stochastic)
        return y.reshape(*lead, -1)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"in_features={i}, out_features={o}, options={self.runtime.options}"


class OctoReLU(nn.Module):
    """ReLU saving a packed bit mask for backward (:class:`PackedReluFn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PackedReluFn.apply(x)


def _layer_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _conv_output_shapes(model: nn.Module, example_input: torch.Tensor, names: list[str]):
    shapes, handles = {}, []
    for name in names:
        def hook(_m, _i, out, name=name):
            shapes[name] = tuple(out.shape[1:])
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def convert(model: nn.Module, method: str = "octo", device=None, *, lac: bool | None = None,
            prc: bool | None = None, stochastic: bool | None = None,
            prc_method: str | None = None, lac_mode: str | None = None,
            lac_lambda: float | None = None, example_input: torch.Tensor | None = None,
            seed: int = 0, relu: bool = True) -> nn.Module:
    """Swap ``model``'s ``Conv2d``/``Linear`` (and ``ReLU``) modules in place for INT8 versions.

    Parameters
    ----------
    model:
        Any ``nn.Module``; its ``nn.Conv2d`` (groups = 1, zero padding) and ``nn.Linear``
        submodules become :class:`OctoConv2d` / :class:`OctoLinear` sharing their parameters.
    method:
        ``"fp32"`` (returns ``model`` untouched), ``"int8-naive"`` or ``"octo"``.
    device:
        A :class:`~tinyaccel.sw.runtime.Device` running the GEMMs, or ``None`` for the host
        reference executor (:func:`~tinyaccel.sim.numerics.exact_gemm`).
    lac, prc, stochastic, prc_method, lac_mode, lac_lambda:
        Override the method's :class:`~tinyaccel.sw.octo_numerics.OctoOptions` (ablations);
        ``None`` keeps the default.
    example_input:
        A batch the model accepts; needed by element-wise LAC to size each compensation.
    seed:
        Seeds the LAC initialization and each layer's stochastic-rounding generator.
    relu:
        Also swap ``nn.ReLU`` for :class:`OctoReLU` (bit-mask saved for backward; exact).

    Returns the same ``model`` object. Raises :class:`~tinyaccel.errors.UnsupportedLayerError`
    for a Conv2d the path cannot run (naming it) and :class:`~tinyaccel.errors.ShapeError` for bad
    options or a missing ``example_input``.
    """
    opts = options_for(method, lac=lac, prc=prc, stochastic=stochastic, prc_method=prc_method,
                       lac_mode=lac_mode, lac_lambda=lac_lambda)
    if opts is None:
        if any(v is not None for v in (lac, prc, stochastic, prc_method, lac_mode, lac_lambda)):
            raise ShapeError("method 'fp32' takes no INT8 options (lac, prc, ...)")
        return model
    executor = GemmExecutor(device)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU))
               and not isinstance(m, (OctoConv2d, OctoLinear))]
    convs = [name for name, m in targets if isinstance(m, nn.Conv2d)]
    shapes = {}
    if opts.lac and convs:
        if opts.lac_mode == "element":
            if example_input is None:
                raise ShapeError(f"element-wise LAC needs example_input to size the compensation "
                                 f"of layer {convs[0]!r} (or pass lac_mode='channel')")
            shapes = _conv_output_shapes(model, example_input, convs)
        else:
            shapes = {name: (model.get_submodule(name).out_channels, 1, 1) for name in convs}
    for name, module in targets:
        if isinstance(module, nn.ReLU):
            if relu:
                _set_module(model, name, OctoReLU())
            continue
        rt = LayerRuntime(name, opts, executor,
                           torch.Generator().manual_seed(_layer_seed(seed, name)))
        if isinstance(module, nn.Conv2d):
            comp = None
            if opts.lac:
                gen = torch.Generator().manual_seed(_layer_seed(seed, name + ".lac"))
                comp = LossAwareCompensation(shapes[name], opts.lac_lambda, gen)
            _set_module(model, name, OctoConv2d(module, rt, comp))
        else:
            _set_module(model, name, OctoLinear(module, rt))
    return model


def octo_layers(model: nn.Module) -> Iterator[tuple[str, _OctoLayer]]:
    """``(name, layer)`` of every :class:`OctoConv2d` / :class:`OctoLinear` in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _OctoLayer):
            yield name, m


def executor_of(model: nn.Module) -> GemmExecutor | None:
    """The :class:`GemmExecutor` a converted model's layers share (``None`` when unconverted)."""
    for _, layer in octo_layers(model):
        return layer.runtime.executor
    return None


def lac_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of ``0.5 * lambda * (|mu|^2 + |offset|^2)`` over the model's LAC layers (0 if none)."""
    total = torch.zeros(())
    for m in model.modules():
        if isinstance(m, LossAwareCompensation):
            total = total + m.penalty()
    return total


def octo_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The non-parameter state of INT8 training: each layer's SR generator state."""
    return {name: layer.runtime.generator.get_state() for name, layer in octo_layers(model)}


def load_octo_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`octo_state` (for a bit-identical resume)."""
    layers = dict(octo_layers(model))
    if set(layers) != set(state):
        raise ShapeError(f"INT8 training state for layers {sorted(state)} does not match the "
                         f"model's {sorted(layers)}")
    for name, gen_state in state.items():
        layers[name].runtime.generator.set_state(gen_state)


# -- memory -------------------------------------------------------------------------------------

class SavedTensorMeter(contextlib.AbstractContextManager):
    """Measures the bytes autograd saves for backward inside the ``with`` block.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` (built-in ops and
    ``ctx.save_for_backward`` alike) is counted once per storage (the largest view of it saved,
    so a batch sliced from a data set counts its own elements); parameters of ``exclude``
    (a module) are not activations and are skipped. ``bytes`` is the total, ``by_dtype`` the split.
    """

    def __init__(self, exclude: nn.Module | None = None):
        self._params = ({p.untyped_storage().data_ptr() for p in exclude.parameters()}
                        if exclude is not None else set())
        self._seen: dict[int, tuple[int, str]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._params:
            # A view (e.g. a batch sliced from a data set) counts its own elements only.
            nbytes = t.numel() * t.element_size()
            if nbytes > self._seen.get(ptr, (0, ""))[0]:
                self._seen[ptr] = (nbytes, str(t.dtype).removeprefix("torch."))
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(n for n, _ in self._seen.values())

    @property
    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, dtype in self._seen.values():
            out[dtype] = out.get(dtype, 0) + n
        return out
