"""The RTL scoreboard itself, on golden responses with planted faults (no simulator needed)."""

import zlib

import numpy as np
import pytest

from tinyaccel.hw.config import get_config
from tinyaccel.hw.isa import (
    COUNTER_RECORD_BYTES,
    STATUS_BYTES,
    Buffer,
    Counter,
    Instruction,
    Opcode,
)
from tinyaccel.protocol import Program, response_length
from tinyaccel.sim.golden import GoldenMachine
from tinyaccel.sim.scoreboard import compare_responses, isolated, response_segments

CFG = get_config("ice40")


@pytest.fixture()
def case():
    words = np.arange(3 * CFG.cols, dtype=np.int8).reshape(3, CFG.cols)
    prog = (Program(CFG).load(Buffer.WGT, 4, words).store(Buffer.WGT, 4, 3)
            .sync(counters=True).store(Buffer.WGT, 5, 1).sync())
    stream = isolated(CFG, prog)
    return stream, GoldenMachine(CFG).run(stream)


def _counter_sync(stream, expected):
    """The response segment of the SYNC with counters."""
    n = response_length(CFG, Instruction(Opcode.SYNC, counters=1))
    return [s for s in response_segments(CFG, stream, expected)
            if s.opcode == Opcode.SYNC.value and s.length == n][0]


def _counter_offset(stream, expected, counter):
    seg = _counter_sync(stream, expected)
    return seg.start + STATUS_BYTES + 8 * counter.value


def test_equal_is_none(case):
    stream, expected = case
    assert compare_responses(CFG, stream, expected, expected) is None


def test_store_byte_names_instruction_and_word(case):
    stream, expected = case
    got = bytearray(expected)
    first_store = response_length(CFG, Instruction(Opcode.SYNC))  # after the preamble SYNC
    got[first_store + CFG.cols + 1] ^= 0x40
    m = compare_responses(CFG, stream, expected, bytes(got))
    assert m is not None and m.offset == first_store + CFG.cols + 1
    assert m.index == 2 and "STORE" in m.instruction and "WGT word 5" in m.where
    assert "expected" in str(m) and "instruction 2" in str(m)


def _seal(stream, got):
    """Set the tx_crc of the counter SYNC in ``got`` as an RTL would: zlib's CRC-32 of the
    bytes it sent since the previous (preamble) SYNC's trailer through its counter record."""
    seg = _counter_sync(stream, got)
    records_end = seg.start + STATUS_BYTES + COUNTER_RECORD_BYTES
    first = response_length(CFG, Instruction(Opcode.SYNC))
    got[records_end + 4:records_end + 8] = zlib.crc32(got[first:records_end]).to_bytes(4, "little")
    return bytes(got)


def test_timing_counters_only_plausible(case):
    stream, expected = case
    got = bytearray(expected)
    for counter, value in ((Counter.CYCLES, 900), (Counter.BUSY_CYCLES, 500),
                           (Counter.COMPUTE_CYCLES, 7)):
        off = _counter_offset(stream, expected, counter)
        got[off:off + 8] = value.to_bytes(8, "little")
    m = compare_responses(CFG, stream, expected, bytes(got))  # tx_crc not updated: caught
    assert m is not None and m.index == 3 and "link trailer tx_crc" in m.where
    assert compare_responses(CFG, stream, expected, _seal(stream, got)) is None
    off = _counter_offset(stream, expected, Counter.COMPUTE_CYCLES)
    got[off:off + 8] = (501).to_bytes(8, "little")
    m = compare_responses(CFG, stream, expected, _seal(stream, got))
    assert m is not None and "implausible" in m.where


@pytest.mark.parametrize("field, at", [("rx_crc", 0), ("tx_crc", 4)])
def test_link_trailer_field_named(case, field, at):
    stream, expected = case
    got = bytearray(expected)
    trailer = len(expected) - 8  # the last SYNC's
    got[trailer + at + 2] ^= 0x10
    m = compare_responses(CFG, stream, expected, bytes(got))
    assert m is not None and m.index == 5 and f"link trailer {field}" in m.where


def test_architectural_counter_is_exact(case):
    stream, expected = case
    got = bytearray(expected)
    off = _counter_offset(stream, expected, Counter.BYTES_IN)
    got[off] ^= 1
    m = compare_responses(CFG, stream, expected, bytes(got))
    assert m is not None and "BYTES_IN" in m.where


def test_status_field_named(case):
    stream, expected = case
    got = bytearray(expected)
    got[1] = 3  # status of the preamble SYNC: ADDR_RANGE
    m = compare_responses(CFG, stream, expected, bytes(got))
    assert m is not None and m.index == 0 and "field status" in m.where


def test_missing_and_surplus_bytes(case):
    stream, expected = case
    m = compare_responses(CFG, stream, expected, expected[:-2])
    assert m is not None and "ended" in m.where and m.got_len == len(expected) - 2
    m = compare_responses(CFG, stream, expected, expected + b"\1\2")
    assert m is not None and m.index is None and "surplus" in m.where
