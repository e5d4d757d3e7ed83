"""PASS streaming: a convolutional model on a video, one program per frame, the work of unchanged
patches skipped on the device (``docs/architecture.md`` section 7, the method ``docs/pass.md``).

:func:`plan_stream` places the model for streaming: every tensor *tiled* (stored patch by patch,
one patch = one GEMM M block of ``rows`` pixels, ``AccelConfig.patch_shape``) and kept in OUT across
frames -- the frame as it arrives, its *reference* (what the first layer computes on) and every
layer's output -- weights and requant parameters resident. :class:`PassStream` runs it, a frame a
call. Per frame::

    LOAD frame -> OUT new
    PATCH new vs reference, tile by tile: MASK bit = changed (|new - ref| > threshold somewhere),
          changed tiles copied over the reference        (host gate: LOAD MASK, PATCH given)
    per layer:
      DILATE  the frame's change mask -> the mask of the layer's output patches whose receptive
              field (through every layer so far) holds a changed frame patch (an OR window in
              the mask domain: one patch quantization, not one per layer)
      per chunk of patch rows: IM2COL (tiled, gated) -> GEMM (gated) -> REQUANT (gated)
    STORE the last layer's patch mask; SYNC counters
    (second program) STORE the output patches that were recomputed; the host keeps the rest

A skipped patch keeps its previous output, which is exactly what dense compute would give: its
inputs did not change. So every frame's output equals dense compute on the *reference frame*,
which is within ``threshold`` of the current frame on every pixel (it only ever moves a whole tile
to the current values): the error cannot drift, and ``threshold = 0`` is bit-identical to dense.

The dense baseline (:meth:`PassStream.dense_program`) is the same placement with no PATCH, no
DILATE and no gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from amaranth.lib import data

from ..errors import CapacityError, DTypeError, FieldError, ShapeError, UnsupportedLayerError
from ..hw.config import AccelConfig
from ..hw.isa import MASK_WORD_BITS, Buffer, Counter, DilateOperands, Opcode, PatchOperands
from ..protocol import Program, channel_params_words
from ..sim.numerics import tiled_index
from .quant_ir import INPUT, LayerKind, QuantLayer, QuantModel
from .resident_plan import TensorPlacement, _conv_parts, _pack_for
from .runtime import Device, LinkCounter

__all__ = ["StreamPlan", "plan_stream", "PassStream", "FrameStats", "THRESHOLD_MAX",
           "tile_frame", "untile"]

#: The largest PATCH threshold (an INT8 code difference): the field's maximum.
THRESHOLD_MAX = (1 << data.Layout.cast(PatchOperands)["threshold"].shape.width) - 1
_DILATE = {n: (1 << f.shape.width) - 1 for n, f in data.Layout.cast(DilateOperands)}
_PATCH_BLOCKS = (1 << data.Layout.cast(PatchOperands)["blocks"].shape.width) - 1
_WINDOW_FIELDS = ("kh", "kw", "stride_y", "stride_x", "pad_top", "pad_left")


def _refuse(layer: QuantLayer, why: str):
    raise UnsupportedLayerError(f"layer {layer.name!r} ({layer.kind.value}) cannot stream with "
                                f"PASS: {why}")


def untile(words_px: np.ndarray, h: int, w: int, patch_shape: tuple[int, int]) -> np.ndarray:
    """Pixels in tiled order ``(h*w, ...)`` -> raster ``(h, w, ...)``."""
    y, x = np.divmod(np.arange(h * w), w)
    return np.asarray(words_px)[tiled_index(y, x, w, patch_shape)].reshape(h, w, -1)


def tile_frame(t: TensorPlacement, x: np.ndarray, cols: int,
               patch_shape: tuple[int, int]) -> np.ndarray:
    """One sample's int8 codes ``(C, H, W)`` as the OUT words of tiled tensor ``t``."""
    y, xx = np.divmod(np.arange(t.h * t.w), t.w)
    px = np.empty((t.h * t.w, t.c), np.int8)
    px[tiled_index(y, xx, t.w, patch_shape)] = x.reshape(t.c, -1).T
    if t.pack:
        words = np.zeros((-(-len(px) >> t.pack) << t.pack, cols >> t.pack), np.int8)
        words[:len(px), :t.c] = px
        return words.reshape(-1, cols)
    words = np.zeros((len(px), t.pitch * cols), np.int8)
    words[:, :t.c] = px
    return words.reshape(-1, cols)


def _untile_tensor(t: TensorPlacement, words: np.ndarray, cols: int,
                   patch_shape: tuple[int, int]) -> np.ndarray:
    """OUT words of tiled tensor ``t`` -> int8 ``(C, H, W)``."""
    if t.pack:
        px = np.asarray(words).reshape(-1, cols >> t.pack)[:t.h * t.w, :t.c]
    else:
        px = np.asarray(words).reshape(t.h * t.w, -1)[:, :t.c]
    return untile(px, t.h, t.w, patch_shape).transpose(2, 0, 1)


@dataclass
class _StreamLayer:
    layer: QuantLayer
    x: str  # input tensor
    out: str
    out_h: int
    out_w: int
    blocks: list  # per column block: list of resident_plan._Part
    params: np.ndarray
    dilate: dict  # DILATE fields: the frame's change mask -> this layer's patch mask
    mask: int = 0  # first MASK bit of the output patch mask (a multiple of 64)
    footprint: tuple = ()  # (y, x) Footprint: where its output pixels look in the frame
    shares_mask: bool = False  # the previous layer's patch mask serves (no DILATE of its own)
    chunk_rows: int = 0  # patch rows per chunk (dense: halves of INP and ACC alternate)
    chunk_rows_gated: int = 0  # patch rows per gated chunk (whole INP and ACC)
    wgt_addr: list = field(default_factory=list)  # per block, per part
    param_addr: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        return self.dilate["out_h"], self.dilate["out_w"]


@dataclass
class StreamPlan:
    """Where a model lives for streaming and what each frame runs (:func:`plan_stream`)."""
    config: AccelConfig
    tensors: dict[str, TensorPlacement]
    layers: list[_StreamLayer]
    frame: str  # the new frame's tensor; its reference is ``ref``
    ref: str
    output: str
    frame_grid: tuple[int, int]  # patch grid of the frame: its change mask at MASK bit 0
    tile_words: int  # OUT words of one frame patch (PATCH k)
    setup: Program | None = None

    @property
    def out_words(self) -> int:
        return max(t.base + t.span for t in self.tensors.values())

    @property
    def frame_tiles(self) -> int:
        return self.frame_grid[0] * self.frame_grid[1]

    def summary(self) -> str:
        c = self.config
        return (f"stream plan on {c.name}: OUT {self.out_words}/{c.depth(Buffer.OUT)} words "
                f"(frame, reference and {len(self.layers)} layer outputs kept across frames), "
                f"{len(self.layers)} layers, patches {c.patch_shape[0]}x{c.patch_shape[1]}, "
                f"frame {self.frame_grid[0]}x{self.frame_grid[1]} patches")


@dataclass(frozen=True)
class Footprint:
    """Where a layer's output pixel ``o`` looks in the *frame*, along one axis: frame pixels
    ``o*stride - pad .. o*stride - pad + extent`` (the receptive field through every layer so
    far: strides multiply, pads and kernel extents add up scaled by the strides before them)."""
    stride: int = 1
    pad: int = 0
    extent: int = 0

    def then(self, s: int, pad: int, k: int, d: int) -> Footprint:
        """The footprint after one more layer (stride ``s``, padding ``pad``, kernel ``k``,
        dilation ``d``)."""
        return Footprint(self.stride * s, self.pad + pad * self.stride,
                         self.extent + (k - 1) * d * self.stride)

    def window(self, p: int) -> tuple[int, int, int]:
        """The frame-patch window of output patch ``b`` (pixels ``b*p .. b*p + p - 1``): frame
        patches ``b*stride - P .. b*stride - P + K - 1``, ``(K, stride, P)`` -- exact, as
        ``stride*p`` frame pixels are whole frame patches."""
        pads = -(-self.pad // p)
        return ((p - 1) * self.stride - self.pad + self.extent) // p + pads + 1, self.stride, pads


def _stream_layer(layer: QuantLayer, x: TensorPlacement, config: AccelConfig,
                  foot: tuple[Footprint, Footprint], frame_grid: tuple[int, int]):
    cols, rows = config.cols, config.rows
    ph, pw = config.patch_shape
    if layer.kind != LayerKind.CONV2D:
        _refuse(layer, "the streaming compile runs chains of convolutions (no pooling, adds or "
                       "linear layers)")
    out_c, out_h, out_w = layer.output_shape
    if out_h % ph or out_w % pw or x.h % ph or x.w % pw:
        _refuse(layer, f"its input {x.h}x{x.w} and output {out_h}x{out_w} must be whole "
                       f"{ph}x{pw} patches")
    k_max = config.depth(Buffer.INP) // 2
    blocks = _conv_parts(layer, x, layer.weight, layer.groups, layer.kernel_size, layer.stride,
                         layer.dilation, layer.pads, layer.pad_value, cols, rows, k_max,
                         (out_h, out_w))
    (kh, kw), (sy, sx), (dy, dx) = layer.kernel_size, layer.stride, layer.dilation
    top, _, left, _ = layer.pads
    fy, fx = foot[0].then(sy, top, kh, dy), foot[1].then(sx, left, kw, dx)
    # The DILATE reads the frame's change mask with the layer's whole footprint (one patch
    # quantization, however deep the layer) when DILATE's fields hold that window; otherwise
    # the previous layer's patch mask with this layer's own window (each layer then adds up to
    # a patch of slack; both are supersets of what changed, so both are exact).
    grid = dict(out_h=out_h // ph, out_w=out_w // pw)
    wy, wx = fy.window(ph), fx.window(pw)
    dil = dict(grid, in_h=frame_grid[0], in_w=frame_grid[1], kh=wy[0], stride_y=wy[1],
               pad_top=wy[2], kw=wx[0], stride_x=wx[1], pad_left=wx[2], src="frame")
    if any(dil[n] > _DILATE[n] for n in _WINDOW_FIELDS):
        wy = Footprint().then(sy, top, kh, dy).window(ph)
        wx = Footprint().then(sx, left, kw, dx).window(pw)
        dil = dict(grid, in_h=x.h // ph, in_w=x.w // pw, kh=wy[0], stride_y=wy[1],
                   pad_top=wy[2], kw=wx[0], stride_x=wx[1], pad_left=wx[2], src="previous")
    for name in _WINDOW_FIELDS:
        if dil[name] > _DILATE[name]:
            _refuse(layer, f"its receptive field needs DILATE.{name}={dil[name]} (max "
                           f"{_DILATE[name]})")
    requant = {f: getattr(layer.requant, f) for f in layer.requant.FIELDS}
    params = channel_params_words(requant, out_c, len(blocks) * cols, cols)
    return _StreamLayer(layer, x.name, layer.name, out_h, out_w, blocks, params, dil), (fy, fx)


def plan_stream(qmodel: QuantModel, config: AccelConfig) -> StreamPlan:
    """Place ``qmodel`` for streaming on ``config`` (see the module docstring).

    Raises
    ------
    UnsupportedLayerError
        A layer the streaming compile cannot run (not a convolution; output not whole patches;
        a receptive field beyond DILATE's fields), or a configuration without the PASS unit.
    CapacityError
        OUT, WGT, PARAM or MASK cannot hold what the stream keeps (names the buffer and the
        amount short).
    """
    if not config.impl.pass_unit:
        raise UnsupportedLayerError(f"config {config.name!r} ({config.impl.name}) has no PASS "
                                    f"unit: PATCH and DILATE are not implemented there")
    cols, rows = config.cols, config.rows
    ph, pw = config.patch_shape
    shape = qmodel.input_shape
    if len(shape) != 3:
        raise UnsupportedLayerError(f"the streaming compile needs an image input (C, H, W), not "
                                    f"{shape}")
    c, h, w = shape
    pack = _pack_for(c, cols)
    if pack and (rows >> pack) << pack != rows:
        pack = min(pack, rows.bit_length() - 1)
    tensors = {}

    def tensor(name, c, h, w, pack=0):
        t = TensorPlacement(name, h, w, c, 1 if pack else math.ceil(c / cols), pack, 0, 0)
        tensors[name] = t
        return t

    frame = tensor(INPUT, c, h, w, pack)
    ref = tensor("reference", c, h, w, pack)
    if h % ph or w % pw:
        raise UnsupportedLayerError(f"a {h}x{w} frame is not whole {ph}x{pw} patches")
    frame_grid = (h // ph, w // pw)
    layers, x, foot = [], ref, (Footprint(), Footprint())
    for layer in qmodel.layers:
        if layer.inputs != ((INPUT,) if not layers else (layers[-1].out,)):
            _refuse(layer, "the streaming compile runs a chain (each layer reads the previous one)")
        sl, foot = _stream_layer(layer, x, config, foot, frame_grid)
        sl.footprint = foot
        layers.append(sl)
        x = tensor(layer.name, *layer.output_shape)
    if qmodel.output != layers[-1].out:
        raise UnsupportedLayerError(f"the model's output {qmodel.output!r} is not its last layer")
    # OUT: every tensor lives across frames: one after another
    addr, depth, wb = 0, config.depth(Buffer.OUT), config.word_bytes(Buffer.OUT)
    for t in tensors.values():
        t.base, addr = addr, addr + t.span
    if addr > depth:
        raise CapacityError(f"OUT: the stream keeps {addr * wb} bytes across frames (frame, "
                            f"reference, {len(layers)} layer outputs), OUT has {depth * wb}: "
                            f"{(addr - depth) * wb} bytes short")
    # MASK: the frame's change mask at 0, kept through the frame; the layers' patch masks in
    # two regions after it, alternating (so that a layer's DILATE need not wait for the
    # previous layer's last gated REQUANT)
    def words(bits):
        return -(-bits // MASK_WORD_BITS) * MASK_WORD_BITS

    biggest = max(words(sl.grid[0] * sl.grid[1]) for sl in layers)
    regions = [words(frame_grid[0] * frame_grid[1])]
    regions.append(regions[0] + biggest)
    need = regions[0] + biggest * min(2, len(layers))
    if need > config.mask_bits:
        raise CapacityError(f"MASK: the frame's {frame_grid[0]}x{frame_grid[1]} change mask and "
                            f"two layer masks of up to {biggest} bits need {need} bits, MASK has "
                            f"{config.mask_bits} ({need - config.mask_bits} short)")
    region = 1
    for i, sl in enumerate(layers):
        prev = layers[i - 1] if i else None
        if prev is not None and sl.dilate["src"] == "frame" and prev.dilate["src"] == 0 and all(
                sl.dilate[n] == prev.dilate[n] for n in (*_WINDOW_FIELDS, "out_h", "out_w")):
            # the same footprint in patches (a 1x1 layer after its input's): the same mask,
            # no DILATE
            sl.mask, sl.shares_mask = prev.mask, True
            sl.dilate = dict(prev.dilate)
            continue
        region = 1 - region
        sl.mask = regions[region]
        src = 0 if sl.dilate["src"] == "frame" else prev.mask
        sl.dilate.update(src=src, dst=sl.mask)
    # weights and parameters resident
    wgt, param = 0, 0
    for sl in layers:
        sl.wgt_addr = []
        for parts in sl.blocks:
            sl.wgt_addr.append([])
            for part in parts:
                sl.wgt_addr[-1].append(wgt)
                wgt += part.k
        sl.param_addr, param = param, param + len(sl.params)
        k_part = max(p.k for parts in sl.blocks for p in parts)
        mb_max = min(_PATCH_BLOCKS, config.depth(Buffer.INP) // 2 // k_part,
                     config.depth(Buffer.ACC) // 2 // rows)
        sl.chunk_rows = mb_max // sl.grid[1]
        # gated chunks serialize anyway (every gated unit reads MASK's one port: docs section
        # 11.2), so they take whole INP and ACC: fewer, larger chunks, fewer instructions
        sl.chunk_rows_gated = min(_PATCH_BLOCKS, config.depth(Buffer.INP) // k_part,
                                  config.depth(Buffer.ACC) // rows) // sl.grid[1]
        if sl.chunk_rows < 1:
            _refuse(sl.layer, f"one row of {sl.grid[1]} patches needs more than {mb_max} m-blocks "
                              f"(half of INP/ACC)")
    for buf, used in ((Buffer.WGT, wgt), (Buffer.PARAM, param)):
        if used > config.depth(buf):
            short = (used - config.depth(buf)) * config.word_bytes(buf)
            raise CapacityError(f"{buf.name}: the resident model needs {used} words, "
                                f"{buf.name} has {config.depth(buf)} ({short} bytes short)")
    k = (rows >> frame.pack) * frame.pitch if frame.pack else rows * frame.pitch
    plan = StreamPlan(config, tensors, layers, frame.name, ref.name, layers[-1].out, frame_grid,
                      k)
    plan.setup = _setup_program(plan)
    return plan


def _setup_program(plan: StreamPlan) -> Program:
    prog = Program(plan.config)
    for sl in plan.layers:
        for parts, addrs in zip(sl.blocks, sl.wgt_addr, strict=True):
            for part, addr in zip(parts, addrs, strict=True):
                prog.load(Buffer.WGT, addr, part.b)
        prog.load(Buffer.PARAM, sl.param_addr, sl.params)
    return prog.sync(counters=True, clear=True)


def _layer_program(prog: Program, plan: StreamPlan, sl: _StreamLayer, gated: bool,
                   state: dict) -> None:
    """One layer's instructions: per chunk of patch rows, per column block, IM2COL + GEMM per K
    part (dense: INP and ACC halves alternate so that the next IM2COL overlaps this GEMM;
    gated: whole buffers, see ``chunk_rows_gated``), then REQUANT."""
    cfg = plan.config
    rows = cfg.rows
    ph, _ = cfg.patch_shape
    inp_half, acc_half = cfg.depth(Buffer.INP) // 2, cfg.depth(Buffer.ACC) // 2
    x, y = plan.tensors[sl.x], plan.tensors[sl.out]
    grid_h, grid_w = sl.grid
    gate = dict(gate=True) if gated else {}
    chunk = sl.chunk_rows_gated if gated else sl.chunk_rows
    for pr0 in range(0, grid_h, chunk):
        n_rows = min(chunk, grid_h - pr0)
        mb, p0 = n_rows * grid_w, pr0 * grid_w
        for j, parts in enumerate(sl.blocks):
            acc = state["acc"] = 0 if gated else 1 - state["acc"]
            for n, part in enumerate(parts):
                half = state["inp"] = 0 if gated else 1 - state["inp"]
                prog.im2col(x.base + part.word, half * inp_half, oy0=pr0 * ph, out_w=sl.out_w,
                            m_blocks=mb, tiled=True, mask_word=sl.mask // MASK_WORD_BITS,
                            **gate, **part.fields)
                prog.gemm(half * inp_half, sl.wgt_addr[j][n], acc * acc_half, part.k,
                          m_blocks=mb, accumulate=n > 0, mask_idx=sl.mask + p0, **gate)
            prog.requant(acc * acc_half, y.base + p0 * rows * y.pitch + j, sl.param_addr + j,
                         mb * rows, out_gap=y.pitch - 1, mask_idx=sl.mask + p0, **gate)


@dataclass
class FrameStats:
    """One frame's figures (``cycles`` 0 on the golden backend: it keeps no time)."""
    cycles: int
    macs_issued: int
    macs_skipped: int
    link_bytes: int
    changed_tiles: int  # frame patches whose reference moved
    computed: list  # per layer: output patches recomputed
    patches: list  # per layer: output patches in all
    masks: list = field(default_factory=list)  # per layer: bool (grid_h, grid_w), recomputed
    tile_mask: np.ndarray | None = None  # bool frame patch grid: the patches that moved

    @property
    def computed_fraction(self) -> float:
        return sum(self.computed) / max(sum(self.patches), 1)


class PassStream:
    """A quantized convolutional model streaming a video on a device, with PASS.

    ``stream(frame)`` takes one frame (float ``(C, H, W)`` or ``(H, W)`` in the model's input
    range; or int8 codes with :meth:`step_int`) and returns the model's output for it (float);
    the state PASS keeps (the reference frame, every layer's last output, the masks) stays on
    the device between calls. ``threshold`` (an INT8 code difference, 0..255) is the change a
    frame patch must exceed to be recomputed; ``gate="host"`` takes the change mask from
    ``host_gate(new_codes, ref_codes) -> bool (tiles,)`` instead (a learned gate).
    ``observe``: also read back each layer's patch mask (what it recomputed) for
    :class:`FrameStats`; those few bytes are counted apart from ``link_bytes``.

    Raises
    ------
    UnsupportedLayerError, CapacityError
        From :func:`plan_stream`.
    FieldError
        ``threshold`` outside 0..255.
    """

    def __init__(self, qmodel: QuantModel, device: Device, threshold: int = 0, *,
                 gate: str = "threshold", host_gate=None, plan: StreamPlan | None = None,
                 observe: bool = True):
        if not isinstance(threshold, (int, np.integer)) or not 0 <= threshold <= THRESHOLD_MAX:
            raise FieldError(f"PASS threshold={threshold!r} must be an int in "
                             f"0..{THRESHOLD_MAX} (an INT8 code difference)")
        if gate not in ("threshold", "host"):
            raise FieldError(f"gate={gate!r}: use 'threshold' (the PATCH comparator) or 'host'")
        if gate == "host" and host_gate is None:
            raise FieldError("gate='host' needs host_gate(new_codes, ref_codes) -> bool mask")
        self.qmodel, self.device, self.threshold = qmodel, device, int(threshold)
        self.gate, self.host_gate, self.observe = gate, host_gate, observe
        self.plan = plan or plan_stream(qmodel, device.config)
        if not isinstance(device.backend, LinkCounter):
            device.backend = LinkCounter(device.backend)
        self.link: LinkCounter = device.backend
        self.frames = 0
        self.history: list[FrameStats] = []
        self._ready = False
        self._shape: tuple[int, ...] | None = None
        self._ref_codes: np.ndarray | None = None  # host copy of the reference (host gate)
        self._out_words: np.ndarray | None = None  # host copy of the output tensor

    # -- programs
    def setup(self) -> None:
        """LOAD the resident weights and parameters (once per device)."""
        self.device.run(self.plan.setup)
        self._ready = True

    def reset(self) -> None:
        """Forget the reference: the next frame is computed densely."""
        self.frames = 0
        self._ref_codes = None
        self._out_words = None

    def frame_program(self, codes: np.ndarray, tile_mask: np.ndarray | None = None,
                      dense: bool = False) -> Program:
        """The program of one frame (int8 codes of the model input). ``tile_mask``: the frame
        patches to take as changed (a host gate; all of them on the first frame) instead of
        the PATCH comparator; ``dense``: the dense baseline (no PATCH, DILATE or gates; the
        frame LOADed straight into the reference)."""
        plan, cfg = self.plan, self.plan.config
        t_new, t_ref = plan.tensors[plan.frame], plan.tensors[plan.ref]
        words = tile_frame(t_new, codes, cfg.cols, cfg.patch_shape)
        prog = Program(cfg)
        if dense:
            prog.load(Buffer.OUT, t_ref.base, words)
        else:
            prog.load(Buffer.OUT, t_new.base, words)
            n = plan.frame_tiles
            if tile_mask is not None:
                bits = np.zeros(-(-n // MASK_WORD_BITS) * MASK_WORD_BITS, bool)
                bits[:n] = np.asarray(tile_mask, bool).ravel()
                prog.load(Buffer.MASK, 0, bits.reshape(-1, MASK_WORD_BITS))
            for b0 in range(0, n, _PATCH_BLOCKS):
                blocks = min(_PATCH_BLOCKS, n - b0)
                k = plan.tile_words
                prog.patch(t_new.base + b0 * k, t_ref.base + b0 * k, k, blocks,
                           self.threshold, mask_idx=b0, given=tile_mask is not None)
            self._observe(prog, 0, n)
        state = {"acc": 1, "inp": 1}
        for i, sl in enumerate(plan.layers):
            last = i == len(plan.layers) - 1
            if not dense and not sl.shares_mask:
                prog.dilate(**sl.dilate)
            if not dense:
                self._observe(prog, sl.mask, sl.grid[0] * sl.grid[1], needed=last)
            _layer_program(prog, plan, sl, not dense, state)
        if dense:
            t_out = plan.tensors[plan.output]
            prog.store(Buffer.OUT, t_out.base, t_out.words)
        return prog.sync(counters=True, clear=True)

    def readback_program(self, patches: np.ndarray) -> Program:
        """The second program of a PASS frame: STORE the output patches that were recomputed
        (``patches``: bool per output patch), one STORE per run of consecutive ones; the host
        keeps the others from the frames before."""
        plan, cfg = self.plan, self.plan.config
        t = plan.tensors[plan.output]
        per_patch = cfg.rows * t.pitch
        prog = Program(cfg)
        bits = np.concatenate([[False], np.asarray(patches, bool).ravel(), [False]])
        edges = np.flatnonzero(np.diff(bits.astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            prog.store(Buffer.OUT, int(t.base + start * per_patch), int((stop - start) * per_patch))
        return prog.sync(counters=True, clear=True)

    def _observe(self, prog: Program, first: int, n: int, needed: bool = False) -> None:
        """STORE the MASK words of bits ``first .. first + n - 1`` (what a layer recomputes):
        for the figures (their bytes counted apart in :class:`FrameStats`), and for the last
        layer always (``needed``: the host reads back the output patches it marks)."""
        if self.observe or needed:
            w0, w1 = first // MASK_WORD_BITS, -(-(first + n) // MASK_WORD_BITS)
            prog.store(Buffer.MASK, w0, w1 - w0)

    # -- running
    def quantize(self, frame) -> np.ndarray:
        """Float frame ``(H, W)`` or ``(C, H, W)`` -> int8 codes ``(C, H, W)``."""
        x = np.asarray(frame)
        c, h, w = self.qmodel.input_shape
        if x.ndim == 2 and c == 1:
            x = x[None]
        if x.shape != (c, h, w):
            raise ShapeError(f"frame of shape {np.asarray(frame).shape}; the model takes "
                             f"({c}, {h}, {w}) (or ({h}, {w}) for one channel)")
        if not np.issubdtype(x.dtype, np.floating):
            raise DTypeError(f"frame dtype {x.dtype}: give float values in the model's input "
                             f"range (or int8 codes to step_int)")
        return self.qmodel.input_q.quantize(x.astype(np.float32)[None])[0]

    def step(self, frame) -> np.ndarray:
        """One float frame -> the model's float output ``(C, H, W)``."""
        out = self.step_int(self.quantize(frame))
        return self.qmodel.output_q.dequantize(out)

    def step_int(self, codes: np.ndarray, dense: bool = False) -> np.ndarray:
        """One frame of int8 codes ``(C, H, W)`` -> int8 output codes; :attr:`history` gets its
        :class:`FrameStats`. ``dense``: run the dense baseline instead (it leaves a valid PASS
        state: the reference is this frame)."""
        codes = np.asarray(codes)
        if codes.dtype != np.int8:
            raise DTypeError(f"frame codes dtype {codes.dtype}, expected int8")
        if codes.shape != tuple(self.qmodel.input_shape):
            raise ShapeError(f"frame of shape {codes.shape}; the model takes "
                             f"{tuple(self.qmodel.input_shape)}")
        if not self._ready:
            self.setup()
        plan, cfg = self.plan, self.plan.config
        n = plan.frame_tiles
        tile_mask = None
        if not dense:
            if self.frames == 0:
                tile_mask = np.ones(n, bool)  # the first frame: everything is new
            elif self.gate == "host":
                tile_mask = np.asarray(self.host_gate(codes, self._ref_codes), bool)
                if tile_mask.shape != (n,):
                    raise ShapeError(f"host_gate returned shape {tile_mask.shape}, expected "
                                     f"({n},): one bit per frame patch")
        prog = self.frame_program(codes, tile_mask, dense)
        before = self.link.link_bytes
        responses = self.device.run(prog)
        counters = dict(responses[-1].counters)
        t_out = plan.tensors[plan.output]
        observed, observe_bytes = [], 0
        for instr, resp in zip(prog.instructions, responses, strict=True):
            if instr.opcode == Opcode.STORE and instr.fields["buf"] == Buffer.MASK:
                f = instr.fields
                observed.append(np.asarray(resp).ravel())
                observe_bytes += 16 + f["count"] * cfg.word_bytes(Buffer.MASK)
        last = plan.layers[-1]
        if dense:
            self._out_words = np.asarray(responses[-2]).copy()
        else:
            # the output patches recomputed come back; the host keeps the rest
            observe_bytes -= 16 + len(observed[-1]) // MASK_WORD_BITS * cfg.word_bytes(Buffer.MASK)
            live = observed[-1][last.mask % MASK_WORD_BITS:][:last.grid[0] * last.grid[1]]
            back = self.readback_program(live)
            got = self.device.run(back)
            for key in (Counter.CYCLES, Counter.MACS_ISSUED, Counter.MACS_SKIPPED):
                counters[key] += got[-1].counters[key]
            if self._out_words is None:
                self._out_words = np.zeros((t_out.words, cfg.cols), np.int8)
            for instr, words in zip(back.instructions, got, strict=True):
                if instr.opcode == Opcode.STORE:
                    at = instr.fields["addr"] - t_out.base
                    self._out_words[at:at + instr.fields["count"]] = words
        out_words = self._out_words
        sizes = [sl.grid[0] * sl.grid[1] for sl in plan.layers]
        masks, tiles = [], None
        if dense or not self.observe:
            computed = sizes if dense else [-1] * len(sizes)
            changed = n if dense else -1
        else:
            tiles = observed[0][:n].reshape(plan.frame_grid)
            changed = int(tiles.sum())
            masks = [bits[sl.mask % MASK_WORD_BITS:][:size].reshape(sl.grid)
                     for sl, bits, size in zip(plan.layers, observed[1:], sizes, strict=True)]
            computed = [int(b.sum()) for b in masks]
        # (a dense frame leaves a valid PASS state too: the reference is the frame, every
        # output computed from it)
        self.frames += 1
        if self.gate == "host":
            self._track_reference(codes, np.ones(n, bool) if dense else tile_mask)
        self.history.append(FrameStats(
            cycles=int(counters[Counter.CYCLES]), macs_issued=int(counters[Counter.MACS_ISSUED]),
            macs_skipped=int(counters[Counter.MACS_SKIPPED]),
            link_bytes=self.link.link_bytes - before - observe_bytes, changed_tiles=changed,
            computed=computed, patches=sizes, masks=masks, tile_mask=tiles))
        return _untile_tensor(t_out, out_words, cfg.cols, cfg.patch_shape)

    def _track_reference(self, codes: np.ndarray, changed: np.ndarray) -> None:
        """The host's copy of the reference frame (for a host gate): changed patches move."""
        ph, pw = self.plan.config.patch_shape
        if self._ref_codes is None:
            self._ref_codes = np.zeros_like(codes)
        gh, gw = self.plan.frame_grid
        sel = np.repeat(np.repeat(np.asarray(changed, bool).reshape(gh, gw), ph, 0), pw, 1)
        self._ref_codes[:, sel] = codes[:, sel]

    @property
    def reference_codes(self) -> np.ndarray:
        """The reference frame as the device holds it (read back: costs a STORE)."""
        t = self.plan.tensors[self.plan.ref]
        words = self.device.run(Program(self.plan.config).store(Buffer.OUT, t.base, t.words))
        return _untile_tensor(t, words[0], self.plan.config.cols, self.plan.config.patch_shape)

