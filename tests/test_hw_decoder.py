# amaranth: UnusedElaboratable=no
"""DecoderParallel and DecoderSerial: the decode-time verdicts against the golden model's
check_instruction (the rules of hw/decode_rules.RULES evaluated on integers, so the rules are not
restated here), LOAD data pass-through, and the access sets that hazard detection relies on
(hand-derived from the units' accesses). The PASS instructions and fields are drawn on
configurations with the PASS unit (DecoderParallel only: the serial decoder is built only
without it) and without it (rejected)."""

import dataclasses

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import FULL, seed_from_env, small_config

from tinyaccel.errors import ConfigError
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.decode_rules import (
    RULES,
    GateInRange,
    InRange,
    PixelFits,
    StridedInRange,
    TensorInRange,
    extent_value,
    gate_span,
    limit_value,
    strided_span,
    tensor_span,
)
from tinyaccel.hw.decoder import DecoderParallel
from tinyaccel.hw.decoder_serial import DecoderSerial
from tinyaccel.hw.isa import INSTR_BYTES, Buffer, Opcode, Status, operand_fields
from tinyaccel.protocol import data_length, decode_fields, encode_fields
from tinyaccel.sim.golden import check_instruction


def _field_max(name: str, opcode: Opcode = Opcode.IM2COL) -> int:
    """The largest value operand ``name`` holds (from the layout: the ISA may narrow it)."""
    return next(f for f in operand_fields(opcode) if f.name == name).mask

def random_word(cfg, rng) -> int:
    """A random instruction word whose fields sit near the limits the checks care about."""
    code = int(rng.integers(16)) if rng.random() < 0.1 else int(rng.integers(len(Opcode)))
    word = code
    if code >= len(Opcode):
        return word | int(rng.integers(1 << 60)) << 4
    op = Opcode(code)
    fields = {}
    for info in operand_fields(op):
        limit = {"buf": 8, "k": 40, "m_blocks": 5, "n_blocks": 5, "blocks": 5,
                 "count": 40, "stripe_len": 6, "out_gap": 4,
                 # IM2COL: small shapes, so that its ranges sit near the depths, and whole
                 # patches often enough for tiled
                 "src": 40, "dst": 70, "pitch": 4, "channels": 12, "in_h": 7, "in_w": 7,
                 "kh": 4, "kw": 4, "stride": 3, "dilation": 3, "oy0": 9, "out_w": 9,
                 "mask_word": cfg.depth(Buffer.MASK) + 1}.get(info.name)
        if info.name.endswith("addr"):
            limit = 70
        if info.name == "mask_idx":
            limit = cfg.mask_bits + 4
        if op == Opcode.LOAD and info.name == "count":
            limit = 6
        if op == Opcode.DILATE:  # MASK bit indices and small grids (empty ones too)
            limit = {"src": cfg.mask_bits + 4, "dst": cfg.mask_bits + 4, "in_h": 9, "in_w": 9,
                     "out_h": 9, "out_w": 9}.get(info.name)
        value = int(rng.integers(limit)) if limit else int(rng.integers(1 << info.width))
        if rng.random() < 0.05 and not (op == Opcode.LOAD and info.name == "count"):
            value = int(rng.integers(1 << info.width))  # (LOAD data stays short)
        fields[info.name] = value & info.mask
    if op == Opcode.IM2COL and rng.random() < 0.5:  # whole patches, tiled (and often gated)
        ph, pw = cfg.patch_shape
        fields.update(tiled=1, in_h=fields["in_h"] // ph * ph, oy0=fields["oy0"] // ph * ph,
                      in_w=fields["in_w"] // pw * pw, out_w=fields["out_w"] // pw * pw)
    if op == Opcode.DILATE and rng.random() < 0.3:  # src and dst near each other
        fields["dst"] = max(0, min(fields["src"] + int(rng.integers(-80, 80)),
                                   (1 << 12) - 1))
    return encode_fields(op, **fields)


def at_a_limit(cfg, word: int, rng) -> int:
    """``word`` with one of its range checks (hw/decode_rules.RULES) moved to the boundary:
    ``base + span`` one below, at or one above the limit (the off-by-one cases); or, for
    IM2COL, ``channels`` one below, at or one above what fits a pixel (PixelFits)."""
    code, f = decode_fields(word)
    if code >= len(Opcode):
        return word
    op = Opcode(code)
    moved = [rule for rule in RULES[op]
             if isinstance(rule, (InRange, StridedInRange, TensorInRange, PixelFits,
                                  GateInRange))]
    if not moved or (op in (Opcode.LOAD, Opcode.STORE) and f["buf"] >= len(Buffer)):
        return word
    rule = moved[int(rng.integers(len(moved)))]
    width = {info.name: info.width for info in operand_fields(op)}
    delta = int(rng.integers(-1, 2))
    if isinstance(rule, PixelFits):
        room = cfg.cols >> f["pack"] if f["pack"] else f["pitch"] * cfg.cols
        field, value = "channels", room + delta
    elif isinstance(rule, GateInRange):  # (IM2COL: whole patches, and m_blocks moved)
        f["gate"] = 1
        if op == Opcode.REQUANT:
            field = "mask_idx"
        else:
            ph, pw = cfg.patch_shape
            f.update(tiled=1, in_h=f["in_h"] // ph * ph, oy0=f["oy0"] // ph * ph,
                     in_w=f["in_w"] // pw * pw, out_w=f["out_w"] // pw * pw)
            f["mask_word"] = min(f["mask_word"], cfg.depth(Buffer.MASK) - 1)
            field = "m_blocks"
        f[field] = 0
        first, n = gate_span(cfg, op, f)
        value = cfg.mask_bits - first - n + delta
    else:
        if getattr(rule, "when", None) is not None:
            f[rule.when] = 1
        if getattr(rule, "unless", None) is not None:
            f[rule.unless] = 0
        if isinstance(rule, StridedInRange):
            span = strided_span(f[rule.count], f[rule.gap])
        elif isinstance(rule, TensorInRange):
            span = tensor_span(f)
        else:
            span = extent_value(cfg, rule.extent, f)
        field, value = rule.base, limit_value(cfg, rule.limit, f) - span + delta
    if not 0 <= value < 1 << width[field]:
        return word
    return encode_fields(op, **{**f, field: value})


def edge_words(cfg) -> list[int]:
    """Hand-picked IM2COL and strided REQUANT words: zero fields, huge products (which must not
    wrap around), PixelFits with every ``pack``, ranges exactly at the depth and one past."""
    inp, out = cfg.depth(Buffer.INP), cfg.depth(Buffer.OUT)
    base = dict(src=0, dst=0, pitch=1, channels=cfg.cols, in_h=2, in_w=3, kh=1, kw=1, stride=1,
                dilation=1, pad_top=0, pad_left=0, pad_value=0, oy0=0, out_w=3, m_blocks=1,
                pack=0)
    big = dict(base, pitch=63, channels=min(63 * cfg.cols, _field_max("channels")), kh=31,
               kw=31, m_blocks=255)
    words = [encode_fields(Opcode.IM2COL, **base),
             encode_fields(Opcode.IM2COL, **big),  # 255*31*31*channels INP words
             encode_fields(Opcode.IM2COL, **dict(big, m_blocks=0)),  # (no INP word: legal)
             encode_fields(Opcode.IM2COL, **dict(big, m_blocks=0, dst=inp)),
             encode_fields(Opcode.IM2COL, **dict(big, m_blocks=0, dst=inp + 1)),
             encode_fields(Opcode.IM2COL, **dict(base, in_h=255, in_w=255)),
             encode_fields(Opcode.IM2COL, **dict(base, in_h=255, in_w=255, pitch=0)),
             encode_fields(Opcode.IM2COL, **{name: 0 for name in base}),
             encode_fields(Opcode.IM2COL, **dict(big, channels=0, pitch=0, stride=0))]
    for name in base:  # each field 0 alone
        words.append(encode_fields(Opcode.IM2COL, **dict(base, **{name: 0})))
    for pack in range(4):
        for delta in (-1, 0, 1):
            room = cfg.cols >> pack if pack else 2 * cfg.cols
            fields = dict(base, pack=pack, pitch=2, channels=max(0, room + delta), in_h=5, in_w=3)
            pixel_words = -(-15 >> pack) * 2
            words.append(encode_fields(Opcode.IM2COL, **fields))
            words.append(encode_fields(Opcode.IM2COL, **dict(
                fields, channels=1, src=out - pixel_words + delta)))
    words.append(encode_fields(Opcode.IM2COL, **dict(big, pool=1)))  # 255*252 words pooled
    k = 2 * 3 * cfg.cols
    for delta in (-1, 0, 1):  # 2 blocks of a 2x3 window, cols channels: 2k words
        words.append(encode_fields(Opcode.IM2COL, **dict(base, kh=2, kw=3, m_blocks=2,
                                                         dst=inp - 2 * k + delta)))
        # pooled: 2 blocks of cols words, whatever the window
        for pool in (0, 1):
            words.append(encode_fields(Opcode.IM2COL, **dict(
                base, kh=2, kw=3, m_blocks=2, pool=pool, dst=inp - 2 * cfg.cols + delta)))
        words.append(encode_fields(Opcode.IM2COL, **dict(
            big, pool=1, m_blocks=1, channels=cfg.cols, dst=inp - cfg.cols + delta)))
    for count, gap in ((0, 0), (0, 63), (1, 63), (3, 5), (cfg.depth(Buffer.ACC), 0),
                       (2, 63), (40000, 63)):
        for delta in (-1, 0, 1):
            words.append(encode_fields(Opcode.REQUANT, acc_addr=0, param_addr=0, count=count,
                                       out_gap=gap,
                                       out_addr=max(0, out - strided_span(count, gap) + delta)))
    return words


def pass_edge_words(cfg) -> list[int]:
    """Hand-picked PASS words: PATCH tiles exactly at the OUT depth and one past, touching and
    overlapping; DILATE masks exactly at mask_bits and one past, touching, overlapping by one
    bit, empty grids (an empty range overlaps nothing); IM2COL gate without tiled, tiled with
    each field one off its patch side, the gate's MASK bits exactly at mask_bits and one past;
    REQUANT's gate likewise. Rejected (ILLEGAL_OPCODE, BAD_FIELD) without the PASS unit."""
    out, bits, rows = cfg.depth(Buffer.OUT), cfg.mask_bits, cfg.rows
    ph, pw = cfg.patch_shape
    words = []
    patch = dict(new_addr=0, ref_addr=8, k=2, blocks=3, threshold=1, mask_idx=0)
    for delta in (-1, 0, 1):
        words += [encode_fields(Opcode.PATCH, **dict(patch, ref_addr=out - 6 + delta)),
                  encode_fields(Opcode.PATCH, **dict(patch, new_addr=out - 6 + delta)),
                  encode_fields(Opcode.PATCH, **dict(patch, ref_addr=6 + delta)),  # touching
                  encode_fields(Opcode.PATCH, **dict(patch, new_addr=14 + delta)),
                  encode_fields(Opcode.PATCH, **dict(patch, mask_idx=bits - 3 + delta,
                                                     given=1, merge=1))]
    words += [encode_fields(Opcode.PATCH, **dict(patch, k=0)),
              encode_fields(Opcode.PATCH, **dict(patch, blocks=0, ref_addr=0)),  # empty
              encode_fields(Opcode.PATCH, **dict(patch, blocks=0, new_addr=out + 1))]
    dil = dict(src=0, dst=64, in_h=4, in_w=6, out_h=2, out_w=3, kh=3, kw=3, stride_y=2,
               stride_x=2, pad_top=1, pad_left=1, merge=0)
    for delta in (-1, 0, 1):
        words += [encode_fields(Opcode.DILATE, **dict(dil, src=bits - 24 + delta)),
                  encode_fields(Opcode.DILATE, **dict(dil, dst=bits - 6 + delta)),
                  encode_fields(Opcode.DILATE, **dict(dil, dst=24 + delta)),  # after src
                  encode_fields(Opcode.DILATE, **dict(dil, src=70 + delta)),  # after dst
                  encode_fields(Opcode.DILATE, **dict(dil, src=0, dst=delta % 4, out_h=0)),
                  encode_fields(Opcode.DILATE, **dict(dil, src=delta % 4, dst=0, in_w=0)),
                  encode_fields(Opcode.DILATE, **dict(dil, in_h=0, out_w=0, src=bits + delta,
                                                      dst=bits + delta))]
    for name in ("kh", "kw", "stride_y", "stride_x"):
        words.append(encode_fields(Opcode.DILATE, **dict(dil, **{name: 0}, dst=0)))
    words.append(encode_fields(Opcode.DILATE, **dict(dil, in_h=255, in_w=255, out_h=255,
                                                     out_w=255)))
    # IM2COL: one block of a 1x1 window on one whole patch
    ic = dict(src=0, dst=0, pitch=1, channels=1, in_h=ph, in_w=pw, kh=1, kw=1, stride=1,
              dilation=1, pad_top=0, pad_left=0, pad_value=0, oy0=0, out_w=pw, m_blocks=1,
              pack=0, tiled=1, gate=1, mask_word=0)
    words += [encode_fields(Opcode.IM2COL, **ic),
              encode_fields(Opcode.IM2COL, **dict(ic, tiled=0)),  # gate without tiled
              encode_fields(Opcode.IM2COL, **dict(ic, gate=0)),
              encode_fields(Opcode.IM2COL, **dict(ic, tiled=0, gate=0))]
    for name, side in (("in_h", ph), ("oy0", ph), ("in_w", pw), ("out_w", pw)):
        for value in (side - 1, side + 1, 2 * side):
            words.append(encode_fields(Opcode.IM2COL, **dict(ic, **{name: value})))
    first = 2 * ph * (2 * pw) // rows  # oy0 = 2*ph rows of a 2*pw wide output
    for delta in (-1, 0, 1):
        for mask_word in (0, (bits - first - 10) // 64, bits // 64 - 1):
            m_blocks = bits - mask_word * 64 - first + delta
            if 0 <= m_blocks < 256:
                words.append(encode_fields(Opcode.IM2COL, **dict(
                    ic, oy0=2 * ph, out_w=2 * pw, mask_word=mask_word, m_blocks=m_blocks)))
        words.append(encode_fields(Opcode.IM2COL, **dict(ic, mask_word=bits // 64 + delta)))
    words.append(encode_fields(Opcode.IM2COL, **dict(ic, oy0=255 // ph * ph,
                                                     out_w=255 // pw * pw, m_blocks=255)))
    rq = dict(acc_addr=0, out_addr=0, param_addr=0, count=3 * rows + 1, out_gap=0, gate=1)
    for delta in (-1, 0, 1):
        words += [encode_fields(Opcode.REQUANT, **dict(rq, mask_idx=bits - 4 + delta)),
                  encode_fields(Opcode.REQUANT, **dict(rq, count=3 * rows,
                                                       mask_idx=bits - 3 + delta))]
    words.append(encode_fields(Opcode.REQUANT, **dict(rq, count=0, mask_idx=bits)))
    words.append(encode_fields(Opcode.REQUANT, **dict(rq, count=0, mask_idx=bits + 1)))
    return words


def expected_access(cfg, word):
    """{(buffer, 'r'|'w'): (lo, hi)} of a legal instruction (hw/hazards.py semantics): what the
    units read and write, in words; a MASK access (MASK operands count bits) is the whole MASK
    buffer, PATCH's two OUT reads the hull of both."""
    code, f = decode_fields(word)
    op = Opcode(code)
    whole_mask = (0, cfg.depth(Buffer.MASK))
    if op in (Opcode.LOAD, Opcode.STORE):
        kind = "w" if op == Opcode.LOAD else "r"
        return {(Buffer(f["buf"]), kind): (f["addr"], f["addr"] + f["count"])}
    if op == Opcode.GEMM:
        mb, nb, k = f["m_blocks"], f["n_blocks"], f["k"]
        acc = (f["acc_addr"], f["acc_addr"] + mb * nb * cfg.rows)
        out = {(Buffer.INP, "r"): (f["inp_addr"], f["inp_addr"] + mb * k),
               (Buffer.WGT, "r"): (f["wgt_addr"], f["wgt_addr"] + nb * k),
               (Buffer.ACC, "w"): acc}
        if f["accumulate"]:
            out[Buffer.ACC, "r"] = acc
        if f["gate"]:
            out[Buffer.MASK, "r"] = (0, cfg.depth(Buffer.MASK))
        return out
    if op == Opcode.REQUANT:
        n = f["count"]
        out = {(Buffer.ACC, "r"): (f["acc_addr"], f["acc_addr"] + n),
               (Buffer.PARAM, "r"): (f["param_addr"], f["param_addr"] + 1),
               (Buffer.OUT, "w"): (f["out_addr"], f["out_addr"] + strided_span(n, f["out_gap"]))}
        if f["gate"]:
            out[Buffer.MASK, "r"] = whole_mask
        return out
    if op == Opcode.PATCH:  # reads both tiles, writes the reference, reads+writes the bits
        n = f["blocks"] * f["k"]
        new, ref = f["new_addr"], f["ref_addr"]
        return {(Buffer.OUT, "r"): (min(new, ref), max(new, ref) + n),
                (Buffer.OUT, "w"): (ref, ref + n),
                (Buffer.MASK, "r"): whole_mask, (Buffer.MASK, "w"): whole_mask}
    if op == Opcode.DILATE:
        return {(Buffer.MASK, "r"): whole_mask, (Buffer.MASK, "w"): whole_mask}
    if op == Opcode.SGQ:
        return {(Buffer.OUT, "r"): (f["out_addr"], f["out_addr"] + f["count"])}
    if op == Opcode.IM2COL:
        n = f["m_blocks"] * f["channels"] * (1 if f["pool"] else f["kh"] * f["kw"])
        out = {(Buffer.OUT, "r"): (f["src"], f["src"] + tensor_span(f)),
               (Buffer.INP, "w"): (f["dst"], f["dst"] + n)}
        if f["gate"]:
            out[Buffer.MASK, "r"] = whole_mask
        return out
    return {}


#: The configurations each design is built for: the serial one only without the PASS unit.
CONFIGS = {
    "tiny": lambda: small_config(),  # compact: no PASS unit
    "ice40": lambda: PRESETS["ice40"],
    "tiny-full": lambda: small_config(impl=FULL),  # 1x2 patches
    "tiny-nopass": lambda: small_config(impl=dataclasses.replace(FULL, pass_unit=False)),
    "ecp5": lambda: PRESETS["ecp5"],  # 2x4 patches
    "sim": lambda: dataclasses.replace(PRESETS["sim"], inp_depth=256, out_depth=128,
                                       acc_depth=128, mask_bits=256),  # 4x4 patches
}


@pytest.mark.parametrize("serial, name", [
    (False, "tiny"), (False, "ice40"), (False, "tiny-full"), (False, "tiny-nopass"),
    (False, "ecp5"), (False, "sim"), (True, "tiny"), (True, "ice40")])
def test_decoder_checks_random(name, serial):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    cfg = CONFIGS[name]()
    words = [random_word(cfg, rng) for _ in range(300)]
    words = [at_a_limit(cfg, word, rng) if rng.random() < 0.3 else word for word in words]
    words += edge_words(cfg) + pass_edge_words(cfg)
    bb = cfg.beat_bytes
    dut = (DecoderSerial if serial else DecoderParallel)(cfg, access=not serial)
    got = []
    fed = False

    async def feeder(ctx):
        nonlocal fed
        for word in words:
            stream = word.to_bytes(INSTR_BYTES, "little") + bytes(data_length(cfg, word))
            for i in range(0, len(stream), bb):
                ctx.set(dut.i_stream.valid, 1)
                ctx.set(dut.i_stream.payload, int.from_bytes(stream[i:i + bb], "little"))
                await ctx.tick().until(dut.i_stream.ready)
            ctx.set(dut.i_stream.valid, 0)
        fed = True

    async def taker(ctx):
        ctx.set(dut.o_instr.ready, 1)
        ctx.set(dut.o_data.ready, 1)
        data_beats = 0
        async for _, _, valid, payload, dvalid in ctx.tick().sample(
                dut.o_instr.valid, dut.o_instr.payload, dut.o_data.valid):
            data_beats += dvalid
            if valid:
                got.append((payload, data_beats))
                data_beats = 0
            if len(got) == len(words) and fed:  # (the last LOAD's data forwarded too)
                return

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feeder, background=True)
    sim.add_testbench(taker)
    sim.run()

    data_seen = [beats for _, beats in got[1:]] + [None]
    for n, (word, (d, _)) in enumerate(zip(words, got, strict=True)):
        where = f"seed {seed}, word {n} {word:#034x}"
        fault = check_instruction(cfg, word)  # the expected verdict: status, operand, why
        want = Status.OK if fault is None else fault.status
        assert d.status == want, (f"{where}: status {d.status}, expected {want}" +
                                  ("" if fault is None else
                                   f" for operand {fault.field}: {fault.message}"))
        assert d.word.as_value().value == word, where
        if data_seen[n] is not None:
            assert data_seen[n] * bb == data_length(cfg, word), f"{where}: data beats forwarded"
        if fault is None and not serial:
            want_access = expected_access(cfg, word)
            for buf in Buffer:
                for kind in "rw":
                    r = d.access[buf.name.lower()][kind]
                    if (buf, kind) in want_access:
                        assert (r.en, r.lo, r.hi) == (1, *want_access[buf, kind]), \
                            f"{where}: access {buf.name}.{kind}"
                    else:
                        assert not r.en, f"{where}: unexpected access {buf.name}.{kind}"


def decode_cycles(cfg, dut, word) -> tuple[int, Status]:
    """Cycles from the instruction's last beat to its offer, and the status offered."""
    bb = cfg.beat_bytes
    result = []

    async def tb(ctx):
        stream = word.to_bytes(INSTR_BYTES, "little")
        ctx.set(dut.o_instr.ready, 1)
        for i in range(0, len(stream), bb):
            ctx.set(dut.i_stream.valid, 1)
            ctx.set(dut.i_stream.payload, int.from_bytes(stream[i:i + bb], "little"))
            await ctx.tick().until(dut.i_stream.ready)
        ctx.set(dut.i_stream.valid, 0)
        n = 0
        while not ctx.get(dut.o_instr.valid):
            await ctx.tick()
            n += 1
        result.append((n, Status(ctx.get(dut.o_instr.payload.status))))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return result[0]


@pytest.mark.parametrize("serial", [False, True])
def test_decoder_im2col_cycles(serial):
    """IM2COL decode time: DecoderParallel within its documented 25 cycles for the widest
    fields, DecoderSerial within its documented bound (6 cycles a term plus the iterations: at
    most INP depth + 1 for the window, in_h for the tensor words, pitch for the tensor); the
    verdicts those of the golden model."""
    cfg = small_config()
    inp = cfg.depth(Buffer.INP)
    widest = dict(src=0, dst=0, pitch=63, channels=1, in_h=255, in_w=255, kh=15, kw=15,
                  stride=1, dilation=1, pad_top=0, pad_left=0, pad_value=0, oy0=0, out_w=1,
                  m_blocks=255, pack=0)
    legal = dict(widest, pitch=1, channels=2, in_h=4, in_w=4, kh=3, kw=3, m_blocks=1)
    bound = 25 if not serial else 1 + 4 * 6 + (inp + 1) + 255 + 63 + 1
    for fields in (widest, legal, dict(widest, pool=1), dict(legal, pool=1)):
        word = encode_fields(Opcode.IM2COL, **fields)
        fault = check_instruction(cfg, word)
        dut = (DecoderSerial if serial else DecoderParallel)(cfg, access=not serial)
        cycles, status = decode_cycles(cfg, dut, word)
        print(f"{type(dut).__name__} {fields}: {cycles} cycles, {status.name}")
        assert status == (Status.OK if fault is None else fault.status), fields
        assert cycles <= bound, f"{fields}: {cycles} cycles, documented bound {bound}"


def test_serial_decoder_has_no_pass_unit():
    """DecoderSerial is built only without the PASS unit (Implementation forbids pass_unit with
    serial_decode; building it for a profile with the PASS unit is an error, not a decoder that
    silently lacks the PASS checks)."""
    with pytest.raises(ConfigError, match="DecoderSerial has no PASS checks"):
        DecoderSerial(small_config(impl=FULL), access=False)
    DecoderSerial(small_config(), access=False)  # compact: fine


#: DecoderParallel's documented worst cases (its `_checks` docstring), in cycles from the last
#: beat to the offer.
PASS_DECODE_BOUND = {Opcode.DILATE: 11, Opcode.PATCH: 11, Opcode.IM2COL: 25}


@pytest.mark.parametrize("name", ["ecp5", "sim"])
def test_decoder_pass_cycles(name):
    """DecoderParallel's decode time of the PASS instructions at their widest fields (every
    multiplier bit set: the most shift-and-add iterations), within the documented bounds; the
    verdicts those of the golden model."""
    cfg = CONFIGS[name]()
    ph, pw = cfg.patch_shape
    dilate = dict(src=0, dst=0, in_h=255, in_w=255, out_h=255, out_w=255, kh=7, kw=7,
                  stride_y=3, stride_x=3, pad_top=3, pad_left=3, merge=1)
    patch = dict(new_addr=0, ref_addr=0, k=65535, blocks=255, threshold=255, mask_idx=0,
                 merge=1, given=1)
    im2col = dict(src=0, dst=0, pitch=63, channels=_field_max("channels"), in_h=255 // ph * ph,
                  in_w=255 // pw * pw, kh=31, kw=31, stride=7, dilation=7, pad_top=7,
                  pad_left=7, pad_value=0, oy0=255 // ph * ph, out_w=255 // pw * pw,
                  m_blocks=255, pack=0, pool=0, tiled=1, gate=1, mask_word=63)
    legal_im2col = dict(im2col, pitch=1, channels=2, in_h=2 * ph, in_w=2 * pw, kh=3, kw=3,
                        stride=1, dilation=1, pad_top=1, pad_left=1, oy0=ph, out_w=2 * pw,
                        m_blocks=1, mask_word=0)
    cases = [(Opcode.DILATE, dilate), (Opcode.DILATE, dict(dilate, in_h=8, in_w=8, out_h=4,
                                                           out_w=4, dst=64)),
             (Opcode.PATCH, patch), (Opcode.PATCH, dict(patch, k=2, blocks=4, ref_addr=8)),
             (Opcode.IM2COL, im2col), (Opcode.IM2COL, legal_im2col)]
    for op, fields in cases:
        word = encode_fields(op, **fields)
        fault = check_instruction(cfg, word)
        cycles, status = decode_cycles(cfg, DecoderParallel(cfg), word)
        print(f"{name} {op.name} {fields}: {cycles} cycles, {status.name}")
        assert status == (Status.OK if fault is None else fault.status), fields
        assert cycles <= PASS_DECODE_BOUND[op], f"{op.name}: {cycles} cycles"
