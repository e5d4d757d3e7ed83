"""cocotb tests of the accelerator, run inside the simulator built by :mod:`tinyaccel.sim.rtl`.

The toplevel is the ``tinyaccel_tb`` wrapper (``tinyaccel_tb.sv``), which feeds and drains the
accelerator's streams from memories on its own clock; these tests only program its control
registers and wait for ``done``, so no Python runs per simulated cycle.

* ``serve`` executes commands from :class:`tinyaccel.sim.rtl.RtlSession` over a Unix socket
  (``TINYACCEL_RTL_SERVER``): the backend of every RTL test, the regression and the driver.
* ``reset_state`` and ``hang_is_reported`` check the wrapper and the accelerator's idle state
  without a session (run by ``tests/test_rtl.py``).
"""

from __future__ import annotations

import os
from multiprocessing.connection import Client

import cocotb
from cocotb.triggers import RisingEdge

from ..hw.isa import LINK_TRAILER_BYTES, STATUS_BYTES, Buffer, Instruction, Opcode

_SERVER = os.environ.get("TINYACCEL_RTL_SERVER")


async def _command(dut, cmd: int, **cfg: int) -> None:
    """Write the wrapper's cfg_* registers, issue ``cmd`` and wait until it is done.

    The wrapper reports the end of a command by copying its sequence number to ``done_seq``
    (``done`` may fall and rise again within one time slot, unseen by an edge trigger).
    """
    for name, value in cfg.items():
        getattr(dut, f"cfg_{name}").value = int(value)
    dut.cfg_cmd.value = cmd
    seq = (int(dut.cmd_seq.value) + 1) & 0xFFFFFFFF
    dut.cmd_seq.value = seq
    while int(dut.done_seq.value) != seq:
        await dut.done_seq.value_change


async def _ready(dut) -> None:
    """Wait for the wrapper's power-on reset to end."""
    if not int(dut.done.value):
        await RisingEdge(dut.done)


def _status(dut) -> dict:
    return {
        "timed_out": bool(int(dut.timed_out.value)),
        "out_full": bool(int(dut.out_full.value)),
        "in_ptr": int(dut.in_ptr.value),
        "out_count": int(dut.out_count.value),
        "out_total": int(dut.out_total.value),
        "cycles": int(dut.cycles.value),
        "last_beat_cycle": int(dut.last_beat_cycle.value),
        "error_seen": bool(int(dut.error_seen.value)),
        "busy": bool(int(dut.busy_now.value)),
        "error": bool(int(dut.error_now.value)),
    }


async def run_program(dut, *, in_beats: int, new: bool = True, reload: bool = True,
                      last: bool = True, expect_beats: int | None = None, valid_gap: int = 0,
                      ready_gap: int = 0, seed: int = 1, watchdog: int = 1_000_000,
                      out_cap: int = 0xFFFFFFFF) -> dict:
    """Run the stream already written to the input hex file; return the wrapper's status."""
    await _command(dut, 0, in_beats=in_beats, new=new, reload=reload, last=last,
                   expect_known=expect_beats is not None, expect_beats=expect_beats or 0,
                   valid_gap=valid_gap, ready_gap=ready_gap, seed=seed, watchdog=watchdog,
                   out_cap=out_cap)
    return _status(dut)


@cocotb.test(skip=_SERVER is None)
async def serve(dut):
    """Serve an RtlSession: one command per message until ``quit``."""
    conn = Client(_SERVER, family="AF_UNIX",
                  authkey=bytes.fromhex(os.environ["TINYACCEL_RTL_KEY"]))
    await _ready(dut)
    conn.send({"pid": os.getpid()})
    while True:
        try:
            msg = conn.recv()  # blocks the simulator, which has nothing to do meanwhile
        except EOFError:
            return
        op = msg.pop("op")
        if op == "quit":
            conn.send({"bye": True})
            conn.close()
            return
        if op == "reset":
            await _command(dut, 1)
            conn.send({"done": True})
        elif op == "run":
            conn.send(await run_program(dut, **msg))
        else:
            conn.send({"error": f"unknown op {op!r}"})


def _write_beats(stream: bytes) -> int:
    """Write ``stream`` as the wrapper's input file (+TB_IN, default tb_in.bin in the cwd): each
    host beat most significant byte first, as the wrapper's ``$fread`` wants it."""
    width = int(os.environ["TINYACCEL_HOST_WIDTH"]) // 8
    with open("tb_in.bin", "wb") as f:
        for i in range(0, len(stream), width):
            f.write(stream[i:i + width][::-1])
    return len(stream) // width


@cocotb.test(skip=_SERVER is not None)
async def reset_state(dut):
    """After reset the accelerator settles (``busy`` may cover a post-reset initialization)
    into idle, error-free and silent, and a NOP-only stream with idle gaps and back-pressure
    is consumed without a single output beat."""
    await _ready(dut)
    _write_beats(b"")
    st = await run_program(dut, in_beats=0, expect_beats=0, watchdog=200_000)
    assert not st["timed_out"], f"busy never fell after reset: {st}"
    assert int(dut.busy_now.value) == 0, "busy high after the post-reset settling"
    assert int(dut.error_now.value) == 0, "error high after reset"
    assert st["out_total"] == 0, f"{st['out_total']} beats sent after reset without input"
    beats = _write_beats(Instruction(Opcode.NOP).to_bytes() * 8)
    st = await run_program(dut, in_beats=beats, expect_beats=0, valid_gap=20000,
                           ready_gap=20000)
    assert not st["timed_out"], f"NOP stream hung: {st}"
    assert st["in_ptr"] == beats, f"only {st['in_ptr']} of {beats} NOP beats taken"
    assert st["out_total"] == 0, f"{st['out_total']} beats sent for NOPs"
    assert not st["error_seen"], "error raised by NOPs"


@cocotb.test(skip=_SERVER is not None)
async def hang_is_reported(dut):
    """A LOAD whose data never comes stalls the accelerator: the watchdog must end the run, and
    after a reset the accelerator must take a fresh program."""
    await _ready(dut)
    beats = _write_beats(Instruction(Opcode.LOAD, buf=Buffer.INP, addr=0, count=1).to_bytes())
    st = await run_program(dut, in_beats=beats, expect_beats=0, watchdog=5000)
    assert st["timed_out"], f"a stalled program did not trip the watchdog: {st}"
    await _command(dut, 1)
    beats = _write_beats(Instruction(Opcode.SYNC).to_bytes())
    st = await run_program(dut, in_beats=beats, expect_beats=None)
    assert not st["timed_out"] and st["in_ptr"] == beats, f"no recovery after reset: {st}"
    assert st["out_total"] * int(os.environ["TINYACCEL_HOST_WIDTH"]) // 8 == (
        STATUS_BYTES + LINK_TRAILER_BYTES), (
        f"SYNC after reset sent {st['out_total']} beats")
