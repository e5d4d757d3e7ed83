"""The board link (``tinyaccel.sw.link``): pacing, the response walker, the link trailer checks,
faults and the resync, over the golden-model link (``SimulatedSerial``).

The Verilated board (UART, FIFO, bridge) is exercised in tests/test_board_sim.py; here the
logic of the driver is checked exhaustively where it can be: every single-byte corruption of an
answer, every probe placement rule, every fault kind.
"""

import numpy as np
import pytest

from tinyaccel.boards.link import LinkSpec
from tinyaccel.errors import (
    DeviceError,
    GatewareMismatch,
    IntegrityError,
    LinkTimeout,
    ProtocolError,
    TinyAccelError,
)
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import INSTR_BYTES, Buffer, Instruction, Opcode
from tinyaccel.protocol import (
    Program,
    check_link,
    decode_fields,
    iter_stream,
    parse_responses,
    response_length,
)
from tinyaccel.sim.serial_link import SimulatedSerial
from tinyaccel.sw.link import ResponseWalker, pace
from tinyaccel.sw.runtime import BoardBackend, Device

SEED = 1501
#: A fast link for tests: the resync silence is 50 ms.
SPEC = LinkSpec(rx_fifo_bytes=256, silence_bytes=5_000)


def board(config, seed=SEED, spec=SPEC, **options):
    link = SimulatedSerial(config, seed=seed, silence_s=spec.silence_s, **options)
    return Device(BoardBackend(PRESETS[config], link=link, spec=spec), config), link


def mixed_program(config, seed=SEED, load_words=40):
    """LOADs big and small, a GEMM, REQUANT, STOREs: the shape of a compiled layer."""
    cfg = PRESETS[config]
    rng = np.random.default_rng(seed)
    prog = Program(cfg)
    prog.load(Buffer.INP, 0, rng.integers(-128, 128, (load_words, cfg.rows), dtype=np.int8))
    prog.load(Buffer.WGT, 0, rng.integers(-128, 128, (4, cfg.cols), dtype=np.int8))
    prog.gemm(0, 0, 0, k=4, m_blocks=2)
    for i in range(6):
        prog.load(Buffer.OUT, i, rng.integers(-128, 128, (1, cfg.cols), dtype=np.int8))
    prog.store(Buffer.ACC, 0, 2 * cfg.rows).store(Buffer.OUT, 0, 6)
    return prog.sync(counters=True)


def unpaced(config, paced, spans):
    return b"".join(paced[s.start:s.end] for s in spans if not s.probe)


@pytest.mark.parametrize("config", ["ice40", "ecp5"])
@pytest.mark.parametrize("window", [64, 256, 1024])
def test_pace_rules(config, window):
    """Probes are SYNC keep=1; removing them gives the program back; no stretch without a
    response is longer than half a window; a LOAD longer than that follows a SYNC."""
    cfg = PRESETS[config]
    stream = mixed_program(config).to_bytes()
    paced, spans = pace(cfg, stream, window)
    assert unpaced(config, paced, spans) == stream
    assert pace(cfg, stream, window) == (paced, spans)  # deterministic
    assert [s.index for s in spans if not s.probe] == list(range(len(list(iter_stream(cfg,
                                                                                     stream)))))
    run = 0
    for k, span in enumerate(spans):
        code, fields = decode_fields(span.word)
        size = span.end - span.start
        if span.probe:
            assert code == Opcode.SYNC.value and fields["keep"] == 1
            assert fields["counters"] == 0 and fields["clear"] == 0
        if size > window // 2:
            assert spans[k - 1].opcode == Opcode.SYNC.value, k  # the big LOAD is drained
        else:
            assert run + size <= window // 2 or span.probe, k
        answers = response_length(cfg, span.word) != 0
        run = 0 if answers else run + size
    assert any(s.probe for s in spans) or len(paced) <= window // 2


def test_pace_needs_a_whole_program():
    cfg = PRESETS["ice40"]
    with pytest.raises(ProtocolError, match="ending with SYNC"):
        pace(cfg, Program(cfg).nop().to_bytes(), 256)


@pytest.mark.parametrize("config", ["ice40", "ecp5"])
def test_walker_splits_answers_like_parse_responses(config):
    """Fed in random chunks, the walker cuts the answer where parse_responses does."""
    cfg = PRESETS[config]
    prog = mixed_program(config)
    out = Device("golden", cfg).backend.exchange(prog.to_bytes())
    words = [w for w, _ in iter_stream(cfg, prog.to_bytes())]
    rng = np.random.default_rng(SEED)
    walker, got, pos = ResponseWalker(cfg, words), [], 0
    while pos < len(out):
        n = int(rng.integers(1, 40))
        got += walker.feed(out[pos:pos + n])
        pos += n
    assert walker.done
    assert b"".join(r for _, r in got) == out
    parsed = parse_responses(cfg, prog, out)
    assert [p for p, _ in got] == [i for i, r in enumerate(parsed) if r is not None]
    with pytest.raises(ProtocolError, match="out of sync"):
        walker.feed(b"\x00")


def test_every_single_byte_corruption_of_an_answer_is_caught():
    """Flip each byte of a golden answer in turn: never accepted as it is."""
    cfg = PRESETS["ice40"]
    prog = Program(cfg).load(Buffer.OUT, 0, np.arange(16, dtype=np.int8).reshape(-1, cfg.cols))
    prog.store(Buffer.OUT, 0, 16 // cfg.cols).sync(counters=True)
    stream = prog.to_bytes()
    out = Device("golden", cfg).backend.exchange(stream)
    check_link(cfg, stream, out)  # the clean answer passes
    for i in range(len(out)):
        bad = bytearray(out)
        bad[i] ^= 0x10
        with pytest.raises((IntegrityError, ProtocolError, GatewareMismatch)):
            check_link(cfg, stream, bytes(bad))
    # Each host byte flipped on its way to the board: a named error, never a quiet answer.
    dev, link = board("ice40")
    for i in range(len(stream)):
        link.tamper_host = None
        dev.backend.resync()  # here, so that the flip hits the program, not the resync
        link.tamper_host = _flip_once(i)
        with pytest.raises(TinyAccelError):
            dev.run(prog)
    link.tamper_host = None
    assert np.array_equal(dev.run(prog)[1], Device("golden", cfg).run(prog)[1])


def _flip_once(at):
    """tamper_host: flip bit 0 of the ``at``-th host byte of the next exchange."""
    state = {"pos": 0, "done": False}

    def flip(data):
        start, state["pos"] = state["pos"], state["pos"] + len(data)
        if state["done"] or not start <= at < state["pos"]:
            return data
        state["done"] = True
        data = bytearray(data)
        data[at - start] ^= 0x01
        return bytes(data)
    return flip


@pytest.mark.parametrize("config", ["ice40", "ecp5"])
def test_paced_board_equals_golden(config):
    """Through the paced link (probes inserted), the same responses as the golden backend."""
    prog = mixed_program(config, load_words=60)
    dev, link = board(config)
    got = dev.run(prog)
    want = Device("golden", config).run(prog)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, np.ndarray):
            assert np.array_equal(g, w)
        elif w is not None and not isinstance(w, bytes):
            assert g.status == w.status and g.error_pc == w.error_pc
        else:
            assert g == w
    assert dev.backend.probes > 0
    assert link.in_waiting == 0


def test_a_fault_before_a_probe_keeps_the_programs_index():
    """An illegal instruction, then enough bytes that probes follow it: the board's error_pc
    counts the probes, the driver reports the program's index — the golden model's."""
    cfg = PRESETS["ice40"]
    prog = Program(cfg).nop()
    prog.append(Instruction(Opcode.GEMM, k=0))  # BAD_SHAPE at index 1
    prog.extend(mixed_program("ice40", load_words=60))
    with pytest.raises(DeviceError) as want:
        Device("golden", cfg).run(prog)
    dev, _ = board("ice40")
    with pytest.raises(DeviceError) as got:
        dev.run(prog)
    assert dev.backend.probes > 0
    assert (got.value.status, got.value.pc) == (want.value.status, want.value.pc) == \
        (want.value.status, 1)


def test_gateware_of_another_config_is_refused_at_open():
    link = SimulatedSerial("ecp5", silence_s=SPEC.silence_s)
    with pytest.raises(GatewareMismatch, match="'ice40'"):
        BoardBackend(PRESETS["ice40"], link=link, spec=SPEC)


def _run_after_fault(dev, prog, golden):
    """The next program after a fault runs clean, and the board backend resynced first."""
    before = dev.backend.generation
    got = dev.run(prog)
    assert dev.backend.generation == before  # the pending resync was already counted
    assert np.array_equal(got[1], golden.run(prog)[1])


def test_faults_end_in_named_errors_and_the_next_program_runs_clean():
    """Each fault on the golden link: the named error, then the next program is right."""
    cfg = PRESETS["ice40"]
    prog = Program(cfg).load(Buffer.OUT, 0, np.arange(32, dtype=np.int8).reshape(-1, cfg.cols))
    prog.store(Buffer.OUT, 0, 32 // cfg.cols).sync()
    golden = Device("golden", cfg)

    dev, link = board("ice40")
    gen = dev.backend.generation
    link.tamper = lambda b: b[:-3]  # the board's last bytes are lost
    with pytest.raises(LinkTimeout, match=r"instruction 2 \(SYNC"):
        dev.run(prog)
    assert dev.backend.generation == gen + 1  # a resync is due: state may be gone
    link.tamper = None
    _run_after_fault(dev, prog, golden)

    link.tamper = lambda b: b[:5] + bytes([b[5] ^ 0x40]) + b[6:]  # a board byte corrupted
    with pytest.raises(IntegrityError, match="tx_crc"):
        dev.run(prog)
    link.tamper = None
    _run_after_fault(dev, prog, golden)

    seen = []

    def corrupt_host(data):  # one host byte corrupted (a LOAD data byte)
        data = bytearray(data)
        if not seen and len(data) > INSTR_BYTES + 3:
            data[INSTR_BYTES + 3] ^= 0x01
            seen.append(True)
        return bytes(data)
    link.tamper_host = corrupt_host
    with pytest.raises(IntegrityError, match="rx_crc"):
        dev.run(prog)
    link.tamper_host = None
    _run_after_fault(dev, prog, golden)

    dropped = []

    def drop_host(data):  # one host byte lost: the board waits for the rest of an instruction
        if not dropped and len(data) > 20:
            dropped.append(True)
            return data[:20] + data[21:]
        return data
    link.tamper_host = drop_host
    with pytest.raises(LinkTimeout):
        dev.run(prog)
    link.tamper_host = None
    resets = link.resets
    _run_after_fault(dev, prog, golden)
    assert link.resets == resets + 1  # the silence reset the board's accelerator


def test_an_interrupted_exchange_resyncs_before_the_next():
    """Ctrl-C in the middle of a LOAD: the board is left mid-instruction; the next program
    starts with the resync and runs clean."""
    cfg = PRESETS["ice40"]
    prog = Program(cfg).load(Buffer.OUT, 0, np.arange(64, dtype=np.int8).reshape(-1, cfg.cols))
    prog.store(Buffer.OUT, 0, 64 // cfg.cols).sync()
    dev, link = board("ice40")
    write = link.write

    def interrupted(data):  # 7 bytes go out, then ^C
        write(data[:7])
        link.write = write
        raise KeyboardInterrupt
    link.write = interrupted
    with pytest.raises(KeyboardInterrupt):
        dev.run(prog)
    resets = link.resets
    _run_after_fault(dev, prog, Device("golden", cfg))
    assert link.resets == resets + 1
