"""The resident planner: where a quantized model lives on a configuration and the instructions
of each layer (:func:`plan_resident`; the runtime is :mod:`tinyaccel.sw.resident`, the method
``docs/resident.md``).

* the activation arena in OUT: first fit over tensor lifetimes (a residual branch keeps its input
  until the add), and when that does not fit, in place for layers whose input dies with them
  (the output starts ``gap`` words below the input, ``gap`` the least that the layer's own access
  trace proves safe);
* weights (WGT) and requant parameters (PARAM) resident -- loaded once by the setup program --
  while they fit; the rest is streamed: LOADed inside the inference program into a streaming
  region, one output-channel block of a layer at a time;
* per layer the instructions: tiles of whole output rows (``m_blocks`` that fit half of INP and
  half of ACC, so the IM2COL of the next tile overlaps the GEMM of this one), per column block a
  GEMM (``n_blocks = 1``) per K part, then REQUANT with ``out_gap = pitch - 1``.

Every layer computes exactly the integers of :mod:`tinyaccel.sw.lowering` (the oracle): conv2d
and avgpool as there (block-diagonal weights for groups), linear as a conv whose kernel covers its
whole input (flatten is a view: the weight rows are permuted from torch's NCHW flatten order to the
``(ky, kx, c)`` tap order), add as two GEMMs into one accumulator with diagonal weights, maxpool
as an IM2COL with ``pool`` (the window's max per channel), a unit-weight GEMM and an identity
REQUANT. A layer the instruction fields cannot hold makes the planner refuse the model
(:class:`~tinyaccel.errors.UnsupportedLayerError`, naming the layer) and the caller falls back to
the per-layer path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from amaranth.lib import data

from ..errors import CapacityError, UnsupportedLayerError
from ..hw.config import AccelConfig
from ..hw.isa import Buffer, Im2colOperands, RequantOperands
from ..protocol import Program, channel_params_words
from .quant_ir import INPUT, LayerKind, QuantLayer, QuantModel

__all__ = ["TensorPlacement", "ResidentPlan", "plan_resident", "resident_reason",
           "im2col_cycles"]

_IM2COL_MAX = {name: (1 << f.shape.width) - 1 for name, f in data.Layout.cast(Im2colOperands)}
_GAP_MAX = (1 << data.Layout.cast(RequantOperands)["out_gap"].shape.width) - 1


@dataclass
class TensorPlacement:
    """One activation tensor in OUT: ``h x w`` pixels of ``c`` channels, channels last,
    ``pitch`` words per pixel (or ``2**pack`` pixels per word), live from step ``start`` (the
    producing layer's index, -1 for the input) to ``end`` (its last reader; the output: the end)."""
    name: str
    h: int
    w: int
    c: int
    pitch: int
    pack: int
    start: int
    end: int
    base: int = -1

    @property
    def words(self) -> int:
        return -(-self.h * self.w >> self.pack) * self.pitch

    @property
    def span(self) -> int:
        """Words reserved: an IM2COL of channel word ``j`` checks ``src + j + words``."""
        return self.words + self.pitch - 1


@dataclass
class _Part:
    """One GEMM of a column block: IM2COL of ``channels`` channels from channel word ``word`` of
    ``tensor`` with ``fields``, times ``b`` (``K x cols``)."""
    tensor: str
    word: int
    channels: int
    fields: dict
    b: np.ndarray

    @property
    def k(self) -> int:
        return len(self.b)


@dataclass
class _LayerPlan:
    layer: QuantLayer
    index: int
    out: str
    out_h: int
    out_w: int
    blocks: list  # per column block j: list of _Part
    params: np.ndarray  # PARAM words, one per column block
    tile_rows: int = 0
    mb_max: int = 0
    wgt_resident: bool = True
    param_resident: bool = True
    part_addr: list = field(default_factory=list)  # per j, per part: resident WGT address
    wgt_base: int = 0
    param_addr: list = field(default_factory=list)
    ops: list = field(default_factory=list)  # symbolic instruction list (see _emit_layer)

    @property
    def chunk_words(self) -> list[int]:
        return [sum(p.k for p in parts) for parts in self.blocks]

    def unique_parts(self) -> dict[bytes, np.ndarray]:
        """The layer's distinct part weights (avgpool's unit weights repeat in every block)."""
        return {p.b.tobytes(): p.b for parts in self.blocks for p in parts}

    @property
    def resident_words(self) -> int:
        return sum(len(b) for b in self.unique_parts().values())

    @property
    def streamed(self) -> bool:
        return not (self.wgt_resident and self.param_resident)


@dataclass
class ResidentPlan:
    """Where a model lives on a configuration and the instructions that run it."""
    config: AccelConfig
    tensors: dict[str, TensorPlacement]  # by name; flatten views are absent (see ``views``)
    views: dict[str, str]  # layer name -> tensor name it reads/produces
    layers: list[_LayerPlan]
    input_tensor: str
    output_tensor: str
    output_shape: tuple[int, ...]
    in_place: bool = False
    #: output tensor -> (input tensor, gap): placed ``gap`` words below its dying input
    in_place_pairs: dict = field(default_factory=dict)
    wgt_stream_base: int = 0
    wgt_stream_slots: int = 0
    wgt_stream_words: int = 0
    param_stream_base: int = 0
    setup: Program | None = None
    program_template: list = field(default_factory=list)

    @property
    def out_words(self) -> int:
        """OUT words the arena uses (high-water mark)."""
        return max(t.base + t.span for t in self.tensors.values())

    @property
    def wgt_words(self) -> int:
        resident = sum(lp.resident_words for lp in self.layers if lp.wgt_resident)
        return resident + self.wgt_stream_slots * self.wgt_stream_words

    @property
    def param_words(self) -> int:
        resident = sum(len(lp.params) for lp in self.layers if lp.param_resident)
        return resident + 2 * any(not lp.param_resident for lp in self.layers)

    @property
    def resident_weight_bytes(self) -> int:
        wb = self.config.word_bytes(Buffer.WGT)
        return sum(lp.resident_words * wb for lp in self.layers if lp.wgt_resident)

    @property
    def streamed_weight_bytes(self) -> int:
        """WGT and PARAM bytes LOADed by every inference."""
        wb, pb = self.config.word_bytes(Buffer.WGT), self.config.word_bytes(Buffer.PARAM)
        return sum((0 if lp.wgt_resident else sum(lp.chunk_words) * wb)
                   + (0 if lp.param_resident else len(lp.params) * pb) for lp in self.layers)

    @property
    def gemm_cycles_estimate(self) -> int:
        """Cycles the array is busy: ``m_blocks * k`` per GEMM (a lower bound on latency)."""
        return sum(op[5] * op[4] for lp in self.layers for op in lp.ops if op[0] == "gemm")

    def estimate_cycles(self) -> dict[str, int]:
        """Busy cycles of one inference per unit, and two bounds on its latency.

        A model with assumptions, not a measurement (the RTL's counters are): the host stream
        carries a beat per cycle (every instruction word, the input, the streamed WGT/PARAM
        words, the result); IM2COL as :func:`im2col_cycles`; a GEMM takes ``k`` cycles per
        block (plus ``drain_group``'s idle cycles between blocks without the shadow bank);
        REQUANT ``cols / requant_lanes`` cycles per row (:data:`RequantSerial.INTERVAL` each with
        ``serial_requant``). ``overlapped``: the busiest unit (a full build overlaps the units);
        ``serial``: their sum (the exclusive profile runs one instruction at a time).
        """
        from ..hw.gemm_unit import drain_group
        from ..hw.isa import INSTR_BYTES
        from ..hw.requant import RequantSerial
        cfg, impl = self.config, self.config.impl
        beat = cfg.beat_bytes
        gap = 0 if impl.shadow else (cfg.rows * cfg.cols // drain_group(
            cfg, shadow=impl.shadow, exclusive=impl.exclusive))
        per_row = cfg.cols // cfg.requant_lanes * (RequantSerial.INTERVAL if impl.serial_requant
                                                   else 1)
        wb, pb, ob = (cfg.word_bytes(b) for b in (Buffer.WGT, Buffer.PARAM, Buffer.OUT))
        busy = {"stream": 0, "im2col": 0, "gemm": 0, "requant": 0}
        n_instr = 3  # LOAD input, STORE result, SYNC
        for lp in self.layers:
            for op in lp.ops:
                n_instr += 1
                if op[0] == "im2col":
                    busy["im2col"] += im2col_cycles(cfg, op[3], op[6])
                elif op[0] == "gemm":
                    busy["gemm"] += op[5] * op[4] + (op[5] - 1) * gap
                elif op[0] == "requant":
                    busy["requant"] += op[6] * per_row
                elif op[0] == "load_wgt":
                    busy["stream"] += lp.chunk_words[op[1]] * wb // beat
                else:
                    busy["stream"] += pb // beat
        t_in, t_out = self.tensors[self.input_tensor], self.tensors[self.output_tensor]
        busy["stream"] += (n_instr * INSTR_BYTES + (t_in.words + t_out.words) * ob) // beat
        return {**busy, "overlapped": max(busy.values()), "serial": sum(busy.values())}

    def summary(self) -> str:
        c = self.config
        return (f"resident plan on {c.name}: OUT {self.out_words}/{c.depth(Buffer.OUT)} words"
                f"{' (in place)' if self.in_place else ''}, WGT {self.wgt_words}/"
                f"{c.depth(Buffer.WGT)} words ({self.resident_weight_bytes} B resident, "
                f"{self.streamed_weight_bytes} B streamed per inference), PARAM "
                f"{self.param_words}/{c.depth(Buffer.PARAM)} words")


def im2col_cycles(config: AccelConfig, fields: dict, m_blocks: int) -> int:
    """Busy cycles of one IM2COL, as docs/architecture.md section 11.8 measures the designs:
    the tiled one reads ``rows`` pixels of a tap per tile and drains a tile's channels one INP
    word a cycle (with ``pool`` it reads all ``kh*kw`` taps into one tile), so a tile costs the
    larger of the two; the serial one takes ``Im2colSerial.VALUE_CYCLES`` a value (padding is
    cheaper, counted as inside: an upper bound)."""
    from ..hw.im2col import Im2colSerial
    f, rows, cols = fields, config.rows, config.cols
    taps, c = f["kh"] * f["kw"], f["channels"]
    if config.impl.serial_im2col:
        return m_blocks * rows * taps * c * Im2colSerial.VALUE_CYCLES
    groups = [c] if f["pack"] else [min(cols, c - g) for g in range(0, c, cols)]
    if f.get("pool"):
        return m_blocks * sum(max(taps * rows, n) for n in groups)
    return m_blocks * taps * sum(max(rows, n) for n in groups)


# -- planning ----------------------------------------------------------------------------------

def _refuse(layer: QuantLayer, why: str):
    raise UnsupportedLayerError(f"layer {layer.name!r} ({layer.kind.value}) cannot run resident: "
                                f"{why}")


def _check_field(layer: QuantLayer, name: str, value: int) -> None:
    if not 0 <= value <= _IM2COL_MAX[name]:
        _refuse(layer, f"IM2COL.{name}={value} exceeds its field (max {_IM2COL_MAX[name]})")


def _conv_parts(layer: QuantLayer, x: TensorPlacement, w4: np.ndarray, groups: int,
                kernel, stride, dilation, pads, pad_value: int, cols: int, rows: int,
                k_max: int, out_hw: tuple[int, int]):
    """Per column block: the K parts (channel-word ranges) of a convolution with weight ``w4``
    ``(N, C/groups, kh, kw)`` over tensor ``x``."""
    # A stride along an axis with one output position is never applied (IM2COL has one stride
    # field, 3 bits: global pooling 8x8 stride 8 is a 1x1 output)
    stride = tuple(s if n > 1 else 0 for s, n in zip(stride, out_hw, strict=True))
    stride = (max(stride[0], stride[1], 1),) * 2 if 0 in stride else stride
    n_out, cg = w4.shape[0], w4.shape[1]
    og = n_out // groups
    kh, kw = kernel
    top, _, left, _ = pads
    base_fields = dict(pitch=x.pitch, in_h=x.h, in_w=x.w, kh=kh, kw=kw, stride=stride[0],
                       dilation=dilation[0], pad_top=top, pad_left=left, pad_value=pad_value,
                       pack=x.pack)
    if stride[0] != stride[1] or dilation[0] != dilation[1]:
        _refuse(layer, f"stride {stride} / dilation {dilation} differ between axes (IM2COL has "
                       f"one of each)")
    for name in ("pitch", "in_h", "in_w", "kh", "kw", "stride", "dilation", "pad_top",
                 "pad_left"):
        _check_field(layer, name, base_fields[name])
    taps = kh * kw
    word_k = taps * (x.c if x.pack else min(x.c, cols))
    row_blocks = math.ceil(out_hw[1] / rows)  # a tile is whole output rows (IM2COL.oy0)
    if row_blocks * word_k > k_max:
        _refuse(layer, f"one output row ({row_blocks} m-blocks) of one channel word of its window "
                       f"(K={word_k}) needs {row_blocks * word_k} INP words, half of INP has "
                       f"{k_max}")
    blocks = []
    for j in range(math.ceil(n_out / cols)):
        o0, o1 = j * cols, min((j + 1) * cols, n_out)
        c0, c1 = (o0 // og) * cg, ((o1 - 1) // og + 1) * cg  # input channels the block reads
        w0, w1 = (0, 1) if x.pack else (c0 // cols, math.ceil(c1 / cols))
        per_part = max(1, min(k_max // (row_blocks * taps * cols), _IM2COL_MAX["channels"] // cols,
                              w1 - w0))
        parts = []
        for a in range(w0, w1, per_part):
            lo = a * cols
            chans = (x.c if x.pack else min(x.c, min(a + per_part, w1) * cols) - lo)
            # b[(ky, kx, c), o - o0] = weight of channel lo + c in output o's group, else 0
            b = np.zeros((kh, kw, chans, cols), np.int8)
            for o in range(o0, o1):
                g = o // og
                cs = np.arange(max(lo, g * cg), min(lo + chans, (g + 1) * cg))
                if len(cs):
                    b[:, :, cs - lo, o - o0] = w4[o, cs - g * cg].transpose(1, 2, 0)
            parts.append(_Part(x.name, a, chans, dict(base_fields, channels=chans),
                               b.reshape(-1, cols)))
        blocks.append(parts)
    return blocks


#: REQUANT that passes a unit-weight GEMM's INT8 codes through: (2v * 2^30) / 2^31 = v
_IDENTITY = dict(bias=0, multiplier=1 << 30, shift=1, zero_point=0, clamp_min=-128,
                 clamp_max=127)


def _pool_parts(layer: QuantLayer, x: TensorPlacement, cols: int, rows: int, k_max: int,
                out_hw: tuple[int, int]):
    """Max pooling: per column block (``cols`` channels) one IM2COL with ``pool`` (the max of
    each window, padding -128 never wins) and unit weights; the REQUANT is :data:`_IDENTITY`."""
    (kh, kw), stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    top, _, left, _ = layer.pads
    stride = tuple(s if n > 1 else 0 for s, n in zip(stride, out_hw, strict=True))
    stride = (max(stride[0], stride[1], 1),) * 2 if 0 in stride else stride
    if stride[0] != stride[1] or dilation[0] != dilation[1]:
        _refuse(layer, f"stride {stride} / dilation {dilation} differ between axes (IM2COL has "
                       f"one of each)")
    fields = dict(pitch=x.pitch, in_h=x.h, in_w=x.w, kh=kh, kw=kw, stride=stride[0],
                  dilation=dilation[0], pad_top=top, pad_left=left, pad_value=-128,
                  pack=x.pack, pool=1)
    for name in ("pitch", "in_h", "in_w", "kh", "kw", "stride", "dilation", "pad_top",
                 "pad_left"):
        _check_field(layer, name, fields[name])
    words = 1 if x.pack else x.pitch
    blocks = []
    for j in range(words):
        chans = x.c if x.pack else min(cols, x.c - j * cols)
        if math.ceil(out_hw[1] / rows) * chans > k_max:
            _refuse(layer, f"one output row of {chans} channels needs more than {k_max} INP "
                           f"words (half of INP)")
        b = np.zeros((chans, cols), np.int8)
        b[np.arange(chans), np.arange(chans) % cols] = 1  # channel c -> output lane c
        blocks.append([_Part(x.name, j, chans, dict(fields, channels=chans), b)])
    return blocks


def _add_parts(layer: QuantLayer, a: TensorPlacement, b: TensorPlacement, cols: int):
    blocks = []
    for j in range(a.pitch):
        chans = min(cols, a.c - j * cols)
        parts = []
        for t, side in ((a, 0), (b, 1)):
            diag = np.zeros((chans, cols), np.int8)
            diag[np.arange(chans), np.arange(chans)] = layer.weight[j * cols:j * cols + chans,
                                                                    side]
            fields = dict(pitch=t.pitch, in_h=t.h, in_w=t.w, kh=1, kw=1, stride=1, dilation=1,
                          pad_top=0, pad_left=0, pad_value=0, pack=t.pack, channels=chans)
            parts.append(_Part(t.name, j, chans, fields, diag))
        blocks.append(parts)
    return blocks


def _pack_for(c: int, cols: int) -> int:
    """Pixels per word exponent for a network input of ``c`` channels (0: one pixel a word)."""
    pack = 0
    while pack < _IM2COL_MAX["pack"] and c <= cols >> (pack + 1):
        pack += 1
    return pack


def _tensor(name: str, shape: tuple[int, ...], cols: int, start: int, pack: int = 0):
    c, h, w = (shape[0], 1, 1) if len(shape) == 1 else shape
    return TensorPlacement(name, h, w, c, 1 if pack else math.ceil(c / cols), pack, start, start)


def _layer_plans(qmodel: QuantModel, config: AccelConfig):
    cols, rows = config.cols, config.rows
    k_max = config.depth(Buffer.INP) // 2
    acc_half = config.depth(Buffer.ACC) // 2
    shape = qmodel.input_shape
    pack = _pack_for(shape[0], cols) if len(shape) == 3 else 0
    tensors = {INPUT: _tensor(INPUT, shape, cols, -1, pack)}
    views, flat_from = {INPUT: INPUT}, {}
    plans = []
    for index, layer in enumerate(qmodel.layers):
        ins = [tensors[views[i]] for i in layer.inputs]
        for t in ins:
            t.end = index
        if layer.kind == LayerKind.FLATTEN:
            views[layer.name] = views[layer.inputs[0]]
            flat_from[layer.name] = layer.input_shapes[0]
            continue
        x = ins[0]
        if x.pitch > _GAP_MAX + 1:
            _refuse(layer, f"its input pitch {x.pitch} words exceeds REQUANT.out_gap")
        out_shape = layer.output_shape
        if layer.kind == LayerKind.LINEAR:
            n = layer.weight.shape[0]
            src = flat_from.get(layer.inputs[0])
            w4 = (layer.weight.reshape(n, *src) if src is not None and len(src) == 3
                  else layer.weight.reshape(n, -1, 1, 1))
            blocks = _conv_parts(layer, x, w4, 1, (x.h, x.w), (1, 1), (1, 1), (0, 0, 0, 0),
                                 0, cols, rows, k_max, (1, 1))
            out_h = out_w = 1
        elif layer.kind == LayerKind.ADD:
            blocks = _add_parts(layer, ins[0], ins[1], cols)
            out_h, out_w = out_shape[1:]
        elif layer.kind == LayerKind.MAXPOOL:
            blocks = _pool_parts(layer, x, cols, rows, k_max, tuple(out_shape[1:]))
            out_h, out_w = out_shape[1:]
        else:  # conv2d, avgpool
            _check_field(layer, "pad_value", layer.pad_value & 0xFF)
            blocks = _conv_parts(layer, x, layer.weight, layer.groups, layer.kernel_size,
                                 layer.stride, layer.dilation, layer.pads, layer.pad_value,
                                 cols, rows, k_max, tuple(out_shape[1:]))
            out_h, out_w = out_shape[1:]
        _check_field(layer, "out_w", out_w)
        tensors[layer.name] = _tensor(layer.name, out_shape, cols, index)
        views[layer.name] = layer.name
        if tensors[layer.name].pitch > _GAP_MAX + 1:
            _refuse(layer, f"its output pitch {tensors[layer.name].pitch} exceeds REQUANT.out_gap")
        if layer.kind == LayerKind.MAXPOOL:
            n, requant = out_shape[0], _IDENTITY
        else:
            n, requant = layer.requant.bias.shape[0], {
                f: getattr(layer.requant, f) for f in layer.requant.FIELDS}
        params = channel_params_words(requant, n, len(blocks) * cols, cols)
        lp = _LayerPlan(layer, index, layer.name, out_h, out_w, blocks, params)
        k_part = max(p.k for parts in blocks for p in parts)
        lp.mb_max = min(_IM2COL_MAX["m_blocks"], k_max // k_part, acc_half // rows)
        lp.tile_rows = max((t for t in range(1, out_h + 1)
                            if math.ceil(t * out_w / rows) <= lp.mb_max), default=0)
        if lp.tile_rows == 0:
            _refuse(layer, f"one output row of {out_w} pixels needs more than {lp.mb_max} "
                           f"m-blocks (half of INP/ACC)")
        if out_h - 1 > _IM2COL_MAX["oy0"]:
            _refuse(layer, f"{out_h} output rows exceed IM2COL.oy0")
        plans.append(lp)
    out_name = views[qmodel.output]
    tensors[out_name].end = len(qmodel.layers)
    return tensors, views, plans


def _fill(items: list[tuple[object, int]], budget: int) -> set:
    """First fit, largest first: the items (key, size) kept within ``budget``."""
    kept, used = set(), 0
    for key, size in sorted(items, key=lambda item: -item[1]):
        if used + size <= budget:
            kept.add(key)
            used += size
    return kept


def _residency(plan: ResidentPlan) -> None:
    """Weights and PARAM words: resident while they fit, else streamed (see module docstring)."""
    cfg, layers = plan.config, plan.layers
    wgt_depth, param_depth = cfg.depth(Buffer.WGT), cfg.depth(Buffer.PARAM)
    sizes = [(lp.index, lp.resident_words) for lp in layers]
    if sum(s for _, s in sizes) <= wgt_depth:
        resident = {i for i, _ in sizes}
    else:
        chunk = max(max(lp.chunk_words) for lp in layers)
        if chunk > wgt_depth:
            raise CapacityError(f"WGT: one column block's weights need {chunk} words "
                                f"({chunk * cfg.word_bytes(Buffer.WGT)} bytes), WGT has "
                                f"{wgt_depth}")
        slots = 2 if 2 * chunk <= wgt_depth else 1
        resident = _fill(sizes, wgt_depth - slots * chunk)
        # a smaller largest streamed chunk frees room for more resident layers
        chunk = max(max(lp.chunk_words) for lp in layers if lp.index not in resident)
        used = sum(s for i, s in sizes if i in resident)
        resident |= _fill([(i, s) for i, s in sizes if i not in resident],
                          wgt_depth - used - slots * chunk)
        plan.wgt_stream_words = max(max(lp.chunk_words) for lp in layers
                                    if lp.index not in resident)
        plan.wgt_stream_slots = slots
    addr = 0
    for lp in layers:
        lp.wgt_resident = lp.index in resident
        if lp.wgt_resident:
            lp.wgt_base, where = addr, {}
            for key, b in lp.unique_parts().items():
                where[key] = addr
                addr += len(b)
            lp.part_addr = [[where[p.b.tobytes()] for p in parts] for parts in lp.blocks]
    plan.wgt_stream_base = addr
    psizes = [(lp.index, len(lp.params)) for lp in layers]
    president = ({i for i, _ in psizes} if sum(s for _, s in psizes) <= param_depth
                 else _fill(psizes, param_depth - 2))  # two streaming slots
    addr = 0
    for lp in layers:
        lp.param_resident = lp.index in president
        lp.param_addr = list(range(addr, addr + len(lp.params))) if lp.param_resident else []
        addr += len(lp.params) if lp.param_resident else 0
    plan.param_stream_base = addr


def _emit_layer(plan: ResidentPlan, lp: _LayerPlan, state: dict) -> None:
    """The layer's symbolic instructions into ``lp.ops``.

    ``("im2col", tensor, word, fields, half, oy0, m_blocks)``, ``("gemm", half, wgt, acc_half,
    k, m_blocks, accumulate)`` (``wgt``: ``("res", addr)`` or ``("stream", slot, offset)``),
    ``("requant", acc_half, out, first_pixel, j, param, count)``, ``("load_wgt", j, slot)``,
    ``("load_param", j, slot)``.
    """
    cfg = plan.config
    rows = cfg.rows
    tiles = [(oy0, min(lp.tile_rows, lp.out_h - oy0)) for oy0 in range(0, lp.out_h, lp.tile_rows)]
    js = range(len(lp.blocks))
    steps = ([(t, j) for j in js for t in range(len(tiles))] if lp.streamed
             else [(t, j) for t in range(len(tiles)) for j in js])
    ops, pending = lp.ops, None
    chunk_slot = None
    for t, j in steps:
        oy0, n_rows = tiles[t]
        pixels = n_rows * lp.out_w
        mb = math.ceil(pixels / rows)
        if not lp.wgt_resident and state.get("wchunk") != (lp.index, j):
            # streamed weights: this block's chunk into the next streaming slot (j-outer order)
            chunk_slot = state["wslot"] = ((1 - state.get("wslot", 1))
                                           if plan.wgt_stream_slots == 2 else 0)
            if plan.wgt_stream_slots == 1 and pending is not None:
                ops.append(pending)
                pending = None
            ops.append(("load_wgt", j, chunk_slot))
            state["wchunk"] = (lp.index, j)
        if not lp.param_resident and state.get("pword") != (lp.index, j):
            # the next streaming PARAM slot: the pending REQUANT reads the other one
            pslot = state["pslot"] = 1 - state.get("pslot", 1)
            ops.append(("load_param", j, pslot))
            state["pword"] = (lp.index, j)
        acc = state["acc"] = 1 - state.get("acc", 1)
        offset = 0
        for n, part in enumerate(lp.blocks[j]):
            # an IM2COL's words depend only on these: blocks reading the same words share it
            key = (lp.index, t, part.tensor, part.word, part.channels)
            content = state["inp"]
            if key in content:
                half = content.index(key)
            else:
                half = 1 - state["last_inp"]
                content[half] = key
                rows_off, fields, oy0_w = _row_window(part.fields, plan.tensors[part.tensor],
                                                      oy0, n_rows)
                ops.append(("im2col", part.tensor, part.word + rows_off, fields, half, oy0_w,
                            mb))
            state["last_inp"] = half
            wgt = (("res", lp.part_addr[j][n]) if lp.wgt_resident
                   else ("stream", chunk_slot, offset))
            ops.append(("gemm", half, wgt, acc, part.k, mb, n > 0))
            offset += part.k
            if n == 0 and pending is not None:
                ops.append(pending)
                pending = None
        param = (lp.param_addr[j] if lp.param_resident
                 else plan.param_stream_base + state["pslot"])
        pending = ("requant", acc, lp.out, oy0 * lp.out_w, j, param, pixels)
    ops.append(pending)


def _row_window(fields: dict, x: TensorPlacement, oy0: int, n_rows: int):
    """An IM2COL of output rows ``oy0 .. oy0 + n_rows - 1`` restricted to the input rows they
    read: ``(words, fields, oy0)`` with ``src`` moved ``words`` on to the first such row (the
    first row whose first pixel starts a word, when pixels are packed), ``in_h`` cut to the rows
    read and ``pad_top``/``oy0`` shifted to match. The INP words are the same except for the
    spill pixels of a partial last m-block, which no REQUANT reads (they now see padding); the
    access range the hazard tracking compares shrinks to the rows read, so a layer's first
    tiles can start while the previous layer still writes its last rows."""
    f = fields
    lo = oy0 * f["stride"] - f["pad_top"]  # input row of output row oy0 at tap ky = 0
    hi = (oy0 + n_rows - 1) * f["stride"] - f["pad_top"] + (f["kh"] - 1) * f["dilation"]
    r0, r1 = max(lo, 0), min(hi, x.h - 1)
    r0 -= r0 % ((1 << x.pack) // math.gcd(x.w, 1 << x.pack))
    if r1 < r0:  # the tile reads padding only: keep the whole tensor
        return 0, f, oy0
    d = lo - r0  # window row of output row oy0 at tap 0: oy0'*stride - pad_top'
    oy0_w = -(-d // f["stride"]) if d > 0 else 0
    return ((r0 * x.w) >> x.pack) * x.pitch, dict(f, in_h=r1 - r0 + 1,
                                                  pad_top=oy0_w * f["stride"] - d), oy0_w


# -- in-place check ----------------------------------------------------------------------------

def _read_words(fields: dict, word: int, oy0: int, mb: int, rows: int, cols: int) -> np.ndarray:
    """OUT words (relative to the tensor base) one IM2COL reads."""
    f = fields
    ky, kx, c = (g.ravel() for g in np.meshgrid(np.arange(f["kh"]), np.arange(f["kw"]),
                                                  np.arange(f["channels"]), indexing="ij"))
    oy, ox = np.divmod(oy0 * fields.get("out_w", 1) + np.arange(mb * rows), fields["out_w"])
    iy = oy[:, None] * f["stride"] - f["pad_top"] + ky[None, :] * f["dilation"]
    ix = ox[:, None] * f["stride"] - f["pad_left"] + kx[None, :] * f["dilation"]
    inside = (iy >= 0) & (iy < f["in_h"]) & (ix >= 0) & (ix < f["in_w"])
    q = (iy * f["in_w"] + ix)[inside]
    cc = np.broadcast_to(c[None, :], inside.shape)[inside]
    return np.unique(word + (q >> f["pack"]) * f["pitch"] + cc // cols)


def _in_place_gap(plan: ResidentPlan, lp: _LayerPlan, x: TensorPlacement) -> int | None:
    """The least ``gap`` such that the output may start ``gap`` words below input ``x`` (which
    dies with this layer): every input word's last reader is consumed by a GEMM before the first
    REQUANT that overwrites it. None when no overlap is safe."""
    cfg, out = plan.config, plan.tensors[lp.out]
    last = np.full(x.words, -1)
    first = np.full(out.words, len(lp.ops) + 1)
    pending: dict[int, np.ndarray] = {}  # INP half -> words its IM2COL read
    for i, op in enumerate(lp.ops):
        if op[0] == "im2col" and op[1] == x.name:
            fields = dict(op[3], out_w=lp.out_w)
            pending[op[4]] = _read_words(fields, op[2], op[5], op[6], cfg.rows, cfg.cols)
        elif op[0] == "gemm" and op[1] in pending:
            last[pending.pop(op[1])] = i  # consumed: its IM2COL has finished
        elif op[0] == "requant":
            words = op[3] * out.pitch + op[4] + np.arange(op[6]) * out.pitch
            first[words] = np.minimum(first[words], i)
    for gap in range(0, out.words + 1):
        xs = np.arange(max(gap, 0), min(out.words, x.words + gap))
        if np.all(first[xs] > last[xs - gap]):
            return gap
    return None


def _place(plan: ResidentPlan, in_place: bool) -> int | None:
    """First fit in creation order; returns the high-water mark, or None when OUT overflows."""
    depth = plan.config.depth(Buffer.OUT)
    order = sorted(plan.tensors.values(), key=lambda t: t.start)
    gaps = {}
    if in_place:
        for lp in plan.layers:
            for name in {p.tensor for parts in lp.blocks for p in parts}:
                x = plan.tensors[name]
                if x.end == lp.index and name != plan.output_tensor:
                    gap = _in_place_gap(plan, lp, x)
                    if gap is not None:
                        gaps[lp.out] = (name, gap)
                        break
    placed: list[TensorPlacement] = []
    plan.in_place_pairs = {}
    for t in order:
        t.base, ok_with = -1, None
        if in_place and t.name == plan.input_tensor:
            t.base = depth - t.span
        else:
            live = [p for p in placed if not (p.end < t.start or t.end < p.start)]
            ok_with = gaps.get(t.name)
            cands = sorted({0, *(p.base + p.span for p in live)}
                           | ({plan.tensors[ok_with[0]].base - ok_with[1]} if ok_with else set()))
            for base in cands:
                if base < 0 or base + t.span > depth:
                    continue
                if all(base + t.span <= p.base or p.base + p.span <= base
                       or (ok_with and p.name == ok_with[0]
                           and base == p.base - ok_with[1]) for p in live):
                    t.base = base
                    break
        if t.base < 0:
            return None
        if ok_with and t.base == plan.tensors[ok_with[0]].base - ok_with[1] and any(
                p.name == ok_with[0] and not (t.base + t.span <= p.base
                                              or p.base + p.span <= t.base) for p in placed):
            plan.in_place_pairs[t.name] = ok_with
        placed.append(t)
    return max(t.base + t.span for t in placed)


def plan_resident(qmodel: QuantModel, config: AccelConfig) -> ResidentPlan:
    """Place ``qmodel`` on ``config`` for the resident path.

    Raises
    ------
    UnsupportedLayerError
        A layer beyond an instruction field or half of INP; the message
        names the layer: the caller falls back to the per-layer path.
    CapacityError
        The model cannot be placed: the message names the buffer and the bytes short.
    """
    tensors, views, plans = _layer_plans(qmodel, config)
    depth, wb = config.depth(Buffer.OUT), config.word_bytes(Buffer.OUT)
    for t in tensors.values():
        if t.span > depth:
            raise CapacityError(f"OUT: tensor {t.name!r} ({t.h}x{t.w}x{t.c}, {t.span} words) "
                                f"needs {t.span * wb} bytes, OUT has {depth * wb}: "
                                f"{(t.span - depth) * wb} bytes short")
    out_t = tensors[views[qmodel.output]]
    out_shape = ((out_t.c, out_t.h, out_t.w) if len(qmodel.layer(qmodel.output).output_shape) == 3
                 else (out_t.c,))
    plan = ResidentPlan(config, tensors, views, plans, INPUT, out_t.name, out_shape)
    _residency(plan)
    state = {"inp": [None, None], "last_inp": 1}
    for lp in plans:
        _emit_layer(plan, lp, state)
    mark = _place(plan, in_place=False)
    if mark is None:
        plan.in_place = True
        if _place(plan, in_place=True) is None:
            need = sum(t.span for t in tensors.values())
            for t in tensors.values():
                t.base = 0
            # the peak of live words is a lower bound of what any placement needs
            peak = max(sum(t.span for t in tensors.values() if t.start <= s <= t.end)
                       for s in range(-1, len(qmodel.layers) + 1))
            raise CapacityError(f"OUT: the activations need {peak * wb} bytes live at once "
                                f"(first fit: more; {need * wb} bytes in all), OUT has "
                                f"{depth * wb}: {max(peak - depth, 0) * wb} bytes short or "
                                f"fragmented even in place")
    plan.setup = _setup_program(plan)
    return plan


def resident_reason(qmodel: QuantModel, config: AccelConfig) -> str | None:
    """Why ``qmodel`` cannot run resident on ``config`` (None: it can)."""
    try:
        plan_resident(qmodel, config)
    except (UnsupportedLayerError, CapacityError) as exc:
        return str(exc)
    return None


def _setup_program(plan: ResidentPlan) -> Program:
    prog = Program(plan.config)
    for lp in plan.layers:
        if lp.wgt_resident:
            prog.load(Buffer.WGT, lp.wgt_base, np.concatenate(list(lp.unique_parts().values())))
        if lp.param_resident:
            prog.load(Buffer.PARAM, lp.param_addr[0], lp.params)
    prog.sync(counters=True, clear=True)
    return prog
