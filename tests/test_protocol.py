"""Host byte protocol: word layouts of section 4, records, response lengths, stream parsing."""

import zlib

import numpy as np
import pytest
from amaranth.lib import data

from tinyaccel.errors import DTypeError, FieldError, IntegrityError, ProtocolError, ShapeError
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import (
    COUNTER_RECORD_BYTES,
    LINK_TRAILER_BYTES,
    STATUS_BYTES,
    STATUS_MAGIC,
    Buffer,
    ChannelParams,
    Counter,
    Instruction,
    LinkTrailer,
    Opcode,
    Status,
    StatusRecord,
)
from tinyaccel.protocol import (
    PARAM_DTYPE,
    SGQ_LENGTH_BYTES,
    Program,
    RawInstruction,
    StatusReport,
    channel_params,
    channel_params_words,
    check_link,
    data_length,
    decode_fields,
    encode_fields,
    iter_stream,
    link_crc,
    pack_words,
    parse_responses,
    response_length,
    sgq_frame,
    sgq_response_length,
    sgq_unframe,
    unpack_words,
)
from tinyaccel.sim.randprog import (
    UNDEFINED_BUFFERS,
    UNDEFINED_OPCODES,
    random_words,
    seed_from_env,
)

CONFIGS = list(PRESETS.values())
PARAMS = data.Layout.cast(ChannelParams)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(seed_from_env())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("buf", list(Buffer), ids=lambda b: b.name)
def test_pack_unpack_round_trip(cfg, buf, rng):
    words = random_words(cfg, buf, 5, rng)
    raw = pack_words(cfg, buf, words)
    assert len(raw) == 5 * cfg.word_bytes(buf)
    back = unpack_words(cfg, buf, raw)
    assert back.dtype == words.dtype and np.array_equal(back, words)
    assert pack_words(cfg, buf, back) == raw
    assert unpack_words(cfg, buf, b"").shape[0] == 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_word_layouts_of_section_4(cfg, rng):
    # INP / WGT / OUT: lane r in byte r; ACC: lane c in bytes 4c..4c+3 LE two's complement.
    inp = random_words(cfg, Buffer.INP, 3, rng)
    assert pack_words(cfg, Buffer.INP, inp) == bytes(int(v) & 0xFF for v in inp.ravel())
    out = random_words(cfg, Buffer.OUT, 3, rng)
    assert pack_words(cfg, Buffer.OUT, out) == bytes(int(v) & 0xFF for v in out.ravel())
    acc = random_words(cfg, Buffer.ACC, 3, rng)
    assert pack_words(cfg, Buffer.ACC, acc) == b"".join(
        int(v).to_bytes(4, "little", signed=True) for v in acc.ravel())
    # PARAM: channel c in bytes 12c..12c+11, laid out by the Amaranth ChannelParams layout.
    params = random_words(cfg, Buffer.PARAM, 2, rng)
    expect = b"".join(
        PARAMS.const({n: int(p[n]) for n in PARAM_DTYPE.names}).as_bits().to_bytes(
            PARAMS.size // 8, "little")
        for p in params.ravel())
    assert pack_words(cfg, Buffer.PARAM, params) == expect
    # MASK: bit 64*addr + i is bit i of the word.
    bits = random_words(cfg, Buffer.MASK, 2, rng)
    as_ints = [sum(int(b) << i for i, b in enumerate(word)) for word in bits]
    assert pack_words(cfg, Buffer.MASK, bits) == b"".join(v.to_bytes(8, "little")
                                                           for v in as_ints)
    assert pack_words(cfg, Buffer.MASK, np.array(as_ints, np.uint64)) == pack_words(
        cfg, Buffer.MASK, bits)


def test_param_dict_form_and_range_errors():
    cfg = PRESETS["sim"]
    rec = channel_params({"bias": np.arange(16), "multiplier": 1 << 30, "shift": -3},
                         (1, 16))
    raw = pack_words(cfg, Buffer.PARAM, {"bias": np.arange(16)[None], "multiplier": 1 << 30,
                                         "shift": -3})
    assert raw == pack_words(cfg, Buffer.PARAM, rec)
    assert unpack_words(cfg, Buffer.PARAM, raw)["shift"].tolist() == [[-3] * 16]
    with pytest.raises(FieldError, match="shift=200"):
        channel_params({"shift": 200}, (1,))
    with pytest.raises(FieldError, match="bias=2147483648"):
        channel_params({"bias": np.array([2 ** 31])}, (1,))
    with pytest.raises(FieldError, match="gain"):
        channel_params({"gain": 1}, (1,))
    words = channel_params_words({"bias": [1, 2, 3], "zero_point": -4}, 3, 8, 4)
    assert words.shape == (2, 4)
    assert words["bias"].ravel().tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert words["zero_point"].ravel().tolist() == [-4, -4, -4, 0, 0, 0, 0, 0]


def test_wrong_dtype_and_shape_name_the_buffer():
    cfg = PRESETS["sim"]
    with pytest.raises(DTypeError, match=r"INP.*int16"):
        pack_words(cfg, Buffer.INP, np.zeros((2, 16), np.int16))
    with pytest.raises(DTypeError, match=r"ACC.*int8"):
        pack_words(cfg, Buffer.ACC, np.zeros((2, 16), np.int8))
    with pytest.raises(DTypeError, match=r"PARAM.*int32"):
        pack_words(cfg, Buffer.PARAM, np.zeros((2, 16), np.int32))
    with pytest.raises(ShapeError, match=r"WGT.*\(n, 16\).*\(2, 8\)"):
        pack_words(cfg, Buffer.WGT, np.zeros((2, 8), np.int8))
    with pytest.raises(ShapeError, match="OUT"):
        pack_words(cfg, Buffer.OUT, np.zeros(16, np.int8))
    with pytest.raises(FieldError, match="buf=9"):
        pack_words(cfg, 9, np.zeros((1, 16), np.int8))
    with pytest.raises(ProtocolError, match="whole number"):
        unpack_words(cfg, Buffer.ACC, bytes(63))


def test_status_record_matches_amaranth_layout():
    report = StatusReport(Status.ADDR_RANGE, error_pc=70000, error_opcode=13,
                          instructions=123456, acc_saturated=True, config_id=0xABCDEF,
                          rx_crc=0x89ABCDEF, tx_crc=0x01234567)
    const = data.Layout.cast(StatusRecord).const({
        "magic": STATUS_MAGIC, "status": Status.ADDR_RANGE, "acc_saturated": 1,
        "error_pc": 70000, "instructions": 123456, "error_opcode": 13, "config_id": 0xABCDEF})
    trailer = data.Layout.cast(LinkTrailer).const({"rx_crc": 0x89ABCDEF, "tx_crc": 0x01234567})
    assert report.to_bytes() == (const.as_bits().to_bytes(STATUS_BYTES, "little")
                                 + trailer.as_bits().to_bytes(LINK_TRAILER_BYTES, "little"))
    assert report.records() == report.to_bytes()[:STATUS_BYTES]
    assert StatusReport.from_bytes(report.to_bytes()) == report
    bare = StatusReport(Status.OK, config_id=7)  # no trailer known: the records alone
    assert bare.to_bytes() == bare.records()
    assert StatusReport.from_bytes(bare.to_bytes(), trailer=False) == bare
    with pytest.raises(FieldError, match="both CRCs"):
        StatusReport(Status.OK, rx_crc=1).to_bytes()
    with pytest.raises(FieldError, match="config_id"):
        StatusReport(Status.OK, config_id=1 << 24).to_bytes()
    assert report.error_opcode_name == "opcode 13"
    assert StatusReport(Status.OK, error_opcode=Opcode.GEMM.value).error_opcode_name == "GEMM"


def test_counter_record_in_counter_order():
    counters = {c: (i + 1) * 1000 + (1 << 40) for i, c in enumerate(Counter)}
    raw = StatusReport(Status.OK, counters=counters, rx_crc=5, tx_crc=6).to_bytes()
    assert len(raw) == STATUS_BYTES + COUNTER_RECORD_BYTES + LINK_TRAILER_BYTES
    for i, c in enumerate(Counter):
        at = STATUS_BYTES + 8 * i
        assert int.from_bytes(raw[at:at + 8], "little") == counters[c]
    assert raw[-8:] == (5).to_bytes(4, "little") + (6).to_bytes(4, "little")  # after them
    report = StatusReport.from_bytes(raw, counters=True)
    assert report.counters == counters and (report.rx_crc, report.tx_crc) == (5, 6)


def test_status_record_errors():
    good = StatusReport(Status.OK, rx_crc=0, tx_crc=0).to_bytes()
    with pytest.raises(ProtocolError, match="magic"):
        StatusReport.from_bytes(b"\x00" + good[1:])
    with pytest.raises(ProtocolError, match="undefined status"):
        StatusReport.from_bytes(good[:1] + b"\x77" + good[2:])
    with pytest.raises(ProtocolError, match="24 bytes"):
        StatusReport.from_bytes(good[:-1])
    with pytest.raises(ProtocolError, match="16 bytes"):
        StatusReport.from_bytes(good, trailer=False)
    with pytest.raises(FieldError, match="error_pc"):
        StatusReport(Status.OK, error_pc=1 << 32).to_bytes()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_data_and_response_lengths(cfg):
    for buf in Buffer:
        load = Instruction(Opcode.LOAD, buf=buf, addr=1, count=7)
        store = Instruction(Opcode.STORE, buf=buf, addr=1, count=7)
        assert data_length(cfg, load) == 7 * cfg.word_bits(buf) // 8
        assert response_length(cfg, store) == 7 * cfg.word_bits(buf) // 8
        assert response_length(cfg, load) == 0 and data_length(cfg, store) == 0
    assert response_length(cfg, Instruction(Opcode.SYNC)) == 16 + 8  # records, link trailer
    assert response_length(cfg, Instruction(Opcode.SYNC, keep=1)) == 16 + 8
    assert response_length(cfg, Instruction(Opcode.SYNC, counters=1, clear=1)) == 16 + 64 + 8
    assert response_length(cfg, Instruction(Opcode.SGQ, count=4, stripe_len=1)) is None
    for op in (Opcode.NOP, Opcode.GEMM, Opcode.REQUANT, Opcode.PATCH):
        assert response_length(cfg, Instruction(op)) == 0
    # Undefined buffer codes have no word size: no data, no response.
    for code in UNDEFINED_BUFFERS:
        assert data_length(cfg, encode_fields(Opcode.LOAD, buf=code, count=5)) == 0
        assert response_length(cfg, encode_fields(Opcode.STORE, buf=code, count=5)) == 0
    for code in UNDEFINED_OPCODES:
        assert response_length(cfg, code | 0xFFFF << 4) == 0 == data_length(cfg, code)
    # SGQ (section 8): 4-byte length + payload, zero-padded to whole host beats; then the
    # CRC-32 of all of that, 4 bytes little-endian, zero-padded to whole host beats.
    beat = cfg.host_width // 8
    trailer = max(beat, 4)  # host beats are 2, 8 or 16 bytes: one beat or two 2-byte beats
    for n in range(0, 40):
        body = SGQ_LENGTH_BYTES + n + (-(SGQ_LENGTH_BYTES + n) % beat)
        assert sgq_response_length(cfg, n) == body + trailer
        frame = sgq_frame(cfg, bytes(range(n)))
        assert len(frame) == body + trailer and int.from_bytes(frame[:4], "little") == n
        assert frame[4:4 + n] == bytes(range(n)) and not any(frame[4 + n:body])
        assert frame[body:body + 4] == zlib.crc32(frame[:body]).to_bytes(4, "little")
        assert not any(frame[body + 4:])
        assert sgq_unframe(cfg, frame, 0) == bytes(range(n))


def test_raw_words_and_field_codec():
    word = encode_fields(Opcode.STORE, buf=UNDEFINED_BUFFERS[0], addr=5, count=9)
    code, fields = decode_fields(word)
    assert code == Opcode.STORE.value
    assert fields == {"buf": UNDEFINED_BUFFERS[0], "addr": 5, "count": 9}
    raw = RawInstruction(word)
    assert raw.opcode == Opcode.STORE and raw.to_bytes() == word.to_bytes(16, "little")
    assert RawInstruction(UNDEFINED_OPCODES[0]).opcode == UNDEFINED_OPCODES[0]
    instr = Instruction(Opcode.GEMM, k=3, m_blocks=2, acc_addr=77)
    assert encode_fields(Opcode.GEMM, k=3, m_blocks=2, acc_addr=77) == instr.encode()
    with pytest.raises(FieldError, match="k=65536"):
        encode_fields(Opcode.GEMM, k=1 << 16)
    with pytest.raises(FieldError, match="no field"):
        encode_fields(UNDEFINED_OPCODES[0], k=1)


def test_program_stream_layout(rng):
    cfg = PRESETS["ice40"]
    a = random_words(cfg, Buffer.INP, 3, rng)
    prog = Program(cfg).load(Buffer.INP, 2, a).gemm(0, 0, 0, k=3).store(Buffer.ACC, 0, 2)
    prog.raw(UNDEFINED_OPCODES[0]).sgq(0, 2, 1, 3).sync(counters=True)
    stream = prog.to_bytes()
    load = Instruction(Opcode.LOAD, buf=Buffer.INP, addr=2, count=3)
    assert stream[:16] == load.to_bytes()
    assert stream[16:16 + a.size] == a.tobytes()
    assert len(stream) == 16 * len(prog) + a.size
    back = Program.from_bytes(cfg, stream)
    assert back.instructions == prog.instructions and back.to_bytes() == stream
    assert [w for w, _ in iter_stream(cfg, stream)] == [i.encode() for i in prog.instructions]
    assert response_length(cfg, Program(cfg).store(Buffer.ACC, 0, 2).sync()) == 2 * 16 + 24
    assert response_length(cfg, prog) is None  # SGQ: variable
    assert prog.with_final_sync() is prog
    assert len(Program(cfg).nop().with_final_sync()) == 2
    with pytest.raises(ProtocolError, match="announces 4 data bytes, got 3"):
        prog.append(Instruction(Opcode.LOAD, buf=Buffer.INP, count=2), b"abc")


def test_truncated_stream_names_missing_bytes(rng):
    cfg = PRESETS["sim"]
    prog = Program(cfg).load(Buffer.WGT, 0, random_words(cfg, Buffer.WGT, 2, rng)).nop()
    stream = prog.to_bytes()
    with pytest.raises(ProtocolError, match="5 bytes missing"):
        list(iter_stream(cfg, stream[:-5]))
    with pytest.raises(ProtocolError, match=r"LOAD instruction 0: 22 of 32 bytes, 10 bytes"):
        list(iter_stream(cfg, stream[:16 + 22]))


def make_responses(cfg, rng):
    """A program and a hand-built response stream for it."""
    prog = Program(cfg).store(Buffer.ACC, 3, 2).sgq(0, 4, 2, 0).store(Buffer.MASK, 0, 1)
    prog.nop().sync(counters=True).sync()
    acc = random_words(cfg, Buffer.ACC, 2, rng)
    mask = random_words(cfg, Buffer.MASK, 1, rng)
    payload = bytes([1, 2, 3])
    counters = {c: 10 * c.value for c in Counter}
    stream = (pack_words(cfg, Buffer.ACC, acc) + sgq_frame(cfg, payload)
              + pack_words(cfg, Buffer.MASK, mask)
              + StatusReport(Status.BAD_FIELD, 1, 6, 5, False, counters, 9, 11, 12).to_bytes()
              + StatusReport(Status.OK, instructions=1, rx_crc=13, tx_crc=14).to_bytes())
    return prog, stream, acc, mask, payload, counters


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_parse_responses(cfg, rng):
    prog, stream, acc, mask, payload, counters = make_responses(cfg, rng)
    r = parse_responses(cfg, prog, stream)
    assert len(r) == len(prog)
    assert np.array_equal(r[0], acc) and r[1] == payload and np.array_equal(r[2], mask)
    assert r[3] is None
    assert r[4] == StatusReport(Status.BAD_FIELD, 1, 6, 5, False, counters, 9, 11, 12)
    assert (r[5].rx_crc, r[5].tx_crc) == (13, 14)
    assert r[5].ok and r[5].counters is None and r[5].instructions == 1
    with pytest.raises(ProtocolError, match="missing"):
        parse_responses(cfg, prog, stream[:-1])
    with pytest.raises(ProtocolError, match="2 extra"):
        parse_responses(cfg, prog, stream + b"\x5a\x00")
    corrupt = bytearray(stream)
    corrupt[len(stream) - 24] = 0x00  # magic of the last status record
    with pytest.raises(ProtocolError, match="magic"):
        parse_responses(cfg, prog, bytes(corrupt))
    at = 2 * cfg.word_bytes(Buffer.ACC)  # the SGQ length header
    corrupt = bytearray(stream)
    corrupt[at:at + 4] = (1 << 20).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="SGQ length header"):
        parse_responses(cfg, prog, bytes(corrupt))
    # the SGQ response's integrity: a flipped payload bit fails the CRC (naming the instruction
    # and both CRCs), as does a non-zero padding byte; a cut response is only "missing" bytes
    body = at + -(-(SGQ_LENGTH_BYTES + len(payload)) // cfg.beat_bytes) * cfg.beat_bytes
    crc = zlib.crc32(stream[at:body])
    assert stream[body:body + 4] == crc.to_bytes(4, "little")
    for where in (at + 4, at + 6, body - 1, body):  # payload, padding, the CRC itself
        corrupt = bytearray(stream)
        corrupt[where] ^= 0x10
        with pytest.raises(IntegrityError, match=r"instruction 1: CRC-32 mismatch, expected "
                                                  r"0x[0-9a-f]{8} .*received 0x[0-9a-f]{8}"):
            parse_responses(cfg, prog, bytes(corrupt))
    if cfg.beat_bytes > 4:  # padding after the CRC
        corrupt = bytearray(stream)
        corrupt[body + 5] = 1
        with pytest.raises(IntegrityError, match="instruction 1: padding byte"):
            parse_responses(cfg, prog, bytes(corrupt))
    with pytest.raises(ProtocolError, match="missing") as err:
        parse_responses(cfg, prog.instructions[:2], stream[:body + 2])
    assert type(err.value) is ProtocolError
    undefined = Program(cfg).raw(encode_fields(Opcode.STORE, buf=UNDEFINED_BUFFERS[0], count=4))
    assert parse_responses(cfg, undefined, b"") == [b""]


def test_link_crc_is_crc32_iso_hdlc():
    """The one CRC of the link and SGQ: CRC-32/ISO-HDLC's check value, and zlib's CRC-32."""
    assert link_crc(b"123456789") == 0xCBF43926
    data = bytes(range(256)) * 5
    assert link_crc(data) == zlib.crc32(data) and link_crc(b"") == 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_check_link(cfg, rng):
    """check_link recomputes both CRCs of every trailer from the bytes each covers (a stream
    and an answer built by hand here, each trailer from zlib), and names a wrong one."""
    words = random_words(cfg, Buffer.WGT, 2, rng)
    prog = Program(cfg).load(Buffer.WGT, 0, words).store(Buffer.WGT, 0, 2).sync(counters=True)
    prog.sgq(0, 0, 1, 0).sync(keep=True).sync()
    stream = prog.to_bytes()
    ends = [sum(len(i.to_bytes()) + len(d) for i, d in prog[:n + 1]) for n in (2, 4, 5)]
    rx = [zlib.crc32(stream[a:b]) for a, b in zip([0] + ends[:-1], ends, strict=True)]
    counters = {c: c.value for c in Counter}
    out = pack_words(cfg, Buffer.WGT, words) + StatusReport(Status.OK, counters=counters).records()
    out += (rx[0] | zlib.crc32(out) << 32).to_bytes(8, "little")
    start = len(out)
    out += sgq_frame(cfg, b"") + StatusReport(Status.OK).records()
    out += (rx[1] | zlib.crc32(out[start:]) << 32).to_bytes(8, "little")
    start = len(out)
    out += StatusReport(Status.OK).records()
    out += (rx[2] | zlib.crc32(out[start:]) << 32).to_bytes(8, "little")
    assert check_link(cfg, stream, out) == 3
    for at, name in ((len(out) - 8, "rx_crc"), (len(out) - 1, "tx_crc"), (0, "tx_crc")):
        bad = bytearray(out)
        bad[at] ^= 4
        with pytest.raises(IntegrityError, match=f"SYNC [0-9]: link trailer {name}="):
            check_link(cfg, stream, bytes(bad))
    sent = bytearray(stream)
    sent[20] ^= 1  # a LOAD data byte the accelerator did not receive as sent
    with pytest.raises(IntegrityError, match="SYNC 2: link trailer rx_crc=.* accelerator "
                                             "received"):
        check_link(cfg, bytes(sent), out)
    with pytest.raises(ProtocolError, match="before the link trailer of SYNC 5"):
        check_link(cfg, stream, out[:-3])
