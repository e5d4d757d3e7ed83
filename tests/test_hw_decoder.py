"""DecoderParallel and DecoderSerial: the decode-time verdicts against the golden model's
check_instruction (the rules of hw/decode_rules.RULES evaluated on integers, so the rules are not
restated here), LOAD data pass-through, and the access sets that hazard detection relies on."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from hw_tb import seed_from_env, small_config

from tinyaccel.hw.decode_rules import RULES, InRange, extent_value, limit_value
from tinyaccel.hw.decoder import DecoderParallel
from tinyaccel.hw.decoder_serial import DecoderSerial
from tinyaccel.hw.isa import INSTR_BYTES, Buffer, Opcode, Status, operand_fields
from tinyaccel.protocol import data_length, decode_fields, encode_fields
from tinyaccel.sim.golden import check_instruction


def random_word(cfg, rng) -> int:
    """A random instruction word whose fields sit near the limits the checks care about."""
    code = int(rng.integers(16)) if rng.random() < 0.1 else int(rng.integers(8))
    word = code
    if code >= len(Opcode):
        return word | int(rng.integers(1 << 60)) << 4
    for info in operand_fields(Opcode(code)):
        limit = {"buf": 8, "k": 40, "m_blocks": 5, "n_blocks": 5, "blocks": 5,
                 "count": 40, "stripe_len": 6}.get(info.name)
        if info.name.endswith("addr"):
            limit = 70
        if info.name == "mask_idx":
            limit = cfg.mask_bits + 4
        if code == Opcode.LOAD.value and info.name == "count":
            limit = 6
        value = int(rng.integers(limit)) if limit else int(rng.integers(1 << info.width))
        if rng.random() < 0.05 and not (code == Opcode.LOAD.value and info.name == "count"):
            value = int(rng.integers(1 << info.width))  # (LOAD data stays short)
        word |= (value & info.mask) << info.offset
    return word


def at_a_limit(cfg, word: int, rng) -> int:
    """``word`` with one of its range checks (hw/decode_rules.RULES) moved to the boundary:
    ``base + extent`` one below, at or one above the limit (the off-by-one cases)."""
    code, f = decode_fields(word)
    if code >= len(Opcode):
        return word
    op = Opcode(code)
    ranges = [rule for rule in RULES[op] if isinstance(rule, InRange)]
    if not ranges or (op in (Opcode.LOAD, Opcode.STORE) and f["buf"] >= len(Buffer)):
        return word
    rule = ranges[int(rng.integers(len(ranges)))]
    if rule.when is not None:
        f[rule.when] = 1
    base = (limit_value(cfg, rule.limit, f) - extent_value(cfg, rule.extent, f) +
            int(rng.integers(-1, 2)))
    width = {info.name: info.width for info in operand_fields(op)}[rule.base]
    if not 0 <= base < 1 << width:
        return word
    return encode_fields(op, **{**f, rule.base: base})


def expected_access(cfg, word):
    """{(buffer, 'r'|'w'): (lo, hi)} of a legal instruction (hw/hazards.py semantics)."""
    code, f = decode_fields(word)
    op = Opcode(code)
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
        return {(Buffer.ACC, "r"): (f["acc_addr"], f["acc_addr"] + n),
                (Buffer.PARAM, "r"): (f["param_addr"], f["param_addr"] + 1),
                (Buffer.OUT, "w"): (f["out_addr"], f["out_addr"] + n)}
    if op == Opcode.PATCH:
        n = f["blocks"] * f["k"]
        new, ref = f["new_addr"], f["ref_addr"]
        whole = (0, cfg.depth(Buffer.MASK))
        return {(Buffer.INP, "r"): (min(new, ref), max(new, ref) + n),
                (Buffer.INP, "w"): (ref, ref + n),
                (Buffer.MASK, "r"): whole, (Buffer.MASK, "w"): whole}
    if op == Opcode.SGQ:
        return {(Buffer.OUT, "r"): (f["out_addr"], f["out_addr"] + f["count"])}
    return {}


@pytest.mark.parametrize("serial", [False, True])
def test_decoder_checks_random(serial):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    cfg = small_config()
    words = [random_word(cfg, rng) for _ in range(300)]
    words = [at_a_limit(cfg, word, rng) if rng.random() < 0.3 else word for word in words]
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
