"""Instruction encoding: Python view == the Amaranth layout the hardware decodes with."""

import pytest
from amaranth.lib import data, enum
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyaccel.errors import FieldError, OpcodeError
from tinyaccel.hw.isa import (
    INSTR_BITS,
    INSTR_BYTES,
    OPERANDS,
    Buffer,
    Instruction,
    InstructionLayout,
    Opcode,
    operand_fields,
)

SETTINGS = settings(max_examples=30, deadline=None, database=None)
LAYOUT = data.Layout.cast(InstructionLayout)
OPCODE_FIELD = LAYOUT["opcode"]
UNDEFINED = [c for c in range(1 << OPCODE_FIELD.width) if c not in {op.value for op in Opcode}]


def is_enum(shape) -> bool:
    return isinstance(shape, type) and issubclass(shape, enum.Enum)


def union_member(op: Opcode) -> str | None:
    """The name of ``op``'s operand struct in the instruction's operand union."""
    if OPERANDS[op] is None:
        return None
    members = [name for name, field in LAYOUT["operands"].shape
               if data.Layout.cast(field.shape) == OPERANDS[op]]
    assert len(members) == 1, (op, members)
    return members[0]


def field_values(op: Opcode):
    return st.fixed_dictionaries({
        f.name: st.sampled_from(list(f.shape)) if is_enum(f.shape)
        else st.integers(0, f.mask)
        for f in operand_fields(op)})


@pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)
@SETTINGS
@given(data=st.data())
def test_round_trip_and_amaranth_layout(op, data):
    fields = data.draw(field_values(op))
    instr = Instruction(op, **fields)
    word = instr.encode()
    assert 0 <= word < 1 << INSTR_BITS
    assert Instruction.decode(word) == instr
    assert Instruction.decode(instr.to_bytes()) == instr
    assert len(instr.to_bytes()) == INSTR_BYTES
    for name, value in fields.items():
        assert getattr(instr, name) == value
    # The Python encoding is bit for bit the Amaranth layout's constant ...
    member = union_member(op)
    init = {"opcode": op} if member is None else {"opcode": op, "operands": {member: fields}}
    assert word == LAYOUT.const(init).as_bits()
    # ... and the layout's view of the word reads back every field.
    view = LAYOUT.from_bits(word)
    assert view.opcode == op
    for name, value in fields.items():
        assert getattr(view.operands, member)[name] == value


@pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)
def test_operand_fields_tile_the_word(op):
    end = OPCODE_FIELD.offset + OPCODE_FIELD.width
    for f in sorted(operand_fields(op), key=lambda f: f.offset):
        assert f.offset >= end, f"{op.name}.{f.name} overlaps the previous field"
        end = f.offset + f.width
    assert end <= INSTR_BITS


@pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)
def test_reserved_bits_are_ignored(op):
    instr = Instruction(op)
    used = OPCODE_FIELD.width + sum(f.width for f in operand_fields(op))
    top = 1 << (INSTR_BITS - 1)
    if used < INSTR_BITS:
        assert Instruction.decode(instr.encode() | top) == instr


@pytest.mark.parametrize("op", list(Opcode), ids=lambda op: op.name)
def test_out_of_range_field_raises_naming_field_and_value(op):
    for f in operand_fields(op):
        if is_enum(f.shape):
            bad = next(v for v in range(1 << f.width) if v not in {e.value for e in f.shape})
            with pytest.raises(FieldError, match=rf"{f.name}={bad}\b"):
                Instruction(op, **{f.name: bad})
            continue
        for bad in (f.mask + 1, -1):
            with pytest.raises(FieldError, match=rf"{f.name}={bad}\b"):
                Instruction(op, **{f.name: bad})
        with pytest.raises(FieldError, match=f.name):
            Instruction(op, **{f.name: "7"})


def test_unknown_field_raises_naming_it():
    with pytest.raises(FieldError, match="no field.*bogus"):
        Instruction(Opcode.GEMM, k=1, bogus=3)
    with pytest.raises(FieldError, match="addr"):
        Instruction(Opcode.NOP, addr=0)


def test_bad_buffer_code_in_a_word_raises_field_error():
    buf = next(f for f in operand_fields(Opcode.LOAD) if f.name == "buf")
    code = max(range(1 << buf.width))
    assert code not in {b.value for b in Buffer}
    word = Opcode.LOAD.value | code << buf.offset
    with pytest.raises(FieldError, match=f"buf={code}"):
        Instruction.decode(word)


@pytest.mark.parametrize("code", UNDEFINED)
def test_undefined_opcodes_raise_opcode_error(code):
    assert UNDEFINED, "the opcode field has spare codes"
    with pytest.raises(OpcodeError, match=f"opcode={code}"):
        Instruction.decode(code | (0x1234 << 40))
    with pytest.raises(OpcodeError, match=f"opcode={code}"):
        Instruction(code)


def test_malformed_words_raise():
    with pytest.raises(FieldError, match="16 bytes"):
        Instruction.decode(b"\x00" * 15)
    with pytest.raises(FieldError, match="128-bit"):
        Instruction.decode(1 << INSTR_BITS)
    with pytest.raises(AttributeError):
        Instruction(Opcode.NOP).opcode = Opcode.SYNC


def test_little_endian_wire_order():
    # Byte 0 carries bits 7..0: the opcode sits in the low nibble of the first byte.
    for op in Opcode:
        assert Instruction(op).to_bytes()[0] & 0xF == op.value
