"""Seeded random instruction streams and named corner-case programs for RTL verification.

Every generator takes a NumPy ``Generator`` (or a seed) and is deterministic for it;
:func:`seed_from_env` gives tests the run's seed, printed: fixed (:data:`DEFAULT_SEED`) unless
``TINYACCEL_SEED`` sets it (an integer to replay or vary a run, ``random`` for a fresh one).
The programs are plain :class:`~tinyaccel.protocol.Program` objects: run them on the golden
model and on the RTL and compare the response bytes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError, FieldError
from ..hw.config import AccelConfig, get_config
from ..hw.decode_rules import PASS_OPCODES, strided_span
from ..hw.isa import Buffer, Opcode, Status, operand_fields
from ..protocol import PARAM_DTYPE, Program, encode_fields, lane_dtype, lanes
from .numerics import INT32_MAX, INT32_MIN

__all__ = ["SEED_ENV", "DEFAULT_SEED", "parse_seed", "seed_from_env", "random_words",
           "random_channel_params", "random_program", "corner_programs", "Corner", "sgq_group",
           "UNDEFINED_OPCODES", "UNDEFINED_BUFFERS", "random_im2col", "broken_im2col",
           "implemented_opcodes"]


def _field(opcode: Opcode, name: str):
    return next(f for f in operand_fields(opcode) if f.name == name)


#: Opcode codes the 4-bit field can hold but the ISA does not define.
UNDEFINED_OPCODES = sorted(set(range(1 << Opcode.as_shape().width)) - {op.value for op in Opcode})
#: Buffer codes the ``buf`` field can hold but the ISA does not define.
UNDEFINED_BUFFERS = sorted(set(range(1 << _field(Opcode.LOAD, "buf").width))
                           - {b.value for b in Buffer})
_COUNT_MAX = _field(Opcode.LOAD, "count").mask
_ADDR_MAX = _field(Opcode.LOAD, "addr").mask
_BLOCKS_MAX = _field(Opcode.GEMM, "m_blocks").mask
_K_MAX = _field(Opcode.GEMM, "k").mask
_THRESHOLD_MAX = _field(Opcode.PATCH, "threshold").mask
_STRIPE_MAX = _field(Opcode.SGQ, "stripe_len").mask
_MAX_SHIFT_MAX = _field(Opcode.SGQ, "max_shift").mask
_GAP_MAX = _field(Opcode.REQUANT, "out_gap").mask
_KH_MAX = _field(Opcode.IM2COL, "kh").mask
_PAD_MAX = _field(Opcode.IM2COL, "pad_top").mask
_MASK_IDX_MAX = _field(Opcode.GEMM, "mask_idx").mask
_MASK_WORD_MAX = _field(Opcode.IM2COL, "mask_word").mask
_INT8 = np.iinfo(np.int8)


#: Environment variable that sets the seed of a test run: an integer (decimal or ``0x...``) to
#: replay or vary a run, ``random`` for a fresh seed (printed, so that the run replays).
SEED_ENV = "TINYACCEL_SEED"
#: The seed when ``TINYACCEL_SEED`` is unset or empty, so that ``make test`` on one commit
#: draws the same programs and data on every run.
DEFAULT_SEED = 1


def parse_seed(text: str | None) -> int:
    """The seed ``text`` names: an integer, ``random`` (a fresh 32-bit seed) or unset/empty
    (:data:`DEFAULT_SEED`).

    Raises
    ------
    ConfigError
        ``text`` is neither an integer nor ``random``.
    """
    text = (text or "").strip()
    if not text:
        return DEFAULT_SEED
    if text.lower() == "random":
        return secrets.randbits(32)
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{SEED_ENV}={text!r} is not a seed: give an integer (e.g. "
                          f"{SEED_ENV}=1234) or {SEED_ENV}=random") from None


def seed_from_env(var: str = SEED_ENV) -> int:
    """The seed in environment variable ``var`` (see :func:`parse_seed`); printed for replay."""
    seed = parse_seed(os.environ.get(var))
    print(f"{var}={seed}")
    return seed


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _with_extremes(rng: np.random.Generator, x: np.ndarray, lo: int, hi: int,
                   p: float = 0.08) -> np.ndarray:
    pick = rng.random(x.shape)
    x[pick < p] = lo
    x[(pick >= p) & (pick < 2 * p)] = hi
    return x


def random_channel_params(rng, shape) -> np.ndarray:
    """Random ChannelParams (``PARAM_DTYPE``) mixing realistic and saturating values.

    Shifts cover the whole int8 field (the hardware clamps to [-31, 31]); multipliers include
    INT32_MIN and 0; some clamp ranges are reversed.
    """
    rng = _rng(rng)
    p = np.zeros(shape, PARAM_DTYPE)
    n = p.size
    kind = rng.random(n)
    bias = rng.integers(-(1 << 16), 1 << 16, n)
    bias = np.where(kind < 0.25, rng.integers(INT32_MIN, INT32_MAX, n, endpoint=True), bias)
    p["bias"].flat = _with_extremes(rng, bias, INT32_MIN, INT32_MAX, 0.05)
    mult = rng.integers(1 << 30, INT32_MAX, n, endpoint=True)  # QuantizeMultiplier's range
    mult = np.where(rng.random(n) < 0.2, rng.integers(INT32_MIN, INT32_MAX, n, endpoint=True),
                    mult)
    p["multiplier"].flat = _with_extremes(rng, mult, INT32_MIN, 0, 0.05)
    shift = rng.integers(-31, 32, n)
    shift = np.where(rng.random(n) < 0.15, rng.integers(_INT8.min, _INT8.max, n, endpoint=True),
                     shift)
    p["shift"].flat = shift
    p["zero_point"].flat = rng.integers(_INT8.min, _INT8.max, n, endpoint=True)
    lo = rng.integers(_INT8.min, _INT8.max, n, endpoint=True)
    hi = rng.integers(_INT8.min, _INT8.max, n, endpoint=True)
    ordered = rng.random(n) < 0.9
    full = rng.random(n) < 0.5
    p["clamp_min"].flat = np.where(full, _INT8.min, np.where(ordered, np.minimum(lo, hi), lo))
    p["clamp_max"].flat = np.where(full, _INT8.max, np.where(ordered, np.maximum(lo, hi), hi))
    return p


def random_words(config: AccelConfig, buf: Buffer, n: int, rng) -> np.ndarray:
    """``n`` random words of ``buf`` in the :func:`~tinyaccel.protocol.pack_words` form.

    INT8 buffers include -128 and 127 often; ACC mixes small sums, full-range values and
    INT32_MIN / INT32_MAX; PARAM uses :func:`random_channel_params`; MASK random bits.
    """
    rng, config, buf = _rng(rng), get_config(config), Buffer(buf)
    shape = (n, lanes(config, buf))
    if buf == Buffer.MASK:
        return rng.random(shape) < 0.5
    if buf == Buffer.PARAM:
        return random_channel_params(rng, shape)
    if buf == Buffer.ACC:
        x = rng.integers(-(1 << 20), 1 << 20, shape)
        x = np.where(rng.random(shape) < 0.3, rng.integers(INT32_MIN, INT32_MAX, shape,
                                                          endpoint=True), x)
        return _with_extremes(rng, x, INT32_MIN, INT32_MAX).astype(np.int32)
    x = rng.integers(_INT8.min, _INT8.max, shape, endpoint=True)
    return _with_extremes(rng, x, _INT8.min, _INT8.max).astype(np.int8)


def sgq_group(rng, stripes: int, stripe_len: int, cols: int) -> np.ndarray:
    """OUT words ``int8 (stripes * stripe_len, cols)`` for an SGQ group whose stripes take every
    mode: all the group base (BASE), two neighbouring levels (1-bit codes at shift 0), spans up
    to 3 and 15, and the full range."""
    rng = _rng(rng)
    base = int(rng.integers(_INT8.min, _INT8.max - 16))
    out = np.empty((stripes, stripe_len * cols), np.int64)
    for i, kind in enumerate(rng.integers(0, 5, stripes)):
        span = (0, 1, 3, 15, 255)[kind]
        if kind == 0:
            out[i] = base
        elif kind == 4:
            out[i] = rng.integers(base, _INT8.max, out.shape[1], endpoint=True)
        else:
            lo = int(rng.integers(base, _INT8.max - span, endpoint=True))
            out[i] = rng.integers(lo, lo + span, out.shape[1], endpoint=True)
    out[0, 0] = base  # the group minimum
    return out.reshape(stripes * stripe_len, cols).astype(np.int8)


def random_im2col(config: AccelConfig | str, rng, *, out_window: int | None = None,
                  inp_window: int | None = None, mask_bits: int | None = None) -> dict:
    """Legal IM2COL operands (``Program.im2col`` keywords, ``pad_value`` an INT8 value) whose
    tensor lies in the first ``out_window`` OUT words and whose words in the first
    ``inp_window`` INP words (default: the whole buffers).

    Besides layer-like windows they cover the corners: ``pack > 0`` lanes, ``pitch`` beyond the
    channels' words, strides, dilations and pads up to their field maxima, pixels far below the
    tensor (``oy0`` large: all padding), ``pad_value`` of either sign, ``m_blocks = 0``; and
    ``pool`` (a quarter of them: max pooling, windows up to 7x7, mostly padding -128 as the
    compiler emits it). On a configuration with the PASS unit a third are ``tiled`` (whole
    patches), half of those ``gate``d by bits in the first ``mask_bits`` MASK bits.
    """
    config, rng = get_config(config), _rng(rng)
    cols = config.cols
    mask_bits = min(mask_bits or config.mask_bits, config.mask_bits)
    out_window = min(out_window or config.out_depth, config.out_depth)
    inp_window = min(inp_window or config.inp_depth, config.inp_depth)

    def small(hi, p_max=0.15, top=None):  # mostly 1..hi, sometimes the field maximum
        if top is not None and rng.random() < p_max:
            return int(rng.integers(1, top + 1))
        return int(rng.integers(1, hi + 1))

    for _ in range(1000):
        pack = 0
        if cols > 1 and rng.random() < 0.3:
            pack = int(rng.integers(1, min(3, cols.bit_length() - 1) + 1))
            channels = int(rng.integers(1, (cols >> pack) + 1))
            pitch = int(rng.integers(1, 3))
        else:
            channels = int(rng.integers(1, 4)) if rng.random() < 0.3 else \
                int(rng.integers(1, 3 * cols + 1))
            pitch = -(-channels // cols) + int(rng.integers(0, 2))
        in_w = small(8, top=40)
        in_h = small(8, top=40)
        tiled = config.impl.pass_unit and rng.random() < 0.33
        if tiled:
            ph, pw = config.patch_shape
            in_h, in_w = -(-in_h // ph) * ph, -(-in_w // pw) * pw
        span = -(-in_h * in_w >> pack) * pitch
        if span > out_window:
            continue
        pool = bool(rng.random() < 0.25)
        # (pooled: kh*kw taps a value on the serial design; smaller windows keep that short)
        kh, kw = (small(3, 0.1, 7), small(3, 0.1, 7)) if pool else (small(3, 0.1, _KH_MAX),
                                                                  small(3, 0.1, _KH_MAX))
        k = channels if pool else kh * kw * channels
        blocks_max = min(inp_window // k, _BLOCKS_MAX, 4)
        if blocks_max < 1:
            continue
        m_blocks = 0 if rng.random() < 0.04 else int(rng.integers(1, blocks_max + 1))
        out_w = small(10, top=255)
        oy0 = int(rng.integers(0, 4)) if rng.random() < 0.8 else int(rng.integers(0, 256))
        pass_fields = {}
        if tiled:
            out_w = max(pw, out_w - out_w % pw)
            oy0 -= oy0 % ph
            pass_fields = dict(tiled=True)
            first = oy0 * out_w // config.rows
            if rng.random() < 0.5 and first + m_blocks <= mask_bits:
                words = min((mask_bits - first - m_blocks) // 64, _MASK_WORD_MAX)
                pass_fields.update(gate=True, mask_word=int(rng.integers(0, words + 1)))
        pad_value = int(rng.integers(_INT8.min, _INT8.max + 1))
        if pool and rng.random() < 0.7:
            pad_value = _INT8.min
        return dict(**pass_fields,
            src=int(rng.integers(0, out_window - span + 1)),
            dst=int(rng.integers(0, inp_window - m_blocks * k + 1)),
            pitch=pitch, channels=channels, in_h=in_h, in_w=in_w, kh=kh, kw=kw,
            stride=small(2, top=7), dilation=small(1, 0.2, 7),
            pad_top=int(rng.integers(0, 3)) if rng.random() < 0.8 else int(
                rng.integers(0, _PAD_MAX + 1)),
            pad_left=int(rng.integers(0, 3)) if rng.random() < 0.8 else int(
                rng.integers(0, _PAD_MAX + 1)),
            pad_value=pad_value, oy0=oy0, out_w=out_w, m_blocks=m_blocks, pack=pack, pool=pool)
    raise ConfigError(f"config {config.name!r}: no IM2COL fits {out_window} OUT and "
                      f"{inp_window} INP words")


#: The ways :func:`broken_im2col` breaks an IM2COL (each a rule of ``RULES[Opcode.IM2COL]``).
_IM2COL_BREAKS = ("in_h", "in_w", "channels", "kh", "kw", "out_w", "stride", "dilation", "pitch",
                  "pixel", "dst", "src")


def broken_im2col(config: AccelConfig | str, rng) -> dict:
    """IM2COL operands (as :func:`random_im2col`) that break one decode rule: a zero extent,
    a pixel too wide for its storage, the INP words (``pool``: ``m_blocks*channels`` of them) or
    the tensor beyond the buffer."""
    config, rng = get_config(config), _rng(rng)
    f = random_im2col(config, rng)
    kind = str(rng.choice(_IM2COL_BREAKS))
    if kind == "pixel":
        if f["pack"] and rng.random() < 0.5:
            f["channels"] = int(rng.integers((config.cols >> f["pack"]) + 1,
                                             _field(Opcode.IM2COL, "channels").mask + 1))
        else:
            f["pack"], f["pitch"] = 0, 1
            f["channels"] = config.cols + int(rng.integers(1, config.cols + 1))
    elif kind == "dst":
        f["m_blocks"] = max(f["m_blocks"], 1)
        k = f["channels"] if f["pool"] else f["kh"] * f["kw"] * f["channels"]
        f["dst"] = int(rng.integers(max(0, config.inp_depth - f["m_blocks"] * k + 1),
                                    min(_ADDR_MAX, config.inp_depth + 4) + 1))
    elif kind == "src":
        span = -(-f["in_h"] * f["in_w"] >> f["pack"]) * f["pitch"]
        f["src"] = int(rng.integers(max(0, config.out_depth - span + 1),
                                    min(_ADDR_MAX, config.out_depth + 4) + 1))
    else:
        f[kind] = 0
    return f


def implemented_opcodes(config: AccelConfig | str) -> list[Opcode]:
    """The opcodes ``config`` implements (PATCH and DILATE need the PASS unit)."""
    config = get_config(config)
    return [op for op in Opcode if config.impl.pass_unit or op not in PASS_OPCODES]


def _opcodes(opcodes: Iterable | None, config: AccelConfig | None = None) -> list[Opcode]:
    """The opcodes named (default: every opcode ``config`` implements)."""
    if opcodes is None:
        return list(Opcode) if config is None else implemented_opcodes(config)
    out = []
    for op in opcodes:
        try:
            out.append(Opcode(op))
        except ValueError:
            raise FieldError(f"opcodes: {op!r} is not an Opcode") from None
    if not out:
        raise FieldError("opcodes must name at least one Opcode")
    return out


class _Generator:
    """Random legal and illegal instructions inside per-buffer address windows."""

    def __init__(self, config: AccelConfig, rng: np.random.Generator, window: int, max_k: int,
                 max_blocks: int, max_count: int):
        self.cfg, self.rng = config, rng
        # the structured SGQ groups draw from a stream of their own, so that adding them left
        # every other instruction of a seed's program as it was
        try:
            (self.sgq_rng,) = rng.spawn(1)
        except (TypeError, ValueError):  # a Generator made without a SeedSequence
            self.sgq_rng = np.random.default_rng(int(rng.integers(0, 2**32)))
        self.win = {buf: min(config.depth(buf), window) for buf in Buffer}
        self.win[Buffer.ACC] = min(config.depth(Buffer.ACC), max(window, 4 * config.rows))
        self.mask_bits = self.win[Buffer.MASK] * lanes(config, Buffer.MASK)
        self.max_k, self.max_blocks, self.max_count = max_k, max_blocks, max_count

    def _int(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi] (hi clipped to >= lo)."""
        return int(self.rng.integers(lo, max(lo, hi), endpoint=True))

    def _size(self, hi: int) -> int:
        """An extent in [0, hi], zero only rarely."""
        if hi < 1 or self.rng.random() < 0.05:
            return 0
        return self._int(1, hi)

    def _place(self, buf: Buffer, n: int) -> int:
        return self._int(0, self.win[buf] - n)

    def legal(self, prog: Program, op: Opcode) -> None:
        cfg, rng, win = self.cfg, self.rng, self.win
        if op == Opcode.NOP:
            prog.nop()
        elif op == Opcode.SYNC:
            prog.sync(counters=rng.random() < 0.5, clear=rng.random() < 0.1,
                      keep=rng.random() < 0.3)
        elif op in (Opcode.LOAD, Opcode.STORE):
            buf = Buffer(int(rng.integers(len(Buffer))))
            n = self._size(min(self.max_count, win[buf]))
            addr = self._place(buf, n)
            if op == Opcode.LOAD:
                prog.load(buf, addr, random_words(cfg, buf, n, rng))
            else:
                prog.store(buf, addr, n)
        elif op == Opcode.GEMM:
            k = self._int(1, min(self.max_k, win[Buffer.INP], win[Buffer.WGT]))
            mb = self._size(min(self.max_blocks, win[Buffer.INP] // k, _BLOCKS_MAX))
            nb = self._size(min(self.max_blocks, win[Buffer.WGT] // k, _BLOCKS_MAX))
            while mb * nb * cfg.rows > win[Buffer.ACC]:
                if nb > 1:
                    nb -= 1
                else:
                    mb -= 1
            gate = rng.random() < 0.3
            prog.gemm(self._place(Buffer.INP, mb * k), self._place(Buffer.WGT, nb * k),
                      self._place(Buffer.ACC, mb * nb * cfg.rows), k, mb, nb,
                      accumulate=rng.random() < 0.5, gate=gate,
                      mask_idx=self._int(0, self.mask_bits - mb))
        elif op == Opcode.REQUANT:
            n = self._size(min(self.max_count, win[Buffer.ACC], win[Buffer.OUT]))
            gap = 0  # strided: rows one pixel apart in a channels-last tensor
            if n > 1 and rng.random() < 0.4:
                gap = self._int(0, min(_GAP_MAX, (win[Buffer.OUT] - 1) // (n - 1) - 1))
            gated = {}
            bits = -(-n // cfg.rows)
            if cfg.impl.pass_unit and rng.random() < 0.3 and bits <= self.mask_bits:
                gated = dict(gate=True, mask_idx=self._int(0, self.mask_bits - bits))
            prog.requant(self._place(Buffer.ACC, n),
                         self._place(Buffer.OUT, strided_span(n, gap)),
                         self._place(Buffer.PARAM, 1), n, out_gap=gap, **gated)
        elif op == Opcode.PATCH:
            k = self._int(1, min(self.max_k, win[Buffer.OUT] // 2))
            blocks = self._size(min(self.max_blocks * 4, win[Buffer.OUT] // (2 * k), _BLOCKS_MAX,
                                    self.mask_bits))
            n = blocks * k
            a = self._int(0, win[Buffer.OUT] - 2 * n)
            b = self._int(a + n, win[Buffer.OUT] - n)
            new, ref = (a, b) if rng.random() < 0.5 else (b, a)
            r = rng.random()
            threshold = 0 if r < 0.2 else self._int(0, 8) if r < 0.7 else self._int(
                0, _THRESHOLD_MAX)
            prog.patch(new, ref, k, blocks, threshold,
                       mask_idx=self._int(0, self.mask_bits - blocks), merge=rng.random() < 0.3,
                       given=rng.random() < 0.2)
        elif op == Opcode.DILATE:
            prog.dilate(**self.random_dilate())
        elif op == Opcode.SGQ:
            stripe = self._int(1, min(8, win[Buffer.OUT], _STRIPE_MAX))
            n = stripe * self._size(min(self.max_count, win[Buffer.OUT]) // stripe)
            addr = self._place(Buffer.OUT, n)
            if n and self.sgq_rng.random() < 0.3:  # random words rarely make BASE or 1-bit
                prog.load(Buffer.OUT, addr,  # stripes
                          sgq_group(self.sgq_rng, n // stripe, stripe, cfg.cols))
            prog.sgq(addr, n, stripe, self._int(0, _MAX_SHIFT_MAX))
        elif op == Opcode.IM2COL:
            prog.im2col(**random_im2col(cfg, rng, out_window=win[Buffer.OUT],
                                        inp_window=win[Buffer.INP], mask_bits=self.mask_bits))
        else:  # pragma: no cover - every Opcode is handled above
            raise FieldError(f"no generator for {op!r}")

    def random_dilate(self) -> dict:
        """Legal DILATE operands: grids up to 12x12 (sometimes empty), windows up to the field
        maxima, disjoint source and destination inside the MASK window (below the largest
        ``src``/``dst`` the fields hold: an empty grid may start where the window ends)."""
        rng = self.rng
        bits = min(self.mask_bits, _MASK_IDX_MAX)
        for _ in range(1000):
            in_h, in_w, out_h, out_w = (self._size(12) for _ in range(4))
            n_in, n_out = in_h * in_w, out_h * out_w
            if n_in + n_out > bits:
                continue
            f = dict(in_h=in_h, in_w=in_w, out_h=out_h, out_w=out_w,
                     kh=self._int(1, 3) if rng.random() < 0.8 else self._int(1, 7),
                     kw=self._int(1, 3) if rng.random() < 0.8 else self._int(1, 7),
                     stride_y=self._int(1, 3), stride_x=self._int(1, 3),
                     pad_top=self._int(0, 3), pad_left=self._int(0, 3),
                     merge=rng.random() < 0.3)
            a = self._int(0, bits - n_in - n_out)
            b = self._int(a + n_in, bits - n_out)
            if rng.random() < 0.5:  # destination first
                b = self._int(0, bits - n_in - n_out)
                a = self._int(b + n_out, bits - n_in)
            return dict(src=a, dst=b, **f)
        raise ConfigError(f"config {self.cfg.name!r}: no DILATE fits {self.mask_bits} bits")

    def _beyond(self, limit: int, ext: int) -> int:
        """A base address with ``base + ext > limit`` that fits the 16-bit field."""
        return self._int(max(0, limit - ext + 1), min(_ADDR_MAX, limit + 4))

    def illegal(self, prog: Program, op: Opcode) -> None:
        """Append one instruction that faults (preferably of opcode ``op``)."""
        cfg, rng, depth = self.cfg, self.rng, self.cfg.depth
        kinds = {
            Opcode.LOAD: ["buffer", "range"], Opcode.STORE: ["buffer", "range"],
            Opcode.GEMM: ["k0", "inp", "wgt", "acc", "mask"], Opcode.REQUANT: ["range"],
            Opcode.PATCH: ["k0", "overlap", "range"], Opcode.SGQ: ["stripe0", "multiple", "range"],
            Opcode.IM2COL: ["rule"], Opcode.DILATE: ["k0", "stride0", "overlap", "range"],
        }.get(op, [])
        kind = str(rng.choice(kinds + ["opcode"])) if kinds else "opcode"
        if kind == "opcode":
            code = int(rng.choice(UNDEFINED_OPCODES))
            junk = int(rng.integers(0, 1 << 62)) << 4  # operand bits of an undefined opcode
            prog.raw(code | junk)
        elif kind == "buffer":
            word = encode_fields(op, buf=int(rng.choice(UNDEFINED_BUFFERS)),
                                 addr=self._int(0, 8), count=self._int(0, self.max_count))
            prog.raw(word)  # an undefined buffer has no word size: no data follows
        elif op in (Opcode.LOAD, Opcode.STORE):
            buf = Buffer(int(rng.integers(len(Buffer))))
            n = self._int(1, min(4, self.max_count))
            addr = self._beyond(depth(buf), n)
            if op == Opcode.LOAD:
                prog.load(buf, addr, random_words(cfg, buf, n, rng))
            else:
                prog.store(buf, addr, n)
        elif op == Opcode.GEMM:
            k, mb, nb = self._int(1, 4), self._int(1, 2), self._int(1, 2)
            args = dict(inp_addr=0, wgt_addr=0, acc_addr=0, k=k, m_blocks=mb, n_blocks=nb)
            if kind == "k0":
                args["k"] = 0
            elif kind == "inp":
                args["inp_addr"] = self._beyond(depth(Buffer.INP), mb * k)
            elif kind == "wgt":
                args["wgt_addr"] = self._beyond(depth(Buffer.WGT), nb * k)
            elif kind == "acc":
                args["acc_addr"] = self._beyond(depth(Buffer.ACC), mb * nb * cfg.rows)
            else:  # m_blocks >= 2 so that the range can end beyond a full 12-bit mask
                args.update(gate=True, m_blocks=self._int(2, 3))
                mb = args["m_blocks"]
                args.update(mask_idx=self._int(cfg.mask_bits - mb + 1,
                                                          _field(Opcode.GEMM, "mask_idx").mask))
            prog.gemm(**args)
        elif op == Opcode.REQUANT:
            which = self._int(0, 2)
            n = self._int(1, 4)
            gap = self._int(0, _GAP_MAX) if which == 1 and rng.random() < 0.5 else 0
            addrs = [0, 0, 0]
            addrs[which] = self._beyond(depth([Buffer.ACC, Buffer.OUT, Buffer.PARAM][which]),
                                        [n, strided_span(n, gap), 1][which])
            prog.requant(addrs[0], addrs[1], addrs[2], n, out_gap=gap)
        elif op == Opcode.IM2COL:
            prog.im2col(**broken_im2col(cfg, rng))
        elif op == Opcode.PATCH:
            k, blocks = self._int(1, 4), self._int(1, 3)
            if kind == "k0":
                prog.patch(0, 64, 0, blocks, 0)
            elif kind == "overlap":
                new = self._int(0, 16)
                prog.patch(new, new + self._int(0, blocks * k - 1), k, blocks, 0)
            else:
                prog.patch(self._beyond(depth(Buffer.OUT), blocks * k), 0, k, blocks, 0)
        elif op == Opcode.DILATE:
            f = self.random_dilate()
            f.update(in_h=max(f["in_h"], 1), in_w=max(f["in_w"], 1), out_h=max(f["out_h"], 1),
                     out_w=max(f["out_w"], 1))
            if kind == "k0":
                f[str(rng.choice(["kh", "kw"]))] = 0
            elif kind == "stride0":
                f[str(rng.choice(["stride_y", "stride_x"]))] = 0
            elif kind == "overlap":
                f["dst"] = f["src"] + self._int(0, f["in_h"] * f["in_w"] - 1)
                f["dst"] = min(f["dst"], _MASK_IDX_MAX)
            else:
                side = str(rng.choice(["src", "dst"]))
                h, w = ("in_h", "in_w") if side == "src" else ("out_h", "out_w")
                if cfg.mask_bits - f[h] * f[w] + 1 > _MASK_IDX_MAX:  # (no base can reach)
                    f[h] = 2
                n = f[h] * f[w]
                f[side] = self._int(max(0, cfg.mask_bits - n + 1), _MASK_IDX_MAX)
            prog.dilate(**f)
        else:  # SGQ
            stripe = self._int(2, 4)
            if kind == "stripe0":
                prog.sgq(0, self._int(0, 8), 0, 0)
            elif kind == "multiple":
                prog.sgq(0, stripe * self._int(1, 3) + self._int(1, stripe - 1), stripe, 0)
            else:
                n = stripe * self._int(1, 2)
                prog.sgq(self._beyond(depth(Buffer.OUT), n), n, stripe, 0)


def random_program(config: AccelConfig | str, rng, n_instr: int = 64,
                   opcodes: Iterable[Opcode] | None = None, illegal_rate: float = 0.0,
                   window: int = 64, max_k: int = 32, max_blocks: int = 3, max_count: int = 16,
                   prelude: bool = True) -> Program:
    """A seeded random program for ``config``.

    With ``prelude`` (and LOAD allowed) it first LOADs random data into an address window of
    every buffer (``window`` words; ACC at least ``4*rows``), then draws ``n_instr`` instructions
    uniformly from ``opcodes`` (default: all) with random operands that mostly stay inside the
    windows, so that they touch written data and overlap each other. With ``illegal_rate`` each
    instruction is, with that probability, replaced by a faulting one (undefined opcode or
    buffer code, out-of-range address, ``k = 0``, PATCH overlap, SGQ ``stripe_len = 0``...).
    A random SYNC has ``keep`` one time in three (the driver's flow-control probe: with
    ``illegal_rate`` an error then outlives it). A ``SYNC counters=1`` (not ``keep``) always
    ends the program (even when SYNC is not in ``opcodes``).
    """
    config, rng = get_config(config), _rng(rng)
    ops = _opcodes(opcodes, config)
    gen = _Generator(config, rng, window, max_k, max_blocks, max_count)
    prog = Program(config)
    if prelude and Opcode.LOAD in ops:
        for buf in Buffer:
            prog.load(buf, 0, random_words(config, buf, gen.win[buf], rng))
    for _ in range(n_instr):
        op = ops[int(rng.integers(len(ops)))]
        if illegal_rate and rng.random() < illegal_rate:
            gen.illegal(prog, op)
        else:
            gen.legal(prog, op)
    return prog.sync(counters=True)


# -- corner cases ------------------------------------------------------------------------------

class Corner(NamedTuple):
    """A named corner-case program and the status its first SYNC must report."""

    name: str
    program: Program
    status: Status = Status.OK


def _alternating(n: int, width: int, axis: int) -> np.ndarray:
    """int8 (n, width): -128 at even positions along ``axis`` (0 words, 1 lanes), else 127."""
    idx = np.arange(n)[:, None] if axis == 0 else np.arange(width)[None, :]
    return np.broadcast_to(np.where(idx % 2 == 0, _INT8.min, _INT8.max),
                           (n, width)).astype(np.int8)


def _requant_cases() -> list[dict]:
    """Channel parameters that hit every saturation of section 6."""
    full = dict(zero_point=0, clamp_min=_INT8.min, clamp_max=_INT8.max)
    return [
        dict(bias=INT32_MAX, multiplier=INT32_MAX, shift=0, **full),  # sat32(acc + bias) high
        dict(bias=INT32_MIN, multiplier=INT32_MAX, shift=0, **full),  # ... low
        dict(bias=0, multiplier=1 << 30, shift=31, **full),  # saturating left shift
        dict(bias=0, multiplier=1 << 30, shift=_INT8.max, **full),  # shift clamped to 31
        dict(bias=0, multiplier=INT32_MAX, shift=_INT8.min, **full),  # clamped to -31
        dict(bias=0, multiplier=INT32_MAX, shift=-31, **full),
        dict(bias=0, multiplier=INT32_MIN, shift=0, **full),  # SRDHM(INT32_MIN, INT32_MIN)
        dict(bias=0, multiplier=1 << 30, shift=-1, zero_point=_INT8.max,
             clamp_min=_INT8.min, clamp_max=_INT8.max),  # y + zero_point beyond INT8
        dict(bias=0, multiplier=1 << 30, shift=-1, zero_point=_INT8.min,
             clamp_min=_INT8.min, clamp_max=_INT8.max),
        dict(bias=0, multiplier=1 << 30, shift=-8, zero_point=-5, clamp_min=-5,
             clamp_max=_INT8.max),  # ReLU
        dict(bias=0, multiplier=1 << 30, shift=-8, zero_point=0, clamp_min=10,
             clamp_max=-10),  # reversed clamps: the result is clamp_max
        dict(bias=0, multiplier=0, shift=0, **full),
    ]


def corner_programs(config: AccelConfig | str,
                    opcodes: Iterable[Opcode] | None = None) -> list[Corner]:
    """Named corner-case programs for ``config`` (those using only ``opcodes``, default all).

    Extreme GEMM products at the largest ``k`` the buffers allow, requantization saturating
    both ways, a 1x1 tile, zero-size operations, accumulate saturation, gating, PATCH, SGQ modes,
    SYNCs back to back, SYNC ``keep`` (the error state and the saturation flag outliving it),
    a discarded LOAD right before a SYNC, and one program per error status (each followed by
    instructions that must not execute and a second SYNC that shows the machine recovered).
    The status of the first SYNC is :attr:`Corner.status`; every SYNC after the first one
    without ``keep`` reports OK.
    """
    config = get_config(config)
    ops = set(_opcodes(opcodes, config))
    rows, cols, depth = config.rows, config.cols, config.depth
    corners: list[Corner] = []

    def add(name: str, prog: Program, status: Status = Status.OK) -> None:
        used = {i.opcode for i, _ in prog if isinstance(i.opcode, Opcode)}
        if used <= ops:
            corners.append(Corner(name, prog, status))

    def new() -> Program:
        return Program(config)

    # Largest K: -128 x -128 (and 127 x -128, 127 x 127) summed over every INP/WGT word.
    k = min(depth(Buffer.INP), depth(Buffer.WGT), _K_MAX, _COUNT_MAX)
    p = new().load(Buffer.INP, 0, _alternating(k, rows, 1)).load(
        Buffer.WGT, 0, _alternating(k, cols, 1))
    p.gemm(0, 0, 0, k).store(Buffer.ACC, 0, rows).gemm(0, 0, 0, k, accumulate=True)
    add("gemm_extreme_max_k", p.store(Buffer.ACC, 0, rows).sync(counters=True))

    # Requantization saturating both ways: extreme accumulators through every saturating case.
    acc_values = np.array([INT32_MIN, INT32_MAX, 0, 1, -1, 1 << 30, -(1 << 30), 255, -256,
                           12345, -12345, INT32_MIN + 1], np.int64)
    n = min(len(acc_values), depth(Buffer.ACC), depth(Buffer.OUT))
    acc = np.repeat(acc_values[:n, None], cols, axis=1).astype(np.int32)
    cases = _requant_cases()
    n_words = min(-(-len(cases) // cols), depth(Buffer.PARAM))
    params = np.zeros((n_words, cols), PARAM_DTYPE)
    for i in range(n_words * cols):
        for key, value in cases[i % len(cases)].items():
            params[key][i // cols, i % cols] = value
    p = new().load(Buffer.ACC, 0, acc).load(Buffer.PARAM, 0, params)
    for w in range(n_words):
        p.requant(0, 0, w, n).store(Buffer.OUT, 0, n)
    add("requant_saturation", p.sync(counters=True))

    # 1x1 tile, k = 1.
    p = new().load(Buffer.INP, 0, _alternating(1, rows, 1)).load(
        Buffer.WGT, 0, _alternating(1, cols, 1))
    add("tile_1x1", p.gemm(0, 0, 0, 1).store(Buffer.ACC, 0, rows).sync(counters=True))

    # Zero-size operations: legal, and nothing happens.
    p = new()
    for buf in Buffer:
        p.load(buf, 0, np.zeros((0, lanes(config, buf)), lane_dtype(config, buf)))
        p.store(buf, 0, 0)
    p.gemm(0, 0, 0, 1, m_blocks=0, n_blocks=1).gemm(0, 0, 0, 1, m_blocks=1, n_blocks=0)
    p.gemm(0, 0, 0, 1, m_blocks=0, n_blocks=0, gate=True)
    p.requant(0, 0, 0, 0).sgq(0, 0, 1, 0)
    if config.impl.pass_unit:
        p.patch(0, 1, 1, 0, 0).dilate(0, 1, in_h=0, in_w=0, out_h=0, out_w=0, kh=1, kw=1)
    add("zero_size", p.sync(counters=True))

    # Accumulate saturation both ways; the flag is sticky until the SYNC, then cleared.
    half = max(1, rows // 2)
    inp = np.where(np.arange(rows)[None, :] < half, _INT8.max, _INT8.min)
    inp = np.repeat(inp, 4, axis=0).astype(np.int8)
    acc = np.where(np.arange(rows)[:, None] < half, INT32_MAX - 5, INT32_MIN + 5)
    acc = np.repeat(acc, cols, axis=1).astype(np.int32)
    p = new().load(Buffer.INP, 0, inp).load(Buffer.WGT, 0, np.full((4, cols), 127, np.int8))
    p.load(Buffer.ACC, 0, acc).gemm(0, 0, 0, 4, accumulate=True).nop()
    add("accumulate_saturation", p.store(Buffer.ACC, 0, rows).sync(counters=True).sync())

    # Gating: blocks 0 and 2 computed, block 1 skipped (its ACC keeps the loaded value).
    mb = min(3, depth(Buffer.INP) // 2, depth(Buffer.ACC) // rows)
    mask = np.zeros((1, lanes(config, Buffer.MASK)), bool)
    mask[0, [0, 2]] = True
    p = new().load(Buffer.INP, 0, _alternating(2 * mb, rows, 0)).load(
        Buffer.WGT, 0, _alternating(2, cols, 1)).load(Buffer.MASK, 0, mask)
    p.load(Buffer.ACC, 0, np.full((mb * rows, cols), 7, np.int32))
    p.gemm(0, 0, 0, 2, m_blocks=mb, gate=True)
    add("gemm_gated", p.store(Buffer.ACC, 0, mb * rows).sync(counters=True))

    # PATCH: a changed tile, an unchanged one, merge keeps an old bit; threshold 255 never fires;
    # a given mask copies the marked tile only.
    tiles = np.zeros((8, cols), np.int8)
    tiles[1, 0] = 5  # tile 0 (words 0..1) differs from its reference by 5
    tiles[6, cols - 1] = _INT8.min  # tile 3 (words 6..7): 128 from its reference 0
    p = new().load(Buffer.OUT, 0, tiles).load(Buffer.MASK, 0, np.zeros((1, 64), bool))
    p.patch(0, 4, 2, 2, _THRESHOLD_MAX, mask_idx=2).patch(0, 4, 2, 2, 4, mask_idx=0)
    p.patch(0, 4, 2, 2, 0, mask_idx=0, merge=True).patch(0, 8, 2, 2, 127, mask_idx=4)
    p.patch(2, 12, 2, 2, 0, mask_idx=0, given=True)
    add("patch", p.store(Buffer.MASK, 0, 1).store(Buffer.OUT, 0, 16).sync(counters=True))

    # DILATE: a 3x3 window at stride 1 and 2 with padding, a merge, bits at the grid's edges.
    if config.impl.pass_unit and config.mask_bits >= 256:
        bits = np.zeros((4, 64), bool)
        bits[0, [0, 7, 18, 35, 63]] = True
        p = new().load(Buffer.MASK, 0, bits)
        p.dilate(0, 64, in_h=8, in_w=8, out_h=8, out_w=8, kh=3, kw=3, pad_top=1, pad_left=1)
        p.dilate(0, 128, in_h=8, in_w=8, out_h=4, out_w=4, kh=3, kw=3, stride_y=2, stride_x=2,
                 pad_top=1, pad_left=1)
        p.dilate(0, 128, in_h=8, in_w=8, out_h=3, out_w=5, kh=7, kw=1, stride_y=3, pad_top=3,
                 merge=True)
        add("dilate", p.store(Buffer.MASK, 0, 4).sync(counters=True))

    # Tiled and gated IM2COL into a gated GEMM and REQUANT: the PASS layer (section 7).
    if config.impl.pass_unit and depth(Buffer.OUT) >= 64 and depth(Buffer.INP) >= 64:
        ph, pw = config.patch_shape
        h, w = 2 * ph, 2 * pw
        out = ((np.arange(h * w * cols).reshape(h * w, cols) * 41) % 256 - 128).astype(np.int8)
        mask = np.zeros((1, 64), bool)
        mask[0, [1, 2]] = True
        p = new().load(Buffer.OUT, 0, out).load(Buffer.MASK, 0, mask)
        p.load(Buffer.WGT, 0, _alternating(9, cols, 1))
        p.load(Buffer.PARAM, 0, np.zeros((1, cols), PARAM_DTYPE))
        geo = dict(channels=1, in_h=h, in_w=w, kh=3, kw=3, out_w=w, pad_top=1, pad_left=1,
                   pad_value=-1, tiled=True)
        p.im2col(0, 0, m_blocks=4, **geo).im2col(0, 36, m_blocks=2, oy0=ph, gate=True, **geo)
        p.gemm(0, 0, 0, 9, m_blocks=4, gate=True, mask_idx=0)
        p.requant(0, h * w, 0, 4 * rows, gate=True, mask_idx=0)
        add("pass_layer", p.store(Buffer.INP, 0, 54).store(Buffer.OUT, h * w, 4 * rows).sync(
            counters=True))

    # SGQ: BASE, 1-, 2-, 4- and 8-bit stripes (stripes of two words: the low value, then low +
    # the largest span the width holds at shift 0), lossless and with the largest shift; then
    # stripes of one (constant) word: BASE and 1-bit codes.
    spans = (0, 1, 3, 15, 255)
    if depth(Buffer.OUT) >= 2 * len(spans):
        out = np.zeros((2 * len(spans), cols), np.int8)
        for i, (span, lo) in enumerate(zip(spans, (_INT8.min, 7, -40, 100, _INT8.min),
                                           strict=True)):
            out[2 * i], out[2 * i + 1] = lo, lo + span  # the first stripe is the group base
        p = new().load(Buffer.OUT, 0, out)
        for shift in (0, 2, _MAX_SHIFT_MAX):
            p.sgq(0, len(out), 2, shift)
        add("sgq_modes", p.sgq(0, len(out), 1, 0).sync(counters=True))

    # IM2COL: a padded strided window, packed pixels with dilation, a pixel of two words, a tile
    # entirely below the tensor (all padding at the largest strides and pads), m_blocks = 0; then
    # a strided REQUANT (out_gap) into a tensor and an IM2COL reading it back.
    if depth(Buffer.OUT) >= 32 and depth(Buffer.INP) >= 64 and depth(Buffer.ACC) >= 4:
        out = ((np.arange(16 * cols).reshape(16, cols) * 37) % 256 - 128).astype(np.int8)
        p = new().load(Buffer.OUT, 0, out)
        dst = 0
        ch = min(cols, 3)
        mb = -(-4 // rows)
        p.im2col(0, dst, channels=ch, in_h=4, in_w=4, kh=3, kw=3, out_w=2, m_blocks=mb,
                 stride=2, pad_top=1, pad_left=1, pad_value=_INT8.min)
        dst += mb * 9 * ch
        pack = min(3, cols.bit_length() - 1)
        p.im2col(0, dst, channels=1, pack=pack, in_h=4, in_w=4, kh=2, kw=2, dilation=2,
                 out_w=3, m_blocks=1)
        dst += 4
        p.im2col(4, dst, channels=cols + 1, pitch=2, in_h=2, in_w=2, kh=1, kw=2, out_w=2,
                 m_blocks=1, pad_left=1, pad_value=-1)
        dst += 2 * (cols + 1)
        p.im2col(0, dst, channels=1, in_h=1, in_w=1, kh=2, kw=2, stride=7, dilation=7,
                 pad_top=_PAD_MAX, pad_left=_PAD_MAX, oy0=255, out_w=255, m_blocks=1,
                 pad_value=_INT8.max)
        dst += 4
        p.im2col(0, dst, channels=1, in_h=1, in_w=1, kh=1, kw=1, out_w=1, m_blocks=0)
        params = np.zeros((1, cols), PARAM_DTYPE)
        params["multiplier"], params["clamp_min"], params["clamp_max"] = 1 << 30, -128, 127
        acc = (np.arange(3 * cols).reshape(3, cols) * 29 - 40).astype(np.int32)
        p.load(Buffer.ACC, 0, acc).load(Buffer.PARAM, 0, params)
        p.requant(0, 16, 0, 3, out_gap=4)  # pixels of 5 words at OUT 16, 21, 26
        p.im2col(16, dst, channels=cols, pitch=5, in_h=1, in_w=3, kh=1, kw=3, out_w=1,
                 m_blocks=1, pad_left=1)
        dst += 3 * cols
        # pooled: a padded strided 3x3 max pool (padding -128 never wins), one whose padding
        # of +5 wins over the negative values, a dilated one of packed pixels
        p.im2col(0, dst, channels=ch, in_h=4, in_w=4, kh=3, kw=3, out_w=2, m_blocks=mb,
                 stride=2, pad_top=1, pad_left=1, pad_value=_INT8.min, pool=True)
        dst += mb * ch
        p.im2col(0, dst, channels=ch, in_h=4, in_w=4, kh=2, kw=3, out_w=3, m_blocks=mb,
                 pad_top=1, pad_left=2, pad_value=5, pool=True)
        dst += mb * ch
        p.im2col(0, dst, channels=1, pack=pack, in_h=4, in_w=4, kh=2, kw=2, dilation=2,
                 out_w=3, m_blocks=1, pool=True)
        dst += 1
        add("im2col_windows", p.store(Buffer.INP, 0, dst).store(Buffer.OUT, 16, 11).sync(
            counters=True))

    # Errors: a legal LOAD (so error_pc = 1), the fault, instructions that must not execute,
    # a SYNC that reports the fault, then a STORE proving the buffers are intact.
    word = np.full((1, rows), 11, np.int8)

    def error(name: str, status: Status, fault) -> None:
        p = new().load(Buffer.INP, 0, word)
        fault(p)
        p.load(Buffer.INP, 0, np.full((1, rows), -3, np.int8)).store(Buffer.INP, 0, 1)
        p.store(Buffer.ACC, 0, 1).gemm(0, 0, 0, 1)
        if Opcode.SGQ in ops:
            p.sgq(0, 1, 1, 0)
        p.sync(counters=True).store(Buffer.INP, 0, 1).sync(counters=True)
        add(name, p, status)

    s = Status
    error("error_illegal_opcode", s.ILLEGAL_OPCODE,
          lambda p: p.raw(UNDEFINED_OPCODES[-1] | ((1 << 124) - 1) << 4))
    error("error_bad_buffer_load", s.BAD_BUFFER,
          lambda p: p.raw(encode_fields(Opcode.LOAD, buf=UNDEFINED_BUFFERS[0], count=3)))
    error("error_bad_buffer_store", s.BAD_BUFFER,
          lambda p: p.raw(encode_fields(Opcode.STORE, buf=UNDEFINED_BUFFERS[-1], count=3)))
    error("error_addr_range_load", s.ADDR_RANGE, lambda p: p.load(
        Buffer.WGT, depth(Buffer.WGT) - 1, np.ones((2, cols), np.int8)))
    error("error_addr_range_store", s.ADDR_RANGE,
          lambda p: p.store(Buffer.ACC, depth(Buffer.ACC), 1))
    error("error_addr_range_gemm", s.ADDR_RANGE,
          lambda p: p.gemm(0, 0, depth(Buffer.ACC) - rows + 1, 1))
    error("error_addr_range_gemm_mask", s.ADDR_RANGE,
          lambda p: p.gemm(0, 0, 0, 1, m_blocks=2, gate=True, mask_idx=config.mask_bits - 1))
    error("error_addr_range_requant", s.ADDR_RANGE,
          lambda p: p.requant(0, 0, depth(Buffer.PARAM), 1))
    error("error_addr_range_patch", s.ADDR_RANGE,
          lambda p: p.patch(0, depth(Buffer.OUT) - 1, 2, 1, 0))
    error("error_addr_range_sgq", s.ADDR_RANGE,
          lambda p: p.sgq(depth(Buffer.OUT) - 1, 2, 1, 0))
    error("error_bad_shape_gemm_k0", s.BAD_SHAPE, lambda p: p.gemm(0, 0, 0, 0))
    error("error_bad_shape_patch_k0", s.BAD_SHAPE, lambda p: p.patch(0, 8, 0, 1, 0))
    error("error_bad_shape_sgq_count", s.BAD_SHAPE, lambda p: p.sgq(0, 3, 2, 0))
    error("error_bad_field_sgq_stripe_len", s.BAD_FIELD, lambda p: p.sgq(0, 2, 0, 0))
    error("error_bad_field_patch_overlap", s.BAD_FIELD, lambda p: p.patch(0, 1, 2, 1, 0))
    error("error_addr_range_requant_gap", s.ADDR_RANGE,
          lambda p: p.requant(0, depth(Buffer.OUT) - 2, 0, 2, out_gap=1))
    error("error_bad_shape_im2col_kh0", s.BAD_SHAPE, lambda p: p.im2col(
        0, 0, channels=1, in_h=1, in_w=1, kh=0, kw=1, out_w=1, m_blocks=1))
    error("error_bad_field_im2col_pixel", s.BAD_FIELD, lambda p: p.im2col(
        0, 0, channels=cols + 1, in_h=1, in_w=1, kh=1, kw=1, out_w=1, m_blocks=1))
    # a pooled IM2COL ending at the INP depth is legal (its K is channels, not kh*kw*channels);
    # one word more is not
    pooled = dict(channels=cols, in_h=3, in_w=3, kh=3, kw=3, out_w=3, m_blocks=2, pool=True)
    if depth(Buffer.OUT) >= 9 and depth(Buffer.INP) >= 2 * cols:
        end = depth(Buffer.INP) - 2 * cols
        p = new().load(Buffer.OUT, 0, ((np.arange(9 * cols).reshape(9, cols) * 53) % 256
                                        - 128).astype(np.int8))
        add("im2col_pool_at_inp_end", p.im2col(0, end, **pooled).store(
            Buffer.INP, end, 2 * cols).sync(counters=True))
        error("error_addr_range_im2col_pool_dst", s.ADDR_RANGE,
              lambda p: p.im2col(0, end + 1, **pooled))
    if config.impl.pass_unit:
        error("error_bad_field_dilate_overlap", s.BAD_FIELD, lambda p: p.dilate(
            0, 1, in_h=1, in_w=2, out_h=1, out_w=1, kh=1, kw=1))
        error("error_addr_range_dilate", s.ADDR_RANGE, lambda p: p.dilate(
            0, config.mask_bits - 1, in_h=1, in_w=1, out_h=1, out_w=2, kh=1, kw=1))
        error("error_bad_field_im2col_gate_untiled", s.BAD_FIELD, lambda p: p.im2col(
            0, 0, channels=1, in_h=1, in_w=1, kh=1, kw=1, out_w=1, m_blocks=1, gate=True))
        error("error_addr_range_requant_gate", s.ADDR_RANGE, lambda p: p.requant(
            0, 0, 0, rows + 1, gate=True, mask_idx=config.mask_bits - 1))
    else:  # the PASS instructions and fields are not there
        pass_ops = set(_opcodes(None))  # (add() filters by the config's opcodes)
        for name, status, fault in [
                ("error_illegal_patch", s.ILLEGAL_OPCODE, lambda p: p.raw(encode_fields(
                    Opcode.PATCH, new_addr=0, ref_addr=8, k=1, blocks=1))),
                ("error_illegal_dilate", s.ILLEGAL_OPCODE, lambda p: p.raw(encode_fields(
                    Opcode.DILATE, src=0, dst=8, kh=1, kw=1, stride_y=1, stride_x=1))),
                ("error_bad_field_requant_gate", s.BAD_FIELD,
                 lambda p: p.requant(0, 0, 0, 1, gate=True))]:
            p = new().load(Buffer.INP, 0, word)
            fault(p)
            p.load(Buffer.INP, 0, np.full((1, rows), -3, np.int8)).store(Buffer.INP, 0, 1)
            p.sync(counters=True).store(Buffer.INP, 0, 1).sync(counters=True)
            if {Opcode.LOAD, Opcode.STORE, Opcode.SYNC, Opcode.REQUANT} <= ops | pass_ops:
                corners.append(Corner(name, p, status))
    error("error_addr_range_im2col_src", s.ADDR_RANGE, lambda p: p.im2col(
        depth(Buffer.OUT) - 1, 0, channels=1, pitch=2, in_h=1, in_w=1, kh=1, kw=1, out_w=1,
        m_blocks=1))

    # The link trailer and SYNC keep (section 9): SYNCs back to back (each trailer covers only
    # the SYNC word it answers and the records before it), every flag combination.
    p = new().load(Buffer.INP, 0, word).store(Buffer.INP, 0, 1)
    for counters, clear, keep in ((0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 1, 1), (1, 0, 1),
                                  (0, 1, 0), (1, 0, 0)):
        p.sync(counters=counters, clear=clear, keep=keep)
    add("syncs_back_to_back", p)
    # keep after an error: the fault, its error_pc, the instruction window and the discarding
    # outlive SYNC keep; a SYNC without keep clears them, and execution resumes.
    p = new().load(Buffer.INP, 0, word).raw(UNDEFINED_OPCODES[0])
    p.sync(keep=True).load(Buffer.INP, 0, np.full((1, rows), 5, np.int8)).store(Buffer.INP, 0, 1)
    p.sync(counters=True, keep=True).nop().sync()
    p.store(Buffer.INP, 0, 1).sync(keep=True).sync(counters=True)
    add("sync_keep_after_error", p, s.ILLEGAL_OPCODE)
    # keep and the saturation flag: it stays set through SYNC keep, until a SYNC without it.
    big = np.full((1, max(rows, cols)), _INT8.min, np.int8)
    p = new().load(Buffer.INP, 0, big[:, :rows]).load(Buffer.WGT, 0, big[:, :cols])
    p.load(Buffer.ACC, 0, np.full((rows, cols), INT32_MAX, np.int32))
    p.gemm(0, 0, 0, 1, accumulate=True).sync(keep=True).nop().sync(counters=True, keep=True)
    add("sync_keep_saturation", p.sync().sync())
    # A LOAD discarded right before a SYNC: after an error, and out of range (its data is
    # still taken, and counted by rx_crc and BYTES_IN).
    p = new().raw(UNDEFINED_OPCODES[0]).load(Buffer.WGT, 0, np.ones((2, cols), np.int8))
    add("discarded_load_before_sync", p.sync(counters=True).store(Buffer.WGT, 0, 2).sync(),
        s.ILLEGAL_OPCODE)
    p = new().load(Buffer.OUT, depth(Buffer.OUT) - 1, np.ones((2, cols), np.int8))
    add("out_of_range_load_before_sync", p.sync(counters=True).store(Buffer.OUT, 0, 1).sync(),
        s.ADDR_RANGE)
    return corners

