"""Lowering of one INT8 GEMM onto the accelerator: tiling, buffer allocation, schedule.

``C[M, N] = A[M, K] @ B[K, N]`` (INT8 x INT8 -> INT32), then either per-channel requantization to
INT8 (forward pass) or the raw INT32 accumulators (backward pass, ``out="int32"``).

Tiles: an *m-tile* is ``mb`` array row blocks, an *n-tile* ``nb`` column blocks, a *k-tile* ``kt``
K steps. INP, WGT, ACC, OUT and PARAM are split in two slots each (double buffering), and the
instructions are emitted software-pipelined so the hardware's in-order dispatcher overlaps them:

    LOAD(g0)  GEMM(g0)  [drain(s-1)]  LOAD(g1)  GEMM(g1)  [drain]  LOAD(g2) ...

where ``g`` walks the GEMM k-tiles of every step (an (m-tile, n-tile) pair) and ``drain`` is the
REQUANT + STORE of a finished step. The LOAD of the next tile streams in while the GEMM of the
current one computes; the drain of step ``s-1`` runs in the requant and store units while step
``s`` computes (with the compact implementation profile the hardware runs them one at a time
instead). The plan is chosen by an instruction-level model of the configuration's profile
(:func:`estimate_cycles`), accurate to within the fixed latencies of each instruction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import DTypeError, ShapeError
from ..hw.config import AccelConfig
from ..hw.gemm_unit import drain_group
from ..hw.isa import COUNT_BITS, INSTR_BYTES, Buffer
from ..hw.requant import RequantSerial

__all__ = ["GemmPlan", "plan_gemm", "lower_gemm", "GemmLowering", "EXACT_K_MAX"]

#: The longest k of one GEMM instruction (its 16-bit ``k`` field).
K_FIELD_MAX = 2 ** COUNT_BITS - 1
#: The longest K whose every partial sum of INT8 x INT8 products fits INT32: |a*b| <= 2^14.
EXACT_K_MAX = (2 ** 31 - 1) // 2 ** 14


@dataclass(frozen=True)
class GemmPlan:
    """Tile sizes and buffer slots of one GEMM on one configuration."""
    M: int
    N: int
    K: int
    mb: int  # row blocks per m-tile
    nb: int  # column blocks per n-tile
    kt: int  # K steps per k-tile
    out: str  # "int8" (requantized) or "int32" (raw accumulators)
    rows: int
    cols: int
    est_cycles: int = 0

    @property
    def m_blocks(self) -> int:
        return math.ceil(self.M / self.rows)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.N / self.cols)

    @property
    def m_tiles(self) -> int:
        return math.ceil(self.m_blocks / self.mb)

    @property
    def n_tiles(self) -> int:
        return math.ceil(self.n_blocks / self.nb)

    @property
    def k_tiles(self) -> int:
        return math.ceil(self.K / self.kt)

    @property
    def macs(self) -> int:
        """MACs the array performs (padded blocks included)."""
        return self.m_blocks * self.rows * self.n_blocks * self.cols * self.K

    # Slot bases: two slots per buffer, each sized for the largest tile.
    def inp_slot(self, s: int) -> int:
        return (s % 2) * self.mb * self.kt

    def wgt_slot(self, s: int) -> int:
        return (s % 2) * self.nb * self.kt

    def acc_slot(self, s: int) -> int:
        return (s % 2) * self.mb * self.nb * self.rows

    def out_slot(self, s: int) -> int:
        return (s % 2) * self.mb * self.nb * self.rows

    def param_slot(self, s: int) -> int:
        return (s % 2) * self.nb

    def steps(self):
        """(step index, m-tile, n-tile) in execution order: n-tiles outer, m-tiles inner."""
        s = 0
        for jn in range(self.n_tiles):
            for im in range(self.m_tiles):
                yield s, im, jn
                s += 1

    def tile_extent(self, index: int, per_tile: int, total: int) -> int:
        return min(per_tile, total - index * per_tile)


def _fits(config: AccelConfig, mb: int, nb: int, kt: int, out: str) -> list[str]:
    """The buffers a tiling overflows (two slots each), as 'BUF needs N words (B bytes), has D
    words (E bytes)' strings."""
    need = {
        Buffer.INP: 2 * mb * kt,
        Buffer.WGT: 2 * nb * kt,
        Buffer.ACC: 2 * mb * nb * config.rows,
        Buffer.PARAM: 2 * nb if out == "int8" else 0,
        Buffer.OUT: 2 * mb * nb * config.rows if out == "int8" else 0,
    }
    short = []
    for buf, n in need.items():
        depth, word = config.depth(buf), config.word_bytes(buf)
        if n > depth:
            short.append(f"{buf.name} needs {n} words ({n * word} bytes), "
                         f"has {depth} words ({depth * word} bytes)")
    return short


def _longest_k_tile(config: AccelConfig, mb: int, nb: int) -> int:
    """The longest k-tile whose two INP and two WGT slots fit beside ``mb`` x ``nb`` blocks, and
    that one GEMM's 16-bit ``k`` field holds (0 when not even one K step fits)."""
    return min(config.depth(Buffer.INP) // (2 * mb), config.depth(Buffer.WGT) // (2 * nb),
               K_FIELD_MAX)


def _candidates(n: int, limit: int) -> list[int]:
    values = {n} | {1 << e for e in range(max(n, 1).bit_length())}
    return sorted(v for v in values if 1 <= v <= min(n, limit))


def _schedule(plan: GemmPlan, config: AccelConfig):
    """Yield the instruction stream of ``plan`` in emission order, as tuples:

    ``("load", buf, slot, key)``, ``("gemm", step, im, jn, kk, inp_slot, wgt_slot)``,
    ``("drain", step, im, jn, param_slot)``. A load goes to the slot the previous GEMM did not
    use, so it overlaps that GEMM; a tile already resident is not loaded again.
    """
    gemms = [(s, im, jn, kk) for s, im, jn in plan.steps() for kk in range(plan.k_tiles)]
    content = {Buffer.INP: [None, None], Buffer.WGT: [None, None], Buffer.PARAM: [None, None]}
    last = {Buffer.INP: 1, Buffer.WGT: 1, Buffer.PARAM: 1}
    slots = {}

    def place(buf, key, ops):
        if key in content[buf]:
            slot = content[buf].index(key)
        else:
            slot = 1 - last[buf]
            content[buf][slot] = key
            ops.append(("load", buf, slot, key))
        last[buf] = slot
        return slot

    def loads_for(g):
        s, im, jn, kk = g
        ops = []
        islot = place(Buffer.INP, ("A", im, kk), ops)
        wslot = place(Buffer.WGT, ("B", jn, kk), ops)
        pslot = place(Buffer.PARAM, ("P", jn), ops) if plan.out == "int8" and kk == 0 else None
        slots[g] = (islot, wslot, pslot)
        return ops

    yield from loads_for(gemms[0])
    pending = None  # the finished step whose drain is emitted after the next step's first GEMM
    step_pslot = {}
    for n, g in enumerate(gemms):
        s, im, jn, kk = g
        islot, wslot, pslot = slots[g]
        if kk == 0:
            step_pslot[s] = pslot
        yield ("gemm", s, im, jn, kk, islot, wslot)
        # The previous step drains while this one computes; it must come before the next loads,
        # which may reuse the PARAM slot it reads.
        if kk == 0 and pending is not None:
            yield ("drain",) + pending
            pending = None
        if n + 1 < len(gemms):
            yield from loads_for(gemms[n + 1])
        if kk == plan.k_tiles - 1:
            pending = (s, im, jn, step_pslot[s])
    yield ("drain",) + pending


def estimate_cycles(plan: GemmPlan, config: AccelConfig) -> int:
    """Cycles of the plan on ``config``, following its implementation profile (``config.impl``).

    An instruction-level model of the in-order dispatcher without fixed latencies (decode,
    pipeline fill): the host input stream carries every instruction word and LOAD beat, one
    beat per cycle; each unit takes its work time, which the profile sets:

    - GEMM: ``kt`` steps per block, plus ``rows * cols / group`` idle cycles between blocks
      without the shadow bank (:func:`~tinyaccel.hw.gemm_unit.drain_group`);
    - REQUANT: a cycle per lane group of each ACC word (``cols / requant_lanes`` groups), or
      :attr:`RequantSerial.INTERVAL <tinyaccel.hw.requant.RequantSerial.INTERVAL>` (141)
      cycles each with ``serial_requant``;
    - STORE: a beat per cycle, or every other cycle in the exclusive design.

    With ``overlap`` the units run concurrently: an instruction starts when its unit and the
    buffer slots it uses are free, and the next instruction streams in meanwhile. Without
    (exclusive issue) every instruction waits until all units are idle, and a GEMM or REQUANT
    leaves the decoder only when it is done, so the next instruction word streams in after it.
    """
    impl = config.impl
    exclusive = impl.exclusive
    beat = config.beat_bytes
    instr = INSTR_BYTES // beat
    blocks = plan.mb * plan.nb
    gap = 0 if impl.shadow else (config.rows * config.cols
                                 // drain_group(config, shadow=impl.shadow, exclusive=exclusive))
    gemm_cycles = blocks * plan.kt + (blocks - 1) * gap
    rq_group = RequantSerial.INTERVAL if impl.serial_requant else 1
    store_beat = 2 if exclusive else 1
    t_dec = 0  # decoder (and host input stream) free
    unit_free = {"gemm": 0, "requant": 0, "store": 0}
    slot_ready: dict = {}  # (buf, slot) -> time its last writer/reader finishes
    out_words = plan.mb * plan.nb * config.rows

    def all_idle():
        return max(unit_free.values()) if exclusive else 0

    for op in _schedule(plan, config):
        if op[0] == "load":
            _, buf, slot, key = op
            words = {Buffer.INP: plan.mb * plan.kt, Buffer.WGT: plan.nb * plan.kt,
                     Buffer.PARAM: plan.nb}[buf]
            data = words * config.word_bytes(buf) // beat
            if exclusive:
                t_dec = max(t_dec + instr, all_idle()) + data
            else:
                start = max(t_dec, slot_ready.get((buf, slot), 0))
                t_dec = start + instr + data
            slot_ready[(buf, slot)] = t_dec
        elif op[0] == "gemm":
            _, s, im, jn, kk, islot, wslot = op
            start = max(t_dec + instr, unit_free["gemm"], slot_ready.get((Buffer.INP, islot), 0),
                        slot_ready.get((Buffer.WGT, wslot), 0),
                        slot_ready.get((Buffer.ACC, s % 2), 0), all_idle())
            end = start + gemm_cycles
            t_dec = end if exclusive else start
            unit_free["gemm"] = end
            for key in ((Buffer.INP, islot), (Buffer.WGT, wslot), (Buffer.ACC, s % 2)):
                slot_ready[key] = end
        else:
            _, s, im, jn, pslot = op
            acc_ready = slot_ready.get((Buffer.ACC, s % 2), 0)
            if plan.out == "int8":
                start = max(t_dec + instr, unit_free["requant"], acc_ready,
                            slot_ready.get((Buffer.OUT, s % 2), 0), all_idle())
                rq_end = start + out_words * config.cols // config.requant_lanes * rq_group
                t_dec = rq_end if exclusive else start
                unit_free["requant"] = rq_end
                slot_ready[(Buffer.ACC, s % 2)] = rq_end
                store_words, word_bytes, src = out_words, config.word_bytes(Buffer.OUT), rq_end
            else:
                store_words, word_bytes, src = out_words, config.word_bytes(Buffer.ACC), acc_ready
            start = max(t_dec + instr, unit_free["store"], src, all_idle())
            t_dec = start
            end = start + store_words * word_bytes // beat * store_beat
            unit_free["store"] = end
            slot_ready[(Buffer.OUT if plan.out == "int8" else Buffer.ACC, s % 2)] = end
    return max([t_dec] + list(unit_free.values()))


@functools.lru_cache(maxsize=512)
def plan_gemm(config: AccelConfig, M: int, N: int, K: int, out: str = "int8") -> GemmPlan:
    """Choose tile sizes for an M x N x K GEMM that fit ``config`` and minimize modelled cycles.

    Any K is planned: K is split into k-tiles (at most the 16-bit ``k`` field each, and as long
    as two INP and two WGT slots hold) whose GEMMs accumulate into the same ACC block; the
    block is requantized (or stored) only after its last k-tile.

    Every partial sum of ``K <= EXACT_K_MAX`` (131071) products of INT8 values fits INT32, so
    up to there the result is exact for any operands. Beyond, the accumulate of a k-tile that
    leaves INT32 saturates (``sat32``) and sets the sticky ``acc_saturated`` flag of the status
    record (docs/architecture.md, GEMM); the result then is no longer the exact product, and
    :func:`tinyaccel.sw.gemm_run.run_gemms` raises instead of returning it.

    Raises
    ------
    ShapeError
        When a dimension is not positive, or no tiling fits: then a buffer cannot hold the two
        slots of one 1 x 1 block with k = 1, and the message names it with the words and
        bytes it needs and has.
    """
    for name, value in (("M", M), ("N", N), ("K", K)):
        if not isinstance(value, int) or value <= 0:
            raise ShapeError(f"GEMM {name}={value!r} must be a positive int")
    if out not in ("int8", "int32"):
        raise ShapeError(f"GEMM out={out!r} must be 'int8' or 'int32'")
    short = _fits(config, 1, 1, 1, out)
    if short:
        raise ShapeError(f"GEMM {M}x{N}x{K} ({out}) does not fit configuration "
                         f"{config.name!r} even with 1x1 blocks and k=1: {'; '.join(short)}")
    R, C = config.rows, config.cols
    m_blocks, n_blocks = math.ceil(M / R), math.ceil(N / C)
    best = None

    def consider(mb: int, nb: int, kt: int) -> None:
        nonlocal best
        plan = GemmPlan(M, N, K, mb, nb, kt, out, R, C)
        cycles = estimate_cycles(plan, config)
        if best is None or cycles < best.est_cycles:
            best = GemmPlan(M, N, K, mb, nb, kt, out, R, C, cycles)

    k_limit = min(K, K_FIELD_MAX)
    for ks in range(1, 65):
        kt = math.ceil(k_limit / ks) if ks > 1 or K <= k_limit else k_limit
        for nb in _candidates(n_blocks, 255):
            # Only the three largest m-tiles that fit: smaller ones only add per-tile overhead.
            fitting = [mb for mb in _candidates(m_blocks, 255)
                       if not _fits(config, mb, nb, kt, out)]
            for mb in fitting[-3:]:
                consider(mb, nb, kt)
        if best is not None and ks >= 4:
            break
    if best is None:
        # Long K: even 64 equal k-tiles are longer than the INP/WGT slots. Each tiling that fits
        # gets the longest k-tile its slots hold, evened out over the k-tiles it needs; again
        # only the three largest m-tiles that fit.
        for nb in _candidates(n_blocks, 255):
            fitting = [mb for mb in _candidates(m_blocks, 255)
                       if _longest_k_tile(config, mb, nb) and not _fits(config, mb, nb, 1, out)]
            for mb in fitting[-3:]:
                kt_max = _longest_k_tile(config, mb, nb)
                consider(mb, nb, math.ceil(K / math.ceil(K / kt_max)))
    return best


class GemmLowering:
    """The instruction stream of one planned GEMM and the reassembly of its results."""

    def __init__(self, config: AccelConfig, plan: GemmPlan):
        self.config = config
        self.plan = plan
        self._drains: list[tuple[int, int]] = []  # (im, jn) of each STORE, in order

    def emit(self, program, a: np.ndarray, b: np.ndarray, params=None) -> None:
        """Append the GEMM to ``program``.

        ``a``: int8 (M, K); ``b``: int8 (K, N); ``params``: per-output-channel requant
        parameters for N channels (required when ``plan.out == 'int8'``) as a dict of arrays
        with the :class:`~tinyaccel.hw.isa.ChannelParams` field names.
        """
        from ..protocol import channel_params_words
        plan, cfg = self.plan, self.config
        R, C = cfg.rows, cfg.cols
        for name, arr, shape in (("A", a, (plan.M, plan.K)), ("B", b, (plan.K, plan.N))):
            if arr.dtype != np.int8:
                raise DTypeError(f"GEMM operand {name} has dtype {arr.dtype}, expected int8")
            if arr.shape != shape:
                raise ShapeError(f"GEMM operand {name} has shape {arr.shape}, planned {shape}")
        Mp, Np = plan.m_blocks * R, plan.n_blocks * C
        a_pad = np.zeros((Mp, plan.K), np.int8)
        a_pad[:plan.M] = a
        b_pad = np.zeros((plan.K, Np), np.int8)
        b_pad[:, :plan.N] = b
        # A blocks transposed: a_blk[i, t, r] = A[i*R + r, t] (INP word layout).
        a_blk = a_pad.reshape(plan.m_blocks, R, plan.K).transpose(0, 2, 1)
        b_blk = b_pad.reshape(plan.K, plan.n_blocks, C).transpose(1, 0, 2)  # [j, t, c]
        if plan.out == "int8":
            if params is None:
                raise ShapeError("GEMM with out='int8' needs requant params for its "
                                 f"{plan.N} output channels")
            pwords = channel_params_words(params, plan.N, plan.n_blocks * C, C)
        self._drains = []
        for op in _schedule(plan, cfg):
            if op[0] == "load":
                _, buf, slot, key = op
                if buf == Buffer.INP:
                    _, im, kk = key
                    i0, k0 = im * plan.mb, kk * plan.kt
                    tile = a_blk[i0:i0 + plan.mb, k0:k0 + plan.kt]
                    program.load(Buffer.INP, plan.inp_slot(slot), tile.reshape(-1, R))
                elif buf == Buffer.WGT:
                    _, jn, kk = key
                    j0, k0 = jn * plan.nb, kk * plan.kt
                    tile = b_blk[j0:j0 + plan.nb, k0:k0 + plan.kt]
                    program.load(Buffer.WGT, plan.wgt_slot(slot), tile.reshape(-1, C))
                else:
                    _, jn = key
                    j0 = jn * plan.nb
                    program.load(Buffer.PARAM, plan.param_slot(slot),
                                 pwords[j0:j0 + plan.nb])
            elif op[0] == "gemm":
                _, s, im, jn, kk, islot, wslot = op
                mb = plan.tile_extent(im, plan.mb, plan.m_blocks)
                nb = plan.tile_extent(jn, plan.nb, plan.n_blocks)
                kt = plan.tile_extent(kk, plan.kt, plan.K)
                # Tiles are packed with block stride kt (a short last k-tile packs tighter).
                program.gemm(inp_addr=plan.inp_slot(islot), wgt_addr=plan.wgt_slot(wslot),
                             acc_addr=plan.acc_slot(s), k=kt, m_blocks=mb, n_blocks=nb,
                             accumulate=int(kk > 0))
            else:
                _, s, im, jn, pslot = op
                mb = plan.tile_extent(im, plan.mb, plan.m_blocks)
                nb = plan.tile_extent(jn, plan.nb, plan.n_blocks)
                words = mb * nb * R
                if plan.out == "int8":
                    for blk in range(mb * nb):
                        program.requant(acc_addr=plan.acc_slot(s) + blk * R,
                                        out_addr=plan.out_slot(s) + blk * R,
                                        param_addr=plan.param_slot(pslot) + blk % nb, count=R)
                    program.store(Buffer.OUT, plan.out_slot(s), words)
                else:
                    program.store(Buffer.ACC, plan.acc_slot(s), words)
                self._drains.append((im, jn, mb, nb))

    @property
    def store_count(self) -> int:
        """Number of STORE responses :meth:`collect` takes (after :meth:`emit`)."""
        return len(self._drains)

    def collect(self, stores: list[np.ndarray]) -> np.ndarray:
        """Reassemble the STORE responses (in program order) into the (M, N) result."""
        plan, R, C = self.plan, self.config.rows, self.config.cols
        dtype = np.int8 if plan.out == "int8" else np.int32
        result = np.zeros((plan.m_blocks * R, plan.n_blocks * C), dtype)
        if len(stores) != len(self._drains):
            raise ShapeError(f"GEMM expected {len(self._drains)} STORE responses, "
                             f"got {len(stores)}")
        for (im, jn, mb, nb), words in zip(self._drains, stores, strict=True):
            blocks = np.asarray(words).reshape(mb, nb, R, C)
            r0, c0 = im * plan.mb * R, jn * plan.nb * C
            result[r0:r0 + mb * R, c0:c0 + nb * C] = blocks.transpose(0, 2, 1, 3).reshape(
                mb * R, nb * C)
        return result[:plan.M, :plan.N]


def lower_gemm(config: AccelConfig, program, a: np.ndarray, b: np.ndarray, params=None,
               out: str = "int8") -> GemmLowering:
    """Plan and emit ``a @ b`` into ``program``; return the lowering for :meth:`collect`."""
    plan = plan_gemm(config, a.shape[0], b.shape[1], a.shape[1], out)
    lowering = GemmLowering(config, plan)
    lowering.emit(program, a, b, params)
    return lowering
