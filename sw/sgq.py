"""The host side of SGQ: how a feature map becomes channel groups and stripes, the per-group shift
budget, the device programs that encode, and the decoder.

SGQ (stripe-wise group quantization, ``docs/architecture.md`` section 8) encodes one *channel
group* per instruction: ``count`` OUT words in stripes of ``stripe_len`` words. The driver decides
the hierarchy above the hardware, per split layer (:class:`SgqPlan`):

- **channel order**: channels sorted by significance (their mean activation on calibration
  features), so a group holds channels of like range and mostly-silent channels share groups
  whose stripes cost a mode field only;
- **group size** ``g`` (a divisor of the array's ``cols``): a word holds ``cols / g`` neighbouring
  positions of the group's ``g`` channels, so a group is ``g`` channels x every position;
- **stripes** of ``stripe_rows`` feature-map rows (the spatial axis);
- **a shift budget per group**: each group's ``max_shift``, chosen to meet a bit budget (bits per
  feature value on the wire) with the least squared error — by :func:`calibrate` with the layout,
  then by :func:`allocate` on every batch before it is encoded.

The hardware then picks each stripe's code width and shift (section 8). :func:`encode_program`
builds the program that LOADs a batch's INT8 features into OUT and SGQ-encodes every group;
:func:`decode_responses` turns the payloads back into the feature batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BudgetError, CapacityError, FieldError, ProtocolError, ShapeError
from ..hw.config import AccelConfig
from ..hw.isa import (
    SGQ_MODE_BITS,
    Buffer,
    Opcode,
    SgqMode,
    SgqStripeHeader,
    field_table,
    operand_fields,
)
from ..protocol import Program, sgq_response_length
from ..sim.numerics import sgq_payload_bytes, sgq_stripe_modes

__all__ = ["SgqPlan", "calibrate", "allocate", "encode_program", "decode_responses",
           "decode_payload", "significance_order", "MAX_SHIFT", "reconstruction_error"]



def _field_max(name: str) -> int:
    return (1 << next(f.width for f in operand_fields(Opcode.SGQ) if f.name == name)) - 1


MAX_SHIFT = _field_max("max_shift")
_STRIPE_MAX = _field_max("stripe_len")
_COUNT_MAX = _field_max("count")

# -- the wire format's fields (section 8), from hw/isa.py ---------------------------------------
_MODE_BITS = SgqMode.as_shape().width
_HEADER = {info.name: info.width for info in field_table(SgqStripeHeader)}
_OFFSET_BITS, _SHIFT_BITS = _HEADER["offset"], _HEADER["shift"]
_HEADER_BITS = _OFFSET_BITS + _SHIFT_BITS
_BASE_BITS = 8  # the group base, one INT8 value
_CODE_BITS = np.zeros(1 << _MODE_BITS, np.int64)  # code width per mode value (0: BASE, reserved)
for _mode, _bits in SGQ_MODE_BITS.items():
    _CODE_BITS[_mode.value] = _bits
#: Mode codes a stream may carry (the others are reserved).
_MODES = {SgqMode.BASE.value} | {m.value for m in SGQ_MODE_BITS}


@dataclass(frozen=True)
class SgqPlan:
    """How one split layer's ``(C, H, W)`` features are cut into SGQ groups and stripes."""

    channels: int
    height: int
    width: int
    cols: int  #: the array's columns (values per OUT word)
    order: tuple[int, ...]  #: channel order: group j holds order[j*group:(j+1)*group]
    group: int  #: channels per group (divides cols)
    stripe_rows: int  #: feature-map rows per stripe
    shifts: tuple[int, ...]  #: max_shift of each group

    def __post_init__(self):
        if sorted(self.order) != list(range(self.channels)):
            raise ShapeError(f"SGQ plan: order {self.order} is not a permutation of "
                             f"{self.channels} channels")
        if self.cols % self.group:
            raise ShapeError(f"SGQ plan: group size {self.group} does not divide cols={self.cols}")
        if self.height % self.stripe_rows:
            raise ShapeError(f"SGQ plan: stripe of {self.stripe_rows} rows does not divide the "
                             f"feature height {self.height}")
        if (self.stripe_rows * self.width) % self.positions_per_word:
            raise ShapeError(f"SGQ plan: a stripe of {self.stripe_rows} x {self.width} positions "
                             f"does not fill whole words of {self.positions_per_word} positions")
        if not 1 <= self.stripe_len <= _STRIPE_MAX:
            raise ShapeError(f"SGQ plan: stripe_len {self.stripe_len} words is outside "
                             f"1..{_STRIPE_MAX}")
        if len(self.shifts) != self.groups or not all(0 <= s <= MAX_SHIFT for s in self.shifts):
            raise ShapeError(f"SGQ plan: shifts {self.shifts} must be {self.groups} values in "
                             f"0..{MAX_SHIFT}")

    @property
    def groups(self) -> int:
        return -(-self.channels // self.group)

    @property
    def positions_per_word(self) -> int:
        return self.cols // self.group

    @property
    def words_per_sample(self) -> int:
        return self.height * self.width // self.positions_per_word

    @property
    def stripe_len(self) -> int:
        return self.stripe_rows * self.width // self.positions_per_word

    @property
    def values_per_sample(self) -> int:
        return self.channels * self.height * self.width

    def with_shifts(self, shifts) -> SgqPlan:
        return SgqPlan(self.channels, self.height, self.width, self.cols, self.order,
                       self.group, self.stripe_rows, tuple(int(s) for s in shifts))

    @property
    def wire_bytes(self) -> int:
        """Bytes that tell the server a new layout: the channel order (a byte each), the group
        size and the stripe height (the shifts go with every batch)."""
        return self.channels + 2

    def describe(self) -> dict:
        """The plan as a JSON record."""
        return {"groups": self.groups, "group_size": self.group, "stripe_rows": self.stripe_rows,
                "stripe_len_words": self.stripe_len, "max_shift": list(self.shifts),
                "order": list(self.order)}

    # -- layout --------------------------------------------------------------------------------

    def layout(self, q: np.ndarray) -> list[np.ndarray]:
        """INT8 features ``(N, C, H, W)`` -> per group an ``int8 (N * words_per_sample, cols)``
        array of OUT words (missing channels of a last partial group are zeros)."""
        q = np.asarray(q)
        if q.ndim != 4 or q.shape[1:] != (self.channels, self.height, self.width):
            raise ShapeError(f"SGQ plan for features (N, {self.channels}, {self.height}, "
                             f"{self.width}) got shape {q.shape}")
        n = q.shape[0]
        order = list(self.order) + [-1] * (self.groups * self.group - self.channels)
        padded = np.concatenate([q, np.zeros((n, 1, self.height, self.width), q.dtype)], axis=1)
        out = []
        for j in range(self.groups):
            idx = [c if c >= 0 else self.channels for c in order[j * self.group:
                                                                 (j + 1) * self.group]]
            block = padded[:, idx].transpose(0, 2, 3, 1)  # (N, H, W, g): position-major
            out.append(np.ascontiguousarray(block.reshape(-1, self.cols)).astype(np.int8))
        return out

    def unlayout(self, words: list[np.ndarray], n: int) -> np.ndarray:
        """The inverse of :meth:`layout`: per-group words -> ``int8 (N, C, H, W)``."""
        out = np.zeros((n, self.channels, self.height, self.width), np.int8)
        for j, w in enumerate(words):
            block = np.asarray(w).reshape(n, self.height, self.width, self.group)
            for k, c in enumerate(self.order[j * self.group:(j + 1) * self.group]):
                out[:, c] = block[..., k]
        return out

    def chunk_samples(self, config: AccelConfig) -> int:
        """Samples encoded per SGQ instruction: every group of a chunk sits in OUT at once."""
        words = self.groups * self.words_per_sample
        per = min(config.depth(Buffer.OUT) // words, _COUNT_MAX // self.words_per_sample)
        if per < 1:
            raise CapacityError(f"SGQ: one sample's features need {words} OUT words "
                                f"({self.groups} groups x {self.words_per_sample}); OUT holds "
                                f"{config.depth(Buffer.OUT)} on config {config.name!r}")
        return per


def decode_payload(payload: bytes, count: int, cols: int, stripe_len: int) -> np.ndarray:
    """Decode one SGQ payload back to ``int8 (count, cols)`` (section 8; every value within
    ``2^max_shift >> 1`` of the encoded one). The only SGQ decoder: the server's, and the
    golden model's tests check the encoders against it.

    Raises
    ------
    ProtocolError
        When the payload is shorter or longer than its stripes say, or a stripe's mode field
        holds a reserved code.
    """
    count, cols, stripe_len = int(count), int(cols), int(stripe_len)
    if stripe_len < 1:
        raise FieldError(f"SGQ: stripe_len={stripe_len} must be >= 1")
    if count % stripe_len:
        raise ShapeError(f"SGQ: count={count} is not a multiple of stripe_len={stripe_len}")
    payload = bytes(payload)
    if count == 0:
        if payload:
            raise ProtocolError(f"SGQ payload of an empty group must be empty, got "
                                f"{len(payload)} bytes")
        return np.zeros((0, cols), np.int8)
    bits = np.unpackbits(np.frombuffer(payload, np.uint8), bitorder="little").astype(np.int64)
    n_stripes, length = count // stripe_len, stripe_len * cols

    def field(pos: int, width: int) -> int:
        if pos + width > len(bits):
            raise ProtocolError(f"SGQ payload of {len(payload)} bytes is truncated: needs bit "
                                f"{pos + width - 1}")
        return int(bits[pos:pos + width] @ (1 << np.arange(width)))

    base = field(0, _BASE_BITS)
    base -= (base >> (_BASE_BITS - 1)) << _BASE_BITS  # two's complement
    pos = _BASE_BITS
    mode = np.zeros(n_stripes, np.int64)
    offset = np.zeros(n_stripes, np.int64)
    shift = np.zeros(n_stripes, np.int64)
    start = np.zeros(n_stripes, np.int64)
    lut = _CODE_BITS
    for i in range(n_stripes):  # headers are sequential: each position depends on the last mode
        mode[i] = field(pos, _MODE_BITS)
        if mode[i] not in _MODES:
            raise ProtocolError(f"SGQ stripe {i} (payload bit {pos}): mode field {mode[i]} is "
                                f"reserved (defined: {sorted(_MODES)}): corrupted payload")
        pos += _MODE_BITS
        if mode[i] != SgqMode.BASE.value:
            offset[i] = field(pos, _OFFSET_BITS)
            shift[i] = field(pos + _OFFSET_BITS, _SHIFT_BITS)
            start[i] = pos + _HEADER_BITS
            pos += _HEADER_BITS + length * int(lut[mode[i]])
    if pos > len(bits):
        raise ProtocolError(f"SGQ payload of {len(payload)} bytes is truncated: its stripes need "
                            f"{-(-pos // 8)} bytes")
    if -(-pos // 8) != len(payload):
        raise ProtocolError(f"SGQ payload has {len(payload)} bytes, its stripes need "
                            f"{-(-pos // 8)}")
    out = np.full((n_stripes, length), base, np.int64)
    for m in SGQ_MODE_BITS:
        sel = np.flatnonzero(mode == m.value)
        if not len(sel):
            continue
        width = SGQ_MODE_BITS[m]
        idx = start[sel, None, None] + np.arange(length)[:, None] * width + np.arange(width)
        q = bits[idx] @ (1 << np.arange(width))
        out[sel] = base + offset[sel, None] + (q << shift[sel, None])
    i8 = np.iinfo(np.int8)
    return np.clip(out, i8.min, i8.max).astype(np.int8).reshape(count, cols)


def significance_order(q: np.ndarray) -> tuple[int, ...]:
    """Channels by decreasing mean |value| over calibration features ``(N, C, H, W)`` (ties by
    index): channels of like range end up in the same group."""
    mean = np.abs(np.asarray(q, np.float64)).mean(axis=(0, 2, 3))
    return tuple(int(c) for c in np.lexsort((np.arange(len(mean)), -mean)))


def _chunks(n: int, per: int):
    for start in range(0, n, per):
        yield start, min(n, start + per)


def reconstruction_error(values: np.ndarray, stripe_len: int, max_shift: int,
                         column_weights: np.ndarray | None = None) -> float:
    """Sum of squared errors of one group's values after SGQ at ``max_shift`` (section 8: the
    decoded value of a coded stripe is ``lo + q 2^s`` clamped to INT8, BASE stripes decode to
    the base), each word column's errors weighted by ``column_weights`` (default 1)."""
    base, mode, lo, shift = sgq_stripe_modes(values, stripe_len, max_shift)
    if len(mode) == 0:
        return 0.0
    stripes = values.reshape(len(mode), -1).astype(np.int64)
    half = (np.int64(1) << shift) >> 1
    q = (stripes - lo[:, None] + half[:, None]) >> shift[:, None]
    rec = np.clip(lo[:, None] + (q << shift[:, None]), -128, 127)
    rec = np.where((mode == 0)[:, None], base, rec)
    sq = ((rec - stripes) ** 2).reshape(-1, values.shape[1])
    if column_weights is not None:
        return float(sq.sum(axis=0) @ column_weights)
    return float(sq.sum())


def _group_costs(plan: SgqPlan, q: np.ndarray, config: AccelConfig, weights=None):
    """Per group and shift: response bits on the wire and squared error (weighted per channel
    by ``weights``), over the batch ``q``."""
    groups = plan.layout(q)
    per = plan.chunk_samples(config) * plan.words_per_sample
    bits = np.zeros((plan.groups, MAX_SHIFT + 1))
    err = np.zeros((plan.groups, MAX_SHIFT + 1))
    for j, words in enumerate(groups):
        cw = None
        if weights is not None:  # word column k holds channel order[j*g + k % g]
            chans = list(plan.order[j * plan.group:(j + 1) * plan.group])
            w = np.array([weights[c] for c in chans] + [0.0] * (plan.group - len(chans)))
            cw = np.tile(w, plan.positions_per_word)
        for s in range(MAX_SHIFT + 1):
            for a, b in _chunks(len(words), per):
                chunk = words[a:b]
                bits[j, s] += 8 * sgq_response_length(
                    config, sgq_payload_bytes(chunk, plan.stripe_len, s))
                err[j, s] += reconstruction_error(chunk, plan.stripe_len, s, cw)
    return bits, err


def _allocate(bits: np.ndarray, err: np.ndarray, limit: float) -> tuple[np.ndarray, float] | None:
    """Per-group shifts with total bits <= ``limit`` and little total error: the Lagrangian
    choice ``argmin err + lambda bits`` at the smallest feasible ``lambda`` (bisected), then the
    bits left over spent greedily where they buy the most error. ``None`` when infeasible."""
    rows = np.arange(len(bits))

    def choose(lam):
        return np.argmin(err + lam * bits, axis=1)

    def total(choice):
        return bits[rows, choice].sum()

    if total(choose(0.0)) <= limit:
        choice = choose(0.0)
    else:
        lo, hi = 0.0, 1.0
        while total(choose(hi)) > limit:
            hi *= 4
            if hi > 1e12:
                return None
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if total(choose(mid)) <= limit else (mid, hi)
        choice = choose(hi)
    while True:  # spend what is left: the best error drop per extra bit that still fits
        left = limit - total(choice)
        gain = err[rows, choice][:, None] - err
        cost = bits - bits[rows, choice][:, None]
        ok = (gain > 0) & (cost <= left)
        if not ok.any():
            break
        rate = np.where(ok, gain / np.maximum(cost, 1e-9), -np.inf)
        j, s = np.unravel_index(np.argmax(rate), rate.shape)
        choice[j] = s
    return choice, float(err[rows, choice].sum())


def allocate(plan: SgqPlan, q: np.ndarray, config: AccelConfig,
             budget_bits: float | None, weights: np.ndarray | None = None) -> SgqPlan:
    """``plan`` with per-group shifts that meet ``budget_bits`` on the batch ``q`` itself with
    the least squared error, each channel's weighted by ``weights`` (its significance; default
    1) — the driver sees the features before the device encodes them. A batch that cannot meet
    the budget gets every group's largest shift (the fewest bits there are)."""
    if budget_bits is None:
        return plan.with_shifts((0,) * plan.groups)
    bits, err = _group_costs(plan, np.asarray(q), config, weights)
    pick = _allocate(bits, err, budget_bits * np.asarray(q).size)
    return plan.with_shifts(pick[0] if pick is not None else (MAX_SHIFT,) * plan.groups)


def calibrate(q: np.ndarray, config: AccelConfig, budget_bits: float | None,
              order: tuple[int, ...] | None = None,
              weights: np.ndarray | None = None) -> SgqPlan:
    """The plan for INT8 features ``q (N, C, H, W)`` that meets ``budget_bits`` (wire bits per
    feature value, SGQ responses included) with the least squared error (each channel's weighted
    by ``weights``, default 1), over every group size and stripe height the hardware allows.
    ``budget_bits=None``: lossless (every shift 0), the layout with the fewest bytes.

    Raises
    ------
    BudgetError
        When no plan meets the budget (names the budget and the fewest bits reached).
    """
    q = np.asarray(q)
    n, c, h, w = q.shape
    order = tuple(order) if order is not None else significance_order(q)
    values = q.size
    best, fewest = None, math.inf
    for group in [g for g in range(config.cols, 0, -1) if config.cols % g == 0]:
        for rows in [r for r in range(1, h + 1) if h % r == 0]:
            try:
                plan = SgqPlan(c, h, w, config.cols, order, group, rows,
                               (0,) * -(-c // group))
            except ShapeError:
                continue  # this layout cannot hold the feature map
            bits, err = _group_costs(plan, q, config, weights)
            fewest = min(fewest, bits[:, -1].sum() / values)
            if budget_bits is None:
                pick = (np.zeros(plan.groups, int), err[:, 0].sum())
                score = bits[:, 0].sum()
            else:
                pick = _allocate(bits, err, budget_bits * values)
                if pick is None:
                    continue
                score = pick[1]
            if best is None or score < best[0]:
                best = (score, plan.with_shifts(pick[0]))
    if best is None:
        raise BudgetError(f"SGQ budget {budget_bits} bits per value cannot be met on features "
                          f"(N={n}, C={c}, H={h}, W={w}): the fewest reached is {fewest:.3f} "
                          f"bits per value (every group at max_shift {MAX_SHIFT})")
    return best[1]


def encode_program(plan: SgqPlan, q: np.ndarray, config: AccelConfig) -> tuple[Program, list]:
    """The program that SGQ-encodes the INT8 feature batch ``q (N, C, H, W)`` on the device, and
    the per-SGQ ``(group, first sample, last sample, count)`` it emits, in program order."""
    groups = plan.layout(q)
    per = plan.chunk_samples(config)
    wps = plan.words_per_sample
    prog, emitted = Program(config), []
    for a, b in _chunks(q.shape[0], per):
        count = (b - a) * wps
        for j, words in enumerate(groups):
            prog.load(Buffer.OUT, j * per * wps, words[a * wps:b * wps])
        for j in range(plan.groups):
            prog.sgq(j * per * wps, count, plan.stripe_len, plan.shifts[j])
            emitted.append((j, a, b, count))
    return prog, emitted


def decode_responses(plan: SgqPlan, payloads: list[bytes], emitted: list, n: int) -> np.ndarray:
    """The payloads of :func:`encode_program`'s SGQs -> ``int8 (N, C, H, W)``."""
    if len(payloads) != len(emitted):
        raise ShapeError(f"SGQ decode: {len(payloads)} payloads for {len(emitted)} instructions")
    words = [np.zeros((n * plan.words_per_sample, plan.cols), np.int8)
             for _ in range(plan.groups)]
    wps = plan.words_per_sample
    for payload, (j, a, b, count) in zip(payloads, emitted, strict=True):
        words[j][a * wps:b * wps] = decode_payload(payload, count, plan.cols, plan.stripe_len)
    return plan.unlayout(words, n)
