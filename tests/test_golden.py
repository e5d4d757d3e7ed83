"""Golden machine, program level: byte streams in, response bytes out, per the contract."""

import re
import zlib

import numpy as np
import pytest

from tinyaccel.errors import AddressError, FieldError, OpcodeError, ProtocolError, ShapeError
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import LINK_TRAILER_BYTES, Buffer, Counter, Instruction, Opcode, Status
from tinyaccel.protocol import (
    PARAM_DTYPE,
    Program,
    StatusReport,
    encode_fields,
    parse_responses,
    response_length,
    sgq_response_length,
)
from tinyaccel.sim.golden import GoldenMachine, check_instruction
from tinyaccel.sim.numerics import requantize
from tinyaccel.sim.randprog import (
    UNDEFINED_BUFFERS,
    UNDEFINED_OPCODES,
    corner_programs,
    random_channel_params,
    random_program,
    random_words,
    seed_from_env,
)
from tinyaccel.sw.sgq import decode_payload

SIM, ICE40 = PRESETS["sim"], PRESETS["ice40"]
CONFIGS = list(PRESETS.values())
I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1


@pytest.fixture
def rng():
    return np.random.default_rng(seed_from_env())


def int8(rng, shape):
    """Random INT8 with the extremes -128 and 127 over-represented."""
    x = rng.integers(-128, 128, shape)
    pick = rng.random(shape)
    x[pick < 0.1] = -128
    x[pick > 0.9] = 127
    return x.astype(np.int8)


def run(cfg, prog, machine=None, strict=False):
    machine = machine or GoldenMachine(cfg)
    return parse_responses(cfg, prog, machine.run(prog.to_bytes(), strict=strict)), machine


def syncs(responses):
    return [r for r in responses if isinstance(r, StatusReport)]


# -- section 4 layouts, written out element by element -----------------------------------------

def inp_words(a, rows):
    """INP word i*k + t, lane r = A[i*rows + r, t]."""
    m, k = a.shape
    words = np.zeros((m // rows * k, rows), np.int8)
    for i in range(m // rows):
        for t in range(k):
            for r in range(rows):
                words[i * k + t, r] = a[i * rows + r, t]
    return words


def wgt_words(b, cols):
    """WGT word j*k + t, lane c = B[t, j*cols + c]."""
    k, n = b.shape
    words = np.zeros((n // cols * k, cols), np.int8)
    for j in range(n // cols):
        for t in range(k):
            words[j * k + t] = b[t, j * cols:(j + 1) * cols]
    return words


def acc_matrix(words, mb, nb, rows, cols):
    """C[i*rows + r, j*cols + c] = ACC word (i*n_blocks + j)*rows + r, lane c."""
    c = np.zeros((mb * rows, nb * cols), words.dtype)
    for i in range(mb):
        for j in range(nb):
            for r in range(rows):
                c[i * rows + r, j * cols:(j + 1) * cols] = words[(i * nb + j) * rows + r]
    return c


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_load_gemm_requant_store_matches_numpy(cfg, rng):
    rows, cols = cfg.rows, cfg.cols
    mb, nb = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    k = int(rng.integers(1, 40))
    a, b = int8(rng, (mb * rows, k)), int8(rng, (k, nb * cols))
    ia, wa = int(rng.integers(0, 50)), int(rng.integers(0, 50))
    aa = int(rng.integers(0, cfg.acc_depth - mb * nb * rows + 1))
    oa = int(rng.integers(0, cfg.out_depth - mb * nb * rows + 1))
    pa = int(rng.integers(0, cfg.param_depth - nb + 1))
    params = random_channel_params(rng, (nb, cols))
    prog = Program(cfg).load(Buffer.INP, ia, inp_words(a, rows))
    prog.load(Buffer.WGT, wa, wgt_words(b, cols)).load(Buffer.PARAM, pa, params)
    prog.gemm(ia, wa, aa, k, mb, nb).store(Buffer.ACC, aa, mb * nb * rows)
    for i in range(mb):
        for j in range(nb):
            blk = (i * nb + j) * rows
            prog.requant(aa + blk, oa + blk, pa + j, rows)
    prog.store(Buffer.OUT, oa, mb * nb * rows)
    prog.gemm(ia, wa, aa, k, mb, nb, accumulate=True).store(Buffer.ACC, aa, mb * nb * rows)
    r, _ = run(cfg, prog.sync(counters=True))
    expect = a.astype(np.int64) @ b.astype(np.int64)
    assert np.array_equal(acc_matrix(r[4], mb, nb, rows, cols), expect)
    assert np.array_equal(acc_matrix(r[-2], mb, nb, rows, cols), 2 * expect)
    out = acc_matrix(r[-4], mb, nb, rows, cols)
    for j in range(nb):  # each N block uses its own PARAM word, channel c its own lane
        p = params[j]
        want = requantize(expect[:, j * cols:(j + 1) * cols].astype(np.int32),
                          *(p[name] for name in PARAM_DTYPE.names))
        assert np.array_equal(out[:, j * cols:(j + 1) * cols], want)
    assert r[-1].ok and not r[-1].acc_saturated


def test_block_layout_single_products(rng):
    cfg = ICE40
    rows, cols, mb, nb, k = cfg.rows, cfg.cols, 3, 2, 4
    ia, wa, aa = 7, 11, 5
    for _ in range(10):
        i, r, t = (int(rng.integers(n)) for n in (mb, rows, k))
        j, c = int(rng.integers(nb)), int(rng.integers(cols))
        m = GoldenMachine(cfg)
        inp = np.zeros((mb * k, rows), np.int8)
        inp[i * k + t, r] = 3  # A[i*rows + r, t]
        wgt = np.zeros((nb * k, cols), np.int8)
        wgt[j * k + t, c] = -5  # B[t, j*cols + c]
        m.load_buffer(Buffer.INP, ia, inp)
        m.load_buffer(Buffer.WGT, wa, wgt)
        m.execute(Instruction(Opcode.GEMM, inp_addr=ia, wgt_addr=wa, acc_addr=aa, k=k,
                              m_blocks=mb, n_blocks=nb))
        acc = m.read_buffer(Buffer.ACC, 0, cfg.acc_depth)
        expect = np.zeros_like(acc)
        expect[aa + (i * nb + j) * rows + r, c] = -15
        assert np.array_equal(acc, expect), (i, r, t, j, c)


def test_gated_gemm_skips_blocks_and_counts(rng):
    cfg = SIM
    rows, cols, mb, nb, k = cfg.rows, cfg.cols, 4, 2, 5
    m = GoldenMachine(cfg)
    a = random_words(cfg, Buffer.INP, mb * k, rng)
    w = random_words(cfg, Buffer.WGT, nb * k, rng)
    old = random_words(cfg, Buffer.ACC, mb * nb * rows, rng)
    mask = np.zeros((64, 64), bool)
    mask[1, [3, 5]] = True  # mask bits 67 and 69: blocks i = 1 and 3 of mask_idx 66
    for buf, arr in ((Buffer.INP, a), (Buffer.WGT, w), (Buffer.ACC, old), (Buffer.MASK, mask)):
        m.load_buffer(buf, 0, arr)
    m.execute(Instruction(Opcode.GEMM, k=k, m_blocks=mb, n_blocks=nb, gate=1, mask_idx=66))
    acc = m.read_buffer(Buffer.ACC, 0, mb * nb * rows).reshape(mb, nb, rows, cols)
    full = acc_matrix(old, mb, nb, rows, cols).copy()
    dense = a.reshape(mb, k, rows).transpose(0, 2, 1).reshape(-1, k).astype(np.int64) @ \
        w.reshape(nb, k, cols).transpose(1, 0, 2).reshape(k, -1).astype(np.int64)
    for i in (1, 3):
        full[i * rows:(i + 1) * rows] = dense[i * rows:(i + 1) * rows]
    assert np.array_equal(acc_matrix(acc.reshape(-1, cols), mb, nb, rows, cols), full)
    assert m.counters[Counter.MACS_ISSUED] == 2 * nb * rows * cols * k
    assert m.counters[Counter.MACS_SKIPPED] == 2 * nb * rows * cols * k


# -- errors (section 5) ------------------------------------------------------------------------

D = SIM.depth
FAULTS = [
    # name, append the fault, status, opcode code, strict exception, message pattern
    ("illegal_opcode", lambda p: p.raw(13 | 0xABCDEF << 40), Status.ILLEGAL_OPCODE, 13,
     OpcodeError, r"opcode=13 is not defined"),
    ("load_bad_buffer", lambda p: p.raw(encode_fields(Opcode.LOAD, buf=UNDEFINED_BUFFERS[0],
                                                      count=2)),
     Status.BAD_BUFFER, 1, FieldError, rf"LOAD: buf={UNDEFINED_BUFFERS[0]} is not a Buffer"),
    ("store_bad_buffer", lambda p: p.raw(encode_fields(Opcode.STORE, buf=UNDEFINED_BUFFERS[-1],
                                                       count=2)),
     Status.BAD_BUFFER, 2, FieldError, rf"STORE: buf={UNDEFINED_BUFFERS[-1]}"),
    ("load_range", lambda p: p.load(Buffer.INP, D(Buffer.INP) - 1, np.ones((2, 16), np.int8)),
     Status.ADDR_RANGE, 1, AddressError,
     r"LOAD: addr 8191 \+ count 2 = 8193 exceeds INP depth 8192"),
    ("store_range", lambda p: p.store(Buffer.ACC, D(Buffer.ACC), 2), Status.ADDR_RANGE, 2,
     AddressError, r"STORE: addr 8192 \+ count 2 = 8194 exceeds ACC depth 8192"),
    ("gemm_inp_range", lambda p: p.gemm(8000, 0, 0, 256, m_blocks=2), Status.ADDR_RANGE, 3,
     AddressError, r"^GEMM: inp_addr 8000 \+ m_blocks\*k 512 = 8512 exceeds INP depth 8192"),
    ("gemm_acc_range", lambda p: p.gemm(0, 0, 8000, 1, 4, 4), Status.ADDR_RANGE, 3,
     AddressError, r"acc_addr 8000 \+ m_blocks\*n_blocks\*rows 256 = 8256"),
    ("gemm_mask_range", lambda p: p.gemm(0, 0, 0, 1, m_blocks=3, gate=True, mask_idx=4094),
     Status.ADDR_RANGE, 3, AddressError, r"mask_idx 4094 \+ m_blocks 3 = 4097 exceeds mask_bits"),
    ("gemm_k0", lambda p: p.gemm(0, 0, 0, 0), Status.BAD_SHAPE, 3, ShapeError, r"GEMM: k=0"),
    ("requant_param_range", lambda p: p.requant(0, 0, D(Buffer.PARAM), 1), Status.ADDR_RANGE,
     4, AddressError, r"REQUANT: param_addr 64 \+ 1 1 = 65 exceeds PARAM depth 64"),
    ("patch_overlap", lambda p: p.patch(10, 12, 2, 2, 0), Status.BAD_FIELD, 5, FieldError,
     r"PATCH: new range 10\.\.13 overlaps ref range 12\.\.15"),
    ("patch_k0", lambda p: p.patch(10, 12, 0, 2, 0), Status.BAD_SHAPE, 5, ShapeError,
     r"PATCH: k=0"),
    ("patch_out_range", lambda p: p.patch(0, D(Buffer.OUT) - 1, 2, 1, 0), Status.ADDR_RANGE, 5,
     AddressError, r"PATCH: ref_addr 8191 \+ blocks\*k 2 = 8193 exceeds OUT depth 8192"),
    ("dilate_overlap", lambda p: p.dilate(0, 3, in_h=2, in_w=2, out_h=1, out_w=1, kh=1, kw=1),
     Status.BAD_FIELD, 9, FieldError, r"DILATE: src range 0\.\.3 overlaps dst range 3\.\.3"),
    ("dilate_kh0", lambda p: p.dilate(0, 8, in_h=2, in_w=2, out_h=1, out_w=1, kh=0, kw=1),
     Status.BAD_SHAPE, 9, ShapeError, r"DILATE: kh=0"),
    ("dilate_range", lambda p: p.dilate(0, 4090, in_h=2, in_w=2, out_h=2, out_w=4, kh=1, kw=1),
     Status.ADDR_RANGE, 9, AddressError, r"DILATE: dst 4090 \+ out_h\*out_w 8 = 4098"),
    ("im2col_gate_untiled", lambda p: p.im2col(0, 0, channels=1, in_h=4, in_w=4, kh=1, kw=1,
                                               out_w=4, m_blocks=1, gate=True),
     Status.BAD_FIELD, 8, FieldError, r"IM2COL: gate=1 needs tiled=1"),
    ("im2col_tiled_width", lambda p: p.im2col(0, 0, channels=1, in_h=4, in_w=6, kh=1, kw=1,
                                              out_w=4, m_blocks=1, tiled=True),
     Status.BAD_FIELD, 8, FieldError, r"IM2COL: tiled=1 needs whole 4x4 patches"),
    ("im2col_gate_range", lambda p: p.im2col(0, 0, channels=1, in_h=8, in_w=8, kh=1, kw=1,
                                             out_w=8, m_blocks=70, tiled=True, gate=True,
                                             mask_word=63, oy0=4),
     Status.ADDR_RANGE, 8, AddressError, r"IM2COL: gated MASK bits 4034\.\.4103 exceed"),
    ("requant_gate_range", lambda p: p.requant(0, 0, 0, 33, gate=True, mask_idx=4094),
     Status.ADDR_RANGE, 4, AddressError, r"REQUANT: gated MASK bits 4094\.\.4096"),
    ("sgq_stripe0", lambda p: p.sgq(0, 4, 0, 0), Status.BAD_FIELD, 6, FieldError,
     r"SGQ: stripe_len=0"),
    ("sgq_count", lambda p: p.sgq(0, 5, 2, 0), Status.BAD_SHAPE, 6, ShapeError,
     r"SGQ: count=5 is not a multiple of stripe_len=2"),
    ("sgq_range", lambda p: p.sgq(D(Buffer.OUT) - 2, 4, 2, 0), Status.ADDR_RANGE, 6,
     AddressError, r"SGQ: out_addr 8190 \+ count 4 = 8194 exceeds OUT depth 8192"),
]


def primed_machine(rng):
    m = GoldenMachine(SIM)
    for buf in Buffer:
        m.load_buffer(buf, 0, random_words(SIM, buf, 16, rng))
    return m


def snapshot(m):
    return {buf: arr.copy() for buf, arr in m.buffers.items()}


def same_buffers(a, b):
    return all(np.array_equal(a[buf], b[buf]) for buf in Buffer)


@pytest.mark.parametrize("name,fault,status,code,exc,pattern", FAULTS, ids=[f[0] for f in FAULTS])
def test_error_status_via_run(name, fault, status, code, exc, pattern, rng):
    m = primed_machine(rng)
    x = np.full((1, 16), 42, np.int8)
    prog = Program(SIM).load(Buffer.INP, 0, x)
    fault(prog)
    after = len(prog)
    prog.load(Buffer.INP, 1, np.full((1, 16), -9, np.int8))  # discarded
    prog.store(Buffer.INP, 0, 2).sgq(0, 2, 1, 0).gemm(0, 0, 0, 1).patch(0, 20, 1, 1, 0)
    prog.sync(counters=True).store(Buffer.INP, 0, 2).sync()
    expect_buffers = snapshot(m)
    expect_buffers[Buffer.INP][0] = 42
    r, m = run(SIM, prog, m)
    first, second = syncs(r)
    assert (first.status, first.error_pc, first.error_opcode) == (status, 1, code)
    assert first.instructions == len(prog) - 2
    assert first.error_opcode_name == (Opcode(code).name if code in {o.value for o in Opcode}
                                      else f"opcode {code}")
    stored = r[after + 1]
    assert stored.shape == (2, 16) and not stored.any()  # not executed: zero words
    assert r[after + 2] == b""  # not executed: zero-length SGQ
    assert same_buffers(snapshot(m), expect_buffers)  # the fault and its shadow wrote nothing
    assert second.ok and second.error_pc == 0 and second.instructions == 2  # back in sync
    assert np.array_equal(r[-2][0], x[0]) and np.array_equal(r[-2][1], expect_buffers[
        Buffer.INP][1])
    # The counters still count what crossed the link.
    stream = prog.to_bytes()
    assert first.counters[Counter.BYTES_IN] == len(stream) - 2 * 16  # the first SYNC included
    assert first.counters[Counter.INSTRUCTIONS] == len(prog) - 2
    assert first.counters[Counter.MACS_ISSUED] == 0


@pytest.mark.parametrize("name,fault,status,code,exc,pattern", FAULTS, ids=[f[0] for f in FAULTS])
def test_error_raises_in_strict_mode(name, fault, status, code, exc, pattern, rng):
    m = primed_machine(rng)
    before, counters = snapshot(m), dict(m.counters)
    prog = Program(SIM)
    fault(prog)
    instr, payload = prog[0]
    fault_info = check_instruction(SIM, instr)
    assert fault_info is not None and fault_info.status == status
    with pytest.raises(exc, match=pattern):
        m.execute(instr, payload, strict=True)
    assert same_buffers(snapshot(m), before) and m.counters == counters
    assert m.status == Status.OK  # strict mode raised instead of recording
    with pytest.raises(exc, match=pattern):
        GoldenMachine(SIM).run(prog.to_bytes(), strict=True)


def test_only_the_first_error_is_reported():
    prog = Program(SIM).nop().gemm(0, 0, 0, 0).raw(UNDEFINED_OPCODES[0]).sgq(0, 1, 0, 0).sync()
    (report,) = syncs(run(SIM, prog)[0])
    assert (report.status, report.error_pc, report.error_opcode) == (Status.BAD_SHAPE, 1, 3)
    assert report.instructions == 5


def test_bad_buffer_load_consumes_no_data():
    # An undefined buffer has no word size, so the next 16 bytes are the next instruction.
    prog = Program(SIM).raw(encode_fields(Opcode.LOAD, buf=UNDEFINED_BUFFERS[0], count=100))
    prog.sync().store(Buffer.OUT, 0, 1).sync()
    r, _ = run(SIM, prog)
    assert [s.status for s in syncs(r)] == [Status.BAD_BUFFER, Status.OK]
    assert r[2].shape == (1, 16)


# -- SGQ responses (section 8) -----------------------------------------------------------------

def _frame_by_hand(cfg, payload: bytes) -> bytes:
    """Section 8's response, restated: length, payload, zeros to a beat; CRC-32 (zlib's), zeros
    to a beat."""
    beat = cfg.beat_bytes
    body = len(payload).to_bytes(4, "little") + payload
    body += bytes(-len(body) % beat)
    return body + zlib.crc32(body).to_bytes(4, "little") + bytes(-4 % beat)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_sgq_response_bytes(cfg, rng):
    """One group with BASE, 1-, 2-, 4- and 8-bit stripes (stripes of 2 words: the low word and
    the low word + span), framed with its CRC; a skipped SGQ after a fault sends the empty frame,
    CRC included."""
    cols = cfg.cols
    spans = {0: 0, 1: 1, 2: 3, 4: 15, 8: 255}  # width -> a span it just fits at shift 0
    out = np.zeros((2 * len(spans), cols), np.int8)
    for i, (width, span) in enumerate(spans.items()):
        lo = -128 if width in (0, 8) else int(rng.integers(-128, 127 - span))
        out[2 * i], out[2 * i + 1] = lo, lo + span
    prog = Program(cfg).load(Buffer.OUT, 0, out).sgq(0, len(out), 2, 0)
    prog.sgq(0, 0, 1, 0).sync().sgq(0, 3, 2, 0).sgq(0, 2, 1, 0).sync()  # BAD_SHAPE, skipped
    raw = GoldenMachine(cfg).run(prog.to_bytes())
    r = parse_responses(cfg, prog, raw)
    # mode fields (3 bits each) of the five stripes, read at their section-8 bit offsets
    bits = int.from_bytes(r[1], "little")
    pos, modes = 8, []
    for width in spans:
        modes.append(bits >> pos & 7)
        pos += 3 + (11 + 2 * cols * width if width else 0)
    assert modes == [0, 1, 2, 3, 4] and len(r[1]) == -(-pos // 8)
    assert np.array_equal(decode_payload(r[1], len(out), cols, 2), out)  # lossless at max_shift 0
    frame, empty = _frame_by_hand(cfg, r[1]), _frame_by_hand(cfg, b"")
    assert raw.startswith(frame + empty)  # the SGQ, then the empty group
    status = syncs(r)[1]
    # error_pc counts from the last SYNC: the faulting SGQ is the first instruction after it
    assert (status.status, status.error_pc, status.error_opcode) == (Status.BAD_SHAPE, 0, 6)
    assert r[4] == b"" == r[5]  # the faulting SGQ and the skipped one: empty frames
    sync_bytes = response_length(cfg, Instruction(Opcode.SYNC))
    assert raw[len(frame) + len(empty) + sync_bytes:] == empty + empty + status.to_bytes()


# -- counters (section 10) ---------------------------------------------------------------------

def test_counters_match_formulas(rng):
    cfg = SIM
    rows, cols = cfg.rows, cfg.cols
    k1, k2, mb, nb = 7, 3, 3, 2
    mask = np.zeros((1, 64), bool)
    mask[0, 1] = True  # of blocks 0..2 at mask_idx 0, only block 1 is computed
    out = random_words(cfg, Buffer.OUT, 4, rng)
    prog = Program(cfg).load(Buffer.INP, 0, random_words(cfg, Buffer.INP, mb * k1, rng))
    prog.load(Buffer.WGT, 0, random_words(cfg, Buffer.WGT, nb * k1, rng))
    prog.load(Buffer.MASK, 0, mask).load(Buffer.OUT, 0, out)
    prog.gemm(0, 0, 0, k1, mb, nb, gate=True).gemm(0, 0, 0, k2, 1, 1).nop()
    prog.store(Buffer.ACC, 0, 5).sgq(0, 4, 2, 3).store(Buffer.MASK, 0, 1)
    prog.sync(counters=True).sync(counters=True, clear=True).sync(counters=True)
    r, _ = run(cfg, prog)
    first, second, third = syncs(r)
    data_in = mb * k1 * rows + nb * k1 * cols + 8 + 4 * cols  # LOAD data: INP WGT MASK OUT
    sgq_bytes = sgq_response_length(cfg, len(r[8]))
    out_bytes = 5 * cols * 4 + sgq_bytes + 8
    c = first.counters
    assert c[Counter.MACS_ISSUED] == rows * cols * (k1 * 1 * nb + k2)
    assert c[Counter.MACS_SKIPPED] == rows * cols * k1 * 2 * nb
    assert c[Counter.BYTES_IN] == 16 * 11 + data_in  # the reporting SYNC included
    assert c[Counter.BYTES_OUT] == out_bytes  # bytes sent before this record
    assert c[Counter.INSTRUCTIONS] == 11 and first.instructions == 11
    for timing in (Counter.CYCLES, Counter.BUSY_CYCLES, Counter.COMPUTE_CYCLES):
        assert c[timing] == 0
    c = second.counters  # reported, then cleared
    # ... and the first SYNC's response: records and link trailer
    assert c[Counter.BYTES_OUT] == out_bytes + 16 + 64 + LINK_TRAILER_BYTES
    assert c[Counter.INSTRUCTIONS] == 12 and second.instructions == 1
    assert c[Counter.BYTES_IN] == 16 * 12 + data_in
    c = third.counters
    assert (c[Counter.INSTRUCTIONS], c[Counter.BYTES_IN], c[Counter.BYTES_OUT]) == (1, 16, 0)
    assert c[Counter.MACS_ISSUED] == 0 == c[Counter.MACS_SKIPPED]
    # The SGQ payload decodes to the OUT words within half a step of max_shift 3.
    assert np.abs(decode_payload(r[8], 4, cols, 2).astype(int) - out).max() <= 4


# -- the byte stream ---------------------------------------------------------------------------

def test_truncated_stream_raises_naming_missing_bytes(rng):
    prog = Program(SIM).store(Buffer.OUT, 0, 1).load(
        Buffer.ACC, 0, random_words(SIM, Buffer.ACC, 2, rng)).sync()
    stream = prog.to_bytes()
    with pytest.raises(ProtocolError, match="10 bytes missing") as info:
        GoldenMachine(SIM).run(stream[:-10])
    assert info.value.responses == bytes(16)  # the STORE already answered
    cut = 16 + 16 + 100
    with pytest.raises(ProtocolError, match=r"data of LOAD instruction 1: 100 of 128 bytes"):
        GoldenMachine(SIM).run(stream[:cut])
    with pytest.raises(ProtocolError, match="carries 128 data bytes, got 3"):
        GoldenMachine(SIM).execute(prog[1][0], b"abc")


def test_backdoor_buffers(rng):
    m = GoldenMachine(ICE40)
    for buf in Buffer:
        words = random_words(ICE40, buf, 3, rng)
        m.load_buffer(buf, ICE40.depth(buf) - 3, words)
        assert np.array_equal(m.read_buffer(buf, ICE40.depth(buf) - 3, 3), words)
        with pytest.raises(AddressError, match=re.escape(buf.name)):
            m.read_buffer(buf, ICE40.depth(buf) - 2, 3)
    mask = np.zeros((1, 64), bool)
    mask[0, 5] = True
    m.load_buffer(Buffer.MASK, 2, mask)
    assert np.flatnonzero(m.mask).tolist().count(2 * 64 + 5) == 1


# -- PASS at the machine level -----------------------------------------------------------------

ECP5 = PRESETS["ecp5"]


def test_patch_sets_mask_updates_reference_and_merges():
    cfg = ECP5  # cols = 16
    k, blocks, new_at, ref_at = 2, 3, 0, 10
    new = np.zeros((blocks * k, cfg.cols), np.int8)
    new[1, 0] = 3  # block 0: max |diff| 3
    new[4:6, :2] = [[-10, 1], [0, 0]]  # block 2: max |diff| 10; block 1 equals its reference
    mask = np.zeros((1, 64), bool)
    mask[0, 4:7] = [True, True, False]
    prog = Program(cfg).load(Buffer.OUT, new_at, new).load(Buffer.MASK, 0, mask)
    prog.patch(new_at, ref_at, k, blocks, 3, mask_idx=4)  # changed: block 2 only
    prog.store(Buffer.MASK, 0, 1).store(Buffer.OUT, ref_at, blocks * k)
    prog.load(Buffer.MASK, 0, mask).patch(new_at, ref_at, k, blocks, 3, mask_idx=4, merge=True)
    prog.store(Buffer.MASK, 0, 1)  # nothing changed: the merged bits stay
    prog.patch(new_at, ref_at, k, blocks, 2, mask_idx=4)  # block 0 now exceeds the threshold
    prog.store(Buffer.MASK, 0, 1).store(Buffer.OUT, ref_at, blocks * k).sync()
    r, _ = run(cfg, prog)
    assert r[3][0, 4:7].tolist() == [False, False, True] and r[3].sum() == 1
    ref = np.zeros_like(new)
    ref[4:6] = new[4:6]
    assert np.array_equal(r[4], ref)
    assert r[7][0, 4:7].tolist() == [True, True, False] and r[7].sum() == 2
    assert r[9][0, 4:7].tolist() == [True, False, False] and r[9].sum() == 1
    ref[0:2] = new[0:2]
    assert np.array_equal(r[10], ref) and r[11].ok


def test_patch_given_copies_the_marked_tiles_only(rng):
    cfg = ECP5
    k, blocks = 3, 4
    new = random_words(cfg, Buffer.OUT, blocks * k, rng)
    old = random_words(cfg, Buffer.OUT, blocks * k, rng)
    mask = np.zeros((1, 64), bool)
    mask[0, 1] = mask[0, 3] = True  # tiles 0 and 2 (mask_idx 1)
    prog = Program(cfg).load(Buffer.OUT, 0, new).load(Buffer.OUT, 100, old)
    prog.load(Buffer.MASK, 0, mask).patch(0, 100, k, blocks, 0, mask_idx=1, given=True)
    prog.store(Buffer.OUT, 100, blocks * k).store(Buffer.MASK, 0, 1).sync()
    r, _ = run(cfg, prog)
    expect = old.copy()
    for b in (0, 2):
        expect[b * k:(b + 1) * k] = new[b * k:(b + 1) * k]
    assert np.array_equal(r[4], expect)
    assert np.array_equal(r[5], mask) and r[6].ok  # given: the bits are not rewritten


def _dilate_by_loops(bits, out_h, out_w, kh, kw, sy, sx, pt, pl):
    in_h, in_w = bits.shape
    result = np.zeros((out_h, out_w), bool)
    for y in range(out_h):
        for x in range(out_w):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = y * sy - pt + ky, x * sx - pl + kx
                    if 0 <= iy < in_h and 0 <= ix < in_w and bits[iy, ix]:
                        result[y, x] = True
    return result


def test_dilate_ors_the_window(rng):
    cfg = ECP5
    seed = int(rng.integers(1 << 31))
    print(f"dilate seed {seed}")
    r2 = np.random.default_rng(seed)
    for _ in range(12):
        in_h, in_w = (int(v) for v in r2.integers(1, 12, 2))
        kh, kw, sy, sx = (int(v) for v in r2.integers(1, 4, 4))
        pt, pl = (int(v) for v in r2.integers(0, 3, 2))
        out_h, out_w = (int(v) for v in r2.integers(1, 12, 2))
        bits = r2.random((in_h, in_w)) < 0.15
        old = r2.random(out_h * out_w) < 0.3
        merge = bool(r2.integers(2))
        src, dst = 0, 512
        mask = np.zeros(cfg.mask_bits, bool)
        mask[src:src + in_h * in_w] = bits.ravel()
        mask[dst:dst + out_h * out_w] = old
        prog = Program(cfg).load(Buffer.MASK, 0, mask.reshape(-1, 64))
        prog.dilate(src, dst, in_h=in_h, in_w=in_w, out_h=out_h, out_w=out_w, kh=kh, kw=kw,
                    stride_y=sy, stride_x=sx, pad_top=pt, pad_left=pl, merge=merge)
        prog.store(Buffer.MASK, 0, cfg.mask_bits // 64).sync()
        r, _ = run(cfg, prog)
        got = r[2].ravel()
        expect = _dilate_by_loops(bits, out_h, out_w, kh, kw, sy, sx, pt, pl).ravel()
        if merge:
            expect = expect | old
        assert np.array_equal(got[dst:dst + out_h * out_w], expect)
        assert np.array_equal(np.delete(got, np.s_[dst:dst + out_h * out_w]),
                              np.delete(mask, np.s_[dst:dst + out_h * out_w]))


def _tile(x, ph, pw):
    """(H, W, ...) raster -> (H*W, ...) in patch order, written out by loops (not by the code
    under test)."""
    h, w = x.shape[:2]
    order = []
    for py in range(h // ph):
        for px in range(w // pw):
            for dy in range(ph):
                for dx in range(pw):
                    order.append((py * ph + dy, px * pw + dx))
    return np.stack([x[y, xx] for y, xx in order]), order


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (1, 0)])
def test_tiled_im2col_is_the_raster_window_in_patch_order(stride, pad, rng):
    cfg = ECP5
    ph, pw = cfg.patch_shape
    h, w, c = 6, 8, 5
    out_h, out_w = (h + 2 * pad - 3) // stride + 1, (w + 2 * pad - 3) // stride + 1
    out_h, out_w = out_h - out_h % ph, out_w - out_w % pw
    x = rng.integers(-128, 128, (h, w, c)).astype(np.int8)
    words = np.zeros((h * w, cfg.cols), np.int8)
    words[:, :c] = x.reshape(h * w, c)
    tiled, _ = _tile(words.reshape(h, w, cfg.cols), ph, pw)
    n_blocks = out_h * out_w // cfg.rows
    geo = dict(channels=c, in_h=h, in_w=w, kh=3, kw=3, out_w=out_w, stride=stride,
               pad_top=pad, pad_left=pad, pad_value=-7)
    k = 9 * c
    prog = Program(cfg).load(Buffer.OUT, 0, words).load(Buffer.OUT, 100, tiled)
    prog.im2col(0, 0, m_blocks=-(-out_h * out_w // cfg.rows), **geo)
    prog.im2col(100, 2000, m_blocks=n_blocks, tiled=True, **geo)
    prog.store(Buffer.INP, 0, -(-out_h * out_w // cfg.rows) * k)
    prog.store(Buffer.INP, 2000, n_blocks * k).sync()
    r, _ = run(cfg, prog)
    assert r[-1].ok
    raster = r[4].reshape(-1, k, cfg.rows).transpose(0, 2, 1).reshape(-1, k)  # (pixel, K)
    got = r[5].reshape(n_blocks, k, cfg.rows).transpose(0, 2, 1).reshape(-1, k)
    _, order = _tile(np.zeros((out_h, out_w)), ph, pw)
    for p, (oy, ox) in enumerate(order):
        assert np.array_equal(got[p], raster[oy * out_w + ox]), (p, oy, ox)


def test_gated_im2col_and_requant_keep_skipped_blocks(rng):
    cfg = ECP5
    rows = cfg.rows
    h, w, c = 4, 16, 3  # 2 x 4 patches of 2 x 4 pixels: 8 blocks
    x = random_words(cfg, Buffer.OUT, h * w, rng)
    mask = np.zeros((4, 64), bool)
    live = [5, 6]  # patch numbers; oy0 = 2 -> block i is patch 4 + i, its bit 2*64 + 4 + i
    mask[2, live] = True
    old_inp = random_words(cfg, Buffer.INP, 8 * 9 * c, rng)
    prog = Program(cfg).load(Buffer.OUT, 0, x).load(Buffer.MASK, 0, mask)
    prog.load(Buffer.INP, 0, old_inp).load(Buffer.INP, 1000, old_inp)
    geo = dict(channels=c, in_h=h, in_w=w, kh=3, kw=3, out_w=w, pad_top=1, pad_left=1,
               tiled=True)
    prog.im2col(0, 0, m_blocks=4, oy0=2, **geo)  # patches 4..7 (the second patch row)
    prog.im2col(0, 1000, m_blocks=4, oy0=2, gate=True, mask_word=2, **geo)
    prog.store(Buffer.INP, 0, 4 * 9 * c).store(Buffer.INP, 1000, 4 * 9 * c)
    prog.sync()
    r, _ = run(cfg, prog)
    dense = r[6].reshape(4, 9 * c, rows)
    gated = r[7].reshape(4, 9 * c, rows)
    before = old_inp[:4 * 9 * c].reshape(4, 9 * c, rows)
    for i in range(4):
        want = dense[i] if 4 + i in live else before[i]
        assert np.array_equal(gated[i], want), i
    assert r[-1].ok
    # REQUANT: rows of blocks whose bit is 0 keep their OUT words
    acc = random_words(cfg, Buffer.ACC, 3 * rows, rng)
    out0 = random_words(cfg, Buffer.OUT, 3 * rows, rng)
    param = random_words(cfg, Buffer.PARAM, 1, rng)
    bits = np.zeros((1, 64), bool)
    bits[0, 10:13] = [True, False, True]
    prog = Program(cfg).load(Buffer.ACC, 0, acc).load(Buffer.OUT, 0, out0)
    prog.load(Buffer.OUT, 500, out0).load(Buffer.PARAM, 0, param).load(Buffer.MASK, 0, bits)
    prog.requant(0, 0, 0, 3 * rows).requant(0, 500, 0, 3 * rows, gate=True, mask_idx=10)
    prog.store(Buffer.OUT, 0, 3 * rows).store(Buffer.OUT, 500, 3 * rows).sync()
    r, _ = run(cfg, prog)
    full, gated = r[7], r[8]
    assert np.array_equal(gated[:rows], full[:rows])
    assert np.array_equal(gated[rows:2 * rows], out0[rows:2 * rows])
    assert np.array_equal(gated[2 * rows:], full[2 * rows:]) and r[-1].ok


def test_pass_opcodes_and_fields_need_the_pass_unit():
    cfg = ICE40
    assert not cfg.impl.pass_unit
    for name, build, status in [
            ("patch", lambda p: p.patch(0, 8, 1, 1, 0), Status.ILLEGAL_OPCODE),
            ("dilate", lambda p: p.dilate(0, 8, in_h=1, in_w=1, out_h=1, out_w=1, kh=1, kw=1),
             Status.ILLEGAL_OPCODE),
            ("requant_gate", lambda p: p.requant(0, 0, 0, 1, gate=True), Status.BAD_FIELD),
            ("im2col_tiled", lambda p: p.im2col(0, 0, channels=1, in_h=2, in_w=2, kh=1, kw=1,
                                                out_w=2, m_blocks=1, tiled=True),
             Status.BAD_FIELD)]:
        prog = build(Program(cfg))
        fault = check_instruction(cfg, prog.instructions[0])
        assert fault is not None and fault.status == status, name
        assert "PASS unit" in fault.message, fault.message


# -- random and corner programs ----------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_random_programs_are_consistent(cfg):
    seed = seed_from_env()
    for trial in range(3):
        rng = np.random.default_rng([seed, trial])
        prog = random_program(cfg, rng, n_instr=60)
        stream = prog.to_bytes()
        out = GoldenMachine(cfg).run(stream)
        assert GoldenMachine(cfg).run(stream, strict=True) == out  # legal: strict agrees
        reports = syncs(parse_responses(cfg, prog, out))  # consumes exactly every byte
        assert all(rep.ok for rep in reports), (seed, trial)
        again = random_program(cfg, np.random.default_rng([seed, trial]), n_instr=60)
        assert again.to_bytes() == stream  # replayable from the seed
        bad = random_program(cfg, rng, n_instr=80, illegal_rate=0.3)
        reports = syncs(parse_responses(cfg, bad, GoldenMachine(cfg).run(bad.to_bytes())))
        assert any(not rep.ok for rep in reports), (seed, trial)
        assert reports[-1].counters is not None
        only = {Opcode.LOAD, Opcode.STORE, Opcode.GEMM}
        sub = random_program(cfg, rng, n_instr=30, opcodes=only)
        used = {i.opcode for i, _ in sub}
        assert used <= only | {Opcode.SYNC} and Opcode.GEMM in used


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_corner_programs(cfg):
    corners = {c.name: c for c in corner_programs(cfg)}
    for status in Status:
        assert any(c.status == status for c in corners.values()), status
    for c in corners.values():
        r, _ = run(cfg, c.program)
        reports = syncs(r)
        assert reports[0].status == c.status, c.name
        kept = [i.fields["keep"] for i, _ in c.program if i.opcode == Opcode.SYNC]
        cleared = kept.index(0)  # the first SYNC that clears the error state
        assert all(rep.status == c.status for rep in reports[:cleared + 1]), c.name
        assert all(rep.ok for rep in reports[cleared + 1:]), c.name
    rows, cols = cfg.rows, cfg.cols
    # Extreme products summed over the largest k the buffers allow.
    r, _ = run(cfg, corners["gemm_extreme_max_k"].program)
    k = min(cfg.inp_depth, cfg.wgt_depth)
    a = np.where(np.arange(rows) % 2, 127, -128)
    b = np.where(np.arange(cols) % 2, 127, -128)
    assert np.array_equal(r[3], k * np.outer(a, b))
    assert np.array_equal(r[5], 2 * k * np.outer(a, b))
    # Accumulate saturation both ways; the sticky flag clears at the SYNC.
    r, _ = run(cfg, corners["accumulate_saturation"].program)
    acc, first, second = r[-3], r[-2], r[-1]
    half = max(1, rows // 2)
    assert (acc[:half] == I32_MAX).all() and (acc[half:] == I32_MIN).all()
    assert first.acc_saturated and not second.acc_saturated
    # Zero-size work: legal, moves no MACs, sends only the empty SGQ frame.
    r, _ = run(cfg, corners["zero_size"].program)
    c = r[-1].counters
    assert c[Counter.MACS_ISSUED] == 0 and c[Counter.BYTES_OUT] == sgq_response_length(cfg, 0)
    # Requantization saturates to both INT8 ends.
    r, _ = run(cfg, corners["requant_saturation"].program)
    outs = np.concatenate([x for x in r if isinstance(x, np.ndarray)])
    assert outs.min() == -128 and outs.max() == 127
