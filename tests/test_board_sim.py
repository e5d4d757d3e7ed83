"""The simulated board (``tinyaccel.sim.board_sim``): the Verilated board core behind a pty.

Plain pyserial on the host side, as a user's script would open a board; the expected bytes come
from the golden model (``GoldenMachine``) run on the same stream, compared by the scoreboard
(every byte, the timing counters for plausibility only). The fault tests build their expectation
from the golden answer and the fault's definition, never from the harness.
"""

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest
import serial

from tinyaccel.errors import BackendUnavailable, ConfigError, SimulatorError
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import STATUS_BYTES, Buffer, Instruction, Opcode
from tinyaccel.protocol import Program, RawInstruction
from tinyaccel.sim.board_sim import FAULT_KINDS, SimulatedBoard, build_board_sim
from tinyaccel.sim.golden import GoldenMachine
from tinyaccel.sim.randprog import random_program, random_words, seed_from_env
from tinyaccel.sim.scoreboard import compare_responses

pytestmark = pytest.mark.rtl

#: Fixed seeds of the programs, one per case.
SEEDS = [1501, 1502]
#: Seconds a read waits for the board (the simulator shares 2 cores with other jobs).
READ_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def board_available():
    """Skips the module when the simulated board cannot be built here (builds ice40 once)."""
    try:
        build_board_sim("ice40", link=SimulatedBoard.default_link("ice40"), divisor=4)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def open_port(board, timeout=READ_TIMEOUT):
    return serial.Serial(board.port, baudrate=board.baud, timeout=timeout)


def exchange(port, stream: bytes, n: int) -> bytes:
    """Write ``stream`` while reading ``n`` response bytes (a host that reads as it writes)."""
    writer = threading.Thread(target=port.write, args=(stream,))
    writer.start()
    got = port.read(n)
    writer.join()
    return got


def settle(board, timeout=READ_TIMEOUT) -> dict:
    """The board's counters once its clock has stopped (everything in flight has landed): two
    looks 50 ms apart find the harness asleep, at the same cycle."""
    deadline = time.monotonic() + timeout
    last = board.stats()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = board.stats()
        if now["cycles"] == last["cycles"] and not now["clocking"] and not last["clocking"]:
            return now
        last = now
    raise AssertionError(f"the simulated board never went idle: {last}")


def hand_program(config, rng):
    """LOAD, GEMM, STORE of ACC and of a buffer, an undefined opcode (status ILLEGAL_OPCODE,
    then nothing executes until SYNC), SYNC, then a second batch that runs cleanly."""
    cfg = PRESETS[config]
    k = 5
    prog = Program(cfg)
    prog.load(Buffer.INP, 0, random_words(cfg, Buffer.INP, k, rng))
    prog.load(Buffer.WGT, 0, random_words(cfg, Buffer.WGT, 2 * k, rng))
    prog.gemm(0, 0, 0, k, 1, 2).store(Buffer.ACC, 0, 2 * cfg.rows)
    prog.append(RawInstruction(0xF))  # opcode 15 is undefined
    prog.store(Buffer.WGT, 0, 3).sync()
    prog.append(Instruction(Opcode.NOP)).store(Buffer.INP, 0, k).sync(counters=True)
    return prog


def small_random_program(config, seed):
    """Every opcode the configuration implements, some faulting; small enough that the board's
    RX FIFO absorbs whatever the accelerator is not ready for."""
    return random_program(config, seed, n_instr=24, illegal_rate=0.15, window=16, max_k=8,
                          max_count=8)


@pytest.mark.parametrize("config", ["ice40", "ecp5"])
def test_programs_answer_as_the_golden_model(config, board_available):
    rng = np.random.default_rng(SEEDS[0])
    programs = [hand_program(config, rng), small_random_program(config, SEEDS[1])]
    check_programs(config, programs)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ice40", "ecp5"])
def test_many_random_programs_answer_as_the_golden_model(config, board_available):
    seed = seed_from_env()
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    check_programs(config, [small_random_program(config, int(rng.integers(1 << 32)))
                            for _ in range(20)])


def check_programs(config, programs):
    """Runs ``programs`` one after another on one board; each answer equals the golden model's
    (one machine across them all, as the board keeps its state), and the counters add up."""
    golden = GoldenMachine(config)
    sent = answered = 0
    with SimulatedBoard(config) as board, open_port(board) as port:
        for prog in programs:
            stream = prog.to_bytes()
            want = golden.run(stream)
            got = exchange(port, stream, len(want))
            mismatch = compare_responses(config, stream, want, got)
            assert mismatch is None, str(mismatch)
            sent, answered = sent + len(stream), answered + len(want)
        stats = settle(board)
    assert stats["rx_overflow"] == 0 and stats["host_overruns"] == 0
    assert stats["tx_framing_errors"] == 0 and stats["faults_applied"] == 0
    assert stats["host_bytes"] == stats["line_bytes"] == sent
    assert stats["board_bytes"] == stats["host_delivered"] == answered


def long_gemms(cfg, n):
    """``n`` GEMMs of 64 blocks each (ice40: 8x8 blocks of k = 64), on loaded operands."""
    k, m = 64, 8
    prog = Program(cfg)
    prog.load(Buffer.INP, 0, np.ones((k * m, cfg.rows), np.int8))
    prog.load(Buffer.WGT, 0, np.ones((k * m, cfg.cols), np.int8))
    for _ in range(n):
        prog.gemm(0, 0, 0, k, m, m)
    return prog


def test_a_host_that_outruns_the_fifo_during_long_gemms_overflows_it(board_available):
    """GEMM words arrive faster than the GEMMs take them; a LOAD behind them has nowhere to go:
    the board's RX FIFO (1024 bytes on the iCEBreaker) overflows and the harness sees it."""
    cfg = PRESETS["ice40"]
    prog = long_gemms(cfg, 24)
    prog.load(Buffer.WGT, 0, np.zeros((512, cfg.cols), np.int8)).sync()
    stream = prog.to_bytes()
    assert len(stream) > 2 * SimulatedBoard.default_link("ice40").rx_fifo_bytes
    with SimulatedBoard("ice40") as board, open_port(board, timeout=0.5) as port:
        port.write(stream)
        stats = settle(board)
        assert stats["rx_overflow"] > 0 and stats["link_error"] == 1
        assert port.read(64) == b""  # the SYNC was lost with the overflow
    # The same GEMMs with the host waiting for each SYNC's answer: nothing overflows.
    golden = GoldenMachine(cfg)
    with SimulatedBoard("ice40") as board, open_port(board) as port:
        for chunk in [long_gemms(cfg, 12).sync(), long_gemms(cfg, 12).sync()]:
            stream = chunk.to_bytes()
            want = golden.run(stream)
            assert compare_responses(cfg, stream, want, exchange(port, stream, len(want))) is None
        assert settle(board)["rx_overflow"] == 0


def test_a_host_that_does_not_read_a_large_store_loses_bytes(board_available):
    cfg = PRESETS["ice40"]
    host_buffer = 4096
    rng = np.random.default_rng(SEEDS[0])
    prog = Program(cfg).load(Buffer.WGT, 0, random_words(cfg, Buffer.WGT, 512, rng))
    for _ in range(3):
        prog.store(Buffer.WGT, 0, 512)  # 2 KiB each
    stream = prog.sync().to_bytes()
    want = GoldenMachine(cfg).run(stream)
    assert len(want) > host_buffer + 1024
    with (SimulatedBoard("ice40", host_buffer=host_buffer) as board,
          open_port(board, timeout=0.5) as port):
        port.write(stream)
        stats = settle(board)
        assert stats["board_bytes"] == len(want) and stats["host_overruns"] > 0
        assert (stats["host_delivered"] + stats["tx_pending"] + stats["host_overruns"]
                == len(want))
        got = port.read(len(want))
        stats = board.stats()
    assert stats["tx_pending"] == 0
    assert stats["host_delivered"] + stats["host_overruns"] == len(want)
    # What the host gets is what fitted: the head of the answer, about host_buffer bytes.
    assert len(got) == stats["host_delivered"]
    assert host_buffer - 1024 <= len(got) <= host_buffer + 1024
    assert got == want[:len(got)]


# -- faults --------------------------------------------------------------------------------------

def store_program(cfg, rng, words=16):
    prog = Program(cfg).load(Buffer.WGT, 0, random_words(cfg, Buffer.WGT, words, rng))
    return prog.store(Buffer.WGT, 0, words).sync()


def test_a_corrupted_host_byte_is_what_the_board_computes_on(board_available):
    cfg = PRESETS["ice40"]
    stream = store_program(cfg, np.random.default_rng(SEEDS[0])).to_bytes()
    at, mask = 16 + 9, 0x5A  # a byte of the LOAD data
    bad = bytearray(stream)
    bad[at] ^= mask
    want = GoldenMachine(cfg).run(bytes(bad))
    assert want != GoldenMachine(cfg).run(stream)
    with SimulatedBoard("ice40") as board:
        board.inject("corrupt_host", at, mask=mask)
        with open_port(board) as port:
            got = exchange(port, stream, len(want))
        assert settle(board)["faults_applied"] == 1
    assert got == want


def test_a_dropped_host_byte_changes_the_answer(board_available):
    cfg = PRESETS["ice40"]
    rng = np.random.default_rng(SEEDS[0])
    stream = store_program(cfg, rng).to_bytes()
    want = GoldenMachine(cfg).run(stream)
    with SimulatedBoard("ice40") as board, open_port(board, timeout=1.0) as port:
        board.inject("drop_host", 20)
        got = exchange(port, stream, len(want))
        stats = settle(board)
        assert stats["faults_applied"] == 1
        assert stats["host_bytes"] == len(stream) and stats["line_bytes"] == len(stream) - 1
        # The LOAD takes the STORE's first byte as its last data byte: the board is out of step.
        assert got != want
        if "resync" in board.ports:
            # The bridge resets the accelerator after the silence (the harness clocks through
            # it); the next program starts clean.
            assert stats["resyncs"] == 1
            port.reset_input_buffer()
            again = store_program(cfg, rng).to_bytes()
            want = GoldenMachine(cfg).run(again)
            assert exchange(port, again, len(want)) == want


def test_board_bytes_dropped_corrupted_or_unheard(board_available):
    cfg = PRESETS["ice40"]
    rng = np.random.default_rng(SEEDS[1])
    progs = [store_program(cfg, rng) for _ in range(4)]
    golden = GoldenMachine(cfg)
    wants = [golden.run(p.to_bytes()) for p in progs]
    with SimulatedBoard("ice40") as board, open_port(board, timeout=1.0) as port:
        sent = 0  # board bytes so far
        # corrupt: the byte arrives XORed
        board.inject("corrupt_board", sent + 7, mask=0x81)
        got = exchange(port, progs[0].to_bytes(), len(wants[0]))
        expect = bytearray(wants[0])
        expect[7] ^= 0x81
        assert got == bytes(expect)
        sent += len(wants[0])
        # drop: the byte never arrives
        board.inject("drop_board", sent + 3)
        got = exchange(port, progs[1].to_bytes(), len(wants[1]))
        assert got == wants[1][:3] + wants[1][4:]
        sent += len(wants[1])
        # deaf: nothing from byte 5 of this answer on, until recover
        board.inject("deaf", sent + 5)
        got = exchange(port, progs[2].to_bytes(), len(wants[2]))
        assert got == wants[2][:5]
        stats = settle(board)
        assert stats["deaf_dropped"] == len(wants[2]) - 5
        sent += len(wants[2])
        board.recover()
        got = exchange(port, progs[3].to_bytes(), len(wants[3]))
        assert got == wants[3]
        stats = settle(board)
    assert stats["board_bytes"] == sent + len(wants[3])
    assert stats["faults_applied"] == 2


def test_fault_arguments_are_checked(board_available):
    with SimulatedBoard("ice40") as board:
        with pytest.raises(ConfigError, match="not one of"):
            board.inject("flip", 3)
        with pytest.raises(ConfigError, match="takes no mask"):
            board.inject("drop_host", 3, mask=1)
        with pytest.raises(ConfigError, match="mask=256"):
            board.inject("corrupt_board", 3, mask=256)
        with pytest.raises(ConfigError, match="at=-1"):
            board.inject("deaf", -1)
        with open_port(board) as port:
            port.write(Program("ice40").sync().to_bytes())
            assert len(port.read(STATUS_BYTES)) == STATUS_BYTES
        with pytest.raises(ConfigError, match="host byte 3 has passed already"):
            board.inject("drop_host", 3)
        with pytest.raises(ConfigError, match="board byte 0 has passed already"):
            board.inject("corrupt_board", 0, mask=1)
    assert set(FAULT_KINDS) == {"drop_host", "corrupt_host", "drop_board", "corrupt_board",
                                "deaf"}
    with pytest.raises(ConfigError, match="divisor=2"):
        SimulatedBoard("ice40", divisor=2)
    with pytest.raises(ConfigError, match="no board runs config 'sim'"):
        SimulatedBoard("sim")


def test_a_board_waiting_for_the_host_is_not_clocked(board_available):
    """A LOAD without its data: the accelerator is busy but waits for the host; the simulator
    stops clocking (after the resync, if the gateware has one) instead of burning CPU."""
    cfg = PRESETS["ice40"]
    header = Instruction(Opcode.LOAD, buf=Buffer.WGT, addr=0, count=4).to_bytes()
    with SimulatedBoard("ice40") as board, open_port(board) as port:
        port.write(header)
        stats = settle(board)
        time.sleep(0.3)
        assert board.stats()["cycles"] == stats["cycles"]
        if "resync" in board.ports:
            assert stats["resyncs"] == 1 and stats["busy"] == 0
        else:
            assert stats["busy"] == 1 and stats["cycles"] < 100_000
            # The rest of the LOAD wakes it up, and the board answers as the golden model.
            rest = Program(cfg).sync().to_bytes()
            port.write(bytes(4 * cfg.word_bytes(Buffer.WGT)))
            want = GoldenMachine(cfg).run(header + bytes(4 * cfg.word_bytes(Buffer.WGT)) + rest)
            assert exchange(port, rest, len(want)) == want


# -- the process -----------------------------------------------------------------------------------

def test_the_process_never_outlives_the_object(board_available):
    board = SimulatedBoard("ice40")
    proc = board._proc
    assert os.path.exists(board.port) and proc.poll() is None
    board.close()
    assert proc.poll() is not None
    with pytest.raises(SimulatorError, match="closed"):
        board.stats()
    board = SimulatedBoard("ice40")
    proc = board._proc
    del board
    gc.collect()
    assert proc.poll() is not None


def test_a_dead_process_is_a_simulator_error_with_its_log(board_available):
    with SimulatedBoard("ice40") as board:
        os.kill(board._proc.pid, signal.SIGKILL)
        board._proc.wait()
        with pytest.raises(SimulatorError, match=r"exit code -9"):
            board.stats()
