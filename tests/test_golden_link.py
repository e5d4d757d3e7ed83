"""The golden model's link contract (section 9): the link trailer of every SYNC against zlib's
CRC-32 of the bytes written and read, SYNC ``keep``, and ``config_id``."""

import dataclasses
import zlib

import numpy as np
import pytest
from amaranth.lib import data, enum

from tinyaccel.errors import IntegrityError
from tinyaccel.hw import isa
from tinyaccel.hw.config import PRESETS, Implementation
from tinyaccel.hw.isa import LINK_TRAILER_BYTES, STATUS_BYTES, Buffer, Opcode, Status
from tinyaccel.protocol import Program, StatusReport, check_link, parse_responses
from tinyaccel.sim.golden import GoldenMachine
from tinyaccel.sim.randprog import UNDEFINED_OPCODES, random_program, random_words, seed_from_env

CONFIGS = list(PRESETS.values())


@pytest.fixture
def rng():
    return np.random.default_rng(seed_from_env())


def segments(prog: Program) -> list[Program]:
    """``prog`` cut after each SYNC (the last piece may end without one)."""
    pieces, current = [], Program(prog.config)
    for instr, payload in prog:
        current.append(instr, payload)
        if instr.opcode == Opcode.SYNC:
            pieces.append(current)
            current = Program(prog.config)
    return pieces + ([current] if len(current) else [])


def trailer_of(response: bytes) -> tuple[int, int]:
    tail = response[-LINK_TRAILER_BYTES:]
    return int.from_bytes(tail[:4], "little"), int.from_bytes(tail[4:], "little")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_trailer_is_crc32_of_the_bytes_written_and_read(cfg, rng):
    """Fed one SYNC-terminated piece at a time, the golden model's answer to each piece ends
    with zlib.crc32 of the piece (rx_crc) and of the answer before the trailer (tx_crc): LOAD
    data, discarded LOADs, STOREs, SGQ frames and counter records included."""
    prog = random_program(cfg, rng, n_instr=80, illegal_rate=0.2)
    prog.load(Buffer.WGT, 0, random_words(cfg, Buffer.WGT, 2, rng)).sync(keep=True)
    machine = GoldenMachine(cfg)
    checked = 0
    for piece in segments(prog):
        sent = piece.to_bytes()
        got = machine.run(sent)
        rx, tx = trailer_of(got)
        assert rx == zlib.crc32(sent), f"piece {checked}: rx_crc"
        assert tx == zlib.crc32(got[:-LINK_TRAILER_BYTES]), f"piece {checked}: tx_crc"
        report = parse_responses(cfg, piece, got)[-1]
        assert (report.rx_crc, report.tx_crc) == (rx, tx)
        assert report.config_id == cfg.config_id
        checked += 1
    assert checked > 3


def test_back_to_back_syncs_cover_only_their_own_word(rng):
    cfg = PRESETS["ice40"]
    prog = Program(cfg).sync().sync(counters=True, keep=True).sync(clear=True)
    out = GoldenMachine(cfg).run(prog.to_bytes())
    reports = parse_responses(cfg, prog, out)
    start = 0
    for instr, report in zip(prog.instructions, reports, strict=True):
        n = STATUS_BYTES + (64 if instr.counters else 0)
        assert report.rx_crc == zlib.crc32(instr.to_bytes())
        assert report.tx_crc == zlib.crc32(out[start:start + n])
        start += n + LINK_TRAILER_BYTES
    assert check_link(cfg, prog.to_bytes(), out) == 3


def test_corrupted_byte_changes_rx_crc(rng):
    """A LOAD data byte corrupted on the way: the accelerator's rx_crc is the CRC of what it
    received, which differs from the CRC of what the host sent; check_link names it."""
    cfg = PRESETS["sim"]
    words = random_words(cfg, Buffer.INP, 4, rng)
    prog = Program(cfg).load(Buffer.INP, 0, words).store(Buffer.INP, 0, 4).sync()
    sent = prog.to_bytes()
    received = bytearray(sent)
    received[16 + 5] ^= 0x20  # inside the LOAD data
    out = GoldenMachine(cfg).run(bytes(received))
    rx, _ = trailer_of(out)
    assert rx == zlib.crc32(bytes(received)) != zlib.crc32(sent)
    with pytest.raises(IntegrityError, match="SYNC 2: link trailer rx_crc"):
        check_link(cfg, sent, out)
    assert check_link(cfg, bytes(received), out) == 1
    # on the way back: a corrupted STORE byte breaks tx_crc
    back = bytearray(out)
    back[3] ^= 1
    with pytest.raises(IntegrityError, match="SYNC 2: link trailer tx_crc"):
        check_link(cfg, bytes(received), bytes(back))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_sync_keep_keeps_the_error_state(cfg):
    """keep=1: the status, error_pc, error_opcode, acc_saturated and the window stay (the next
    index continues), nothing executes; keep=0 clears them, execution resumes."""
    rows = cfg.rows
    word = np.full((1, rows), 9, np.int8)
    code = UNDEFINED_OPCODES[1]
    prog = Program(cfg).load(Buffer.INP, 0, word).nop().raw(code)  # fault at index 2
    prog.sync(keep=True)  # 3
    prog.load(Buffer.INP, 0, np.full((1, rows), -1, np.int8)).store(Buffer.INP, 0, 1)  # 4, 5
    prog.sync(counters=True, keep=True)  # 6
    prog.sync()  # 7
    prog.store(Buffer.INP, 0, 1).sync()
    r = parse_responses(cfg, prog, GoldenMachine(cfg).run(prog.to_bytes()))
    first, second, third, fourth = r[3], r[6], r[7], r[9]
    for report, window in ((first, 4), (second, 7), (third, 8)):
        assert (report.status, report.error_pc, report.error_opcode) == (
            Status.ILLEGAL_OPCODE, 2, code)
        assert report.instructions == window
    assert not r[5].any()  # not executed: zeros
    assert second.counters is not None
    assert fourth.ok and fourth.instructions == 2 and fourth.error_pc == 0
    assert np.array_equal(r[8], word)  # the discarded LOAD wrote nothing


def test_sync_keep_keeps_saturation():
    cfg = PRESETS["ice40"]
    rows, cols = cfg.rows, cfg.cols
    prog = Program(cfg).load(Buffer.INP, 0, np.full((1, rows), -128, np.int8))
    prog.load(Buffer.WGT, 0, np.full((1, cols), -128, np.int8))
    prog.load(Buffer.ACC, 0, np.full((rows, cols), 2**31 - 1, np.int32))
    prog.gemm(0, 0, 0, 1, accumulate=True).sync(keep=True).sync(keep=True).sync().sync()
    reports = [x for x in parse_responses(cfg, prog, GoldenMachine(cfg).run(prog.to_bytes()))
               if isinstance(x, StatusReport)]
    assert [x.acc_saturated for x in reports] == [True, True, True, False]
    assert [x.instructions for x in reports] == [5, 6, 7, 1]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_inserted_keep_syncs_change_no_meaning(cfg, rng):
    """SYNC keep=1 inserted anywhere in a faulting random program (whose own SYNCs have keep
    at random too): every STORE and SGQ response and every other SYNC's status, error_opcode
    and acc_saturated are the same; its error_pc and window count the inserted SYNCs, as the
    index of each instruction in the window since the last SYNC without keep."""
    seed = int(rng.integers(1 << 30))
    for trial in range(4):
        base = random_program(cfg, np.random.default_rng([seed, trial]), n_instr=60,
                              illegal_rate=0.15)
        probed, at = Program(cfg), []  # at[i]: the index of base instruction i in probed
        for instr, payload in base:
            if rng.random() < 0.25:
                probed.sync(counters=bool(rng.integers(2)), keep=True)
            at.append(len(probed))
            probed.append(instr, payload)
        assert len(probed) > len(base)
        plain = parse_responses(cfg, base, GoldenMachine(cfg).run(base.to_bytes()))
        probes = parse_responses(cfg, probed, GoldenMachine(cfg).run(probed.to_bytes()))
        start = [0, 0]  # the window's first index in base and in probed
        for i, (instr, _) in enumerate(base):
            a, b = plain[i], probes[at[i]]
            if isinstance(a, StatusReport):
                assert (a.status, a.error_opcode, a.acc_saturated) == (
                    b.status, b.error_opcode, b.acc_saturated), (trial, i)
                assert b.instructions == at[i] - start[1] + 1, (trial, i)
                assert a.instructions == i - start[0] + 1, (trial, i)
                if not a.ok:
                    assert b.error_pc == at[start[0] + a.error_pc] - start[1], (trial, i)
                if not instr.keep:
                    start = [i + 1, at[i] + 1]
            elif isinstance(a, np.ndarray):
                assert np.array_equal(a, b), (trial, i)
            else:
                assert a == b, (trial, i)


def test_config_id_changes_with_a_config_field():
    cfg = PRESETS["sim"]
    ids = {cfg.config_id}
    for change in (dict(inp_depth=cfg.inp_depth // 2), dict(host_width=32),
                   dict(requant_lanes=8), dict(name="sim2"),
                   dict(impl=dataclasses.replace(cfg.impl, shadow=False)),
                   dict(impl=Implementation.compact(), mask_bits=256)):
        other = dataclasses.replace(cfg, **change)
        assert other.config_id not in ids, change
        ids.add(other.config_id)
    assert dataclasses.replace(cfg).config_id == cfg.config_id  # deterministic
    assert len({c.config_id for c in CONFIGS}) == len(CONFIGS)
    assert 0 <= cfg.config_id < 1 << 24
    # the CRC of the canonical text, as zlib computes it
    assert cfg.config_id == zlib.crc32(cfg.identity_text().encode()) & 0xFFFFFF


def test_config_id_changes_with_a_layout_field(monkeypatch):
    cfg = PRESETS["ice40"]
    before = cfg.identity_text()

    class SyncOperands(data.Struct):  # keep and clear swapped
        __module__ = isa.__name__
        counters: 1
        keep: 1
        clear: 1

    monkeypatch.setattr(isa, "SyncOperands", SyncOperands)
    swapped = dataclasses.replace(cfg)
    assert swapped.identity_text() != before and swapped.config_id != cfg.config_id
    monkeypatch.undo()

    class SgqMode(enum.Enum, shape=3):  # one member renumbered
        __module__ = isa.__name__
        BASE = 0
        BITS1 = 1
        BITS2 = 2
        BITS4 = 3
        BITS8 = 5

    monkeypatch.setattr(isa, "SgqMode", SgqMode)
    assert dataclasses.replace(cfg).config_id != cfg.config_id
    monkeypatch.undo()
    monkeypatch.setattr(isa, "LinkTrailer", data.StructLayout({"rx_crc": 32, "tx_crc": 31}))
    assert dataclasses.replace(cfg).config_id != cfg.config_id
    monkeypatch.undo()
    monkeypatch.setattr(isa, "INSTR_BITS", 256)
    assert dataclasses.replace(cfg).config_id != cfg.config_id
    monkeypatch.undo()
    assert dataclasses.replace(cfg).identity_text() == before
