"""The board backend over the simulated board link (``tinyaccel.sim.serial_link``).

``BoardBackend`` reads each instruction's response in turn; an SGQ's by its length header, then
the rest of its frame. The simulated link runs the golden model behind a pyserial-like port and
delivers the answer in random-sized chunks, so every test here goes through the incremental
reader; the expected responses come from the golden backend, run on the same program.
"""

import numpy as np
import pytest

from tinyaccel.boards.link import LinkSpec
from tinyaccel.errors import BackendUnavailable, ProtocolError
from tinyaccel.hw.config import PRESETS
from tinyaccel.hw.isa import Buffer, Instruction, Opcode
from tinyaccel.hw.isa import SgqMode as Mode
from tinyaccel.protocol import (
    SGQ_LENGTH_BYTES,
    Program,
    StatusReport,
    response_length,
    sgq_response_length,
)
from tinyaccel.sim.golden import GoldenMachine
from tinyaccel.sim.numerics import sgq_stripe_modes
from tinyaccel.sim.serial_link import SimulatedSerial
from tinyaccel.sw.link import RecordingPort
from tinyaccel.sw.runtime import BoardBackend, Device

CONFIGS = ["sim", "ecp5", "ice40"]
#: Fixed seeds of the data and of the link's chunk sizes, one per case.
SEEDS = [1401, 1402]
SYNC_BYTES = response_length(PRESETS["sim"], Instruction(Opcode.SYNC, counters=1))  # its answer


#: A fast link: the resync silence is 50 ms.
SPEC = LinkSpec(silence_bytes=5_000)


def board(config, seed, **link_options):
    """A board on the golden link; ``tamper`` options apply after the opening resync."""
    tamper = link_options.pop("tamper", None)
    link = SimulatedSerial(config, seed=seed, silence_s=SPEC.silence_s, **link_options)
    recorder = RecordingPort(link)
    dev = Device(BoardBackend(PRESETS[config], link=recorder, spec=SPEC), config)
    link.tamper = tamper
    return dev, link


def replays(dev):
    """The whole session (resyncs, probes and all) replayed on a fresh golden machine gives
    the same bytes, byte for byte."""
    port = dev.backend._port
    return GoldenMachine(dev.config).run(bytes(port.sent)) == bytes(port.received)


def same(got, want):
    """Responses equal entry by entry (arrays element-wise, SGQ bytes, status reports). A
    SYNC's counts differ by the board link's probes: status and fault are compared."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype, i
            assert np.array_equal(g, w), i
        elif isinstance(w, StatusReport):
            assert (g.status, g.error_pc, g.error_opcode, g.acc_saturated, g.config_id) == \
                (w.status, w.error_pc, w.error_opcode, w.acc_saturated, w.config_id), i
        else:
            assert type(g) is type(w) and g == w, i


def stripes(rng, cols, kinds, stripe_len, floor):
    """OUT words, ``stripe_len`` per stripe: ``base`` stripes all ``floor``, the others values
    above ``floor`` spanning ``2``, ``15`` or the whole rest of the INT8 range."""
    out = []
    for kind in kinds:
        shape = (stripe_len, cols)
        if kind == "base":
            out.append(np.full(shape, floor))
        else:
            span = {"narrow": 2, "mid": 15, "wide": 127 - floor}[kind]
            lo = int(rng.integers(floor, 128 - span))
            out.append(rng.integers(lo, lo + span + 1, shape))
    return np.concatenate(out).astype(np.int8)


def sgq_program(config, seed):
    """Several SGQ groups (an empty one, BASE and coded stripes, lossless and lossy), a STORE
    between them and a final SYNC with counters; returns the program and its groups."""
    cfg = PRESETS[config]
    rng = np.random.default_rng(seed)
    relu = stripes(rng, cfg.cols, ["base", "narrow", "base", "mid", "wide", "base"], 2, 0)
    signed = stripes(rng, cfg.cols, ["narrow", "mid", "wide", "narrow"], 1, -128)
    long = stripes(rng, cfg.cols, ["mid", "base", "wide"], 4, -20)
    groups = [(0, relu, 2, 0), (40, relu[:0], 3, 0), (20, signed, 1, 3), (60, long, 4, 2)]
    prog = Program(cfg)
    for addr, values, _, _ in groups:
        if len(values):
            prog.load(Buffer.OUT, addr, values)
    prog.sgq(0, len(relu), 2, 0).sgq(40, 0, 3, 0).store(Buffer.OUT, 20, 3)
    prog.sgq(20, len(signed), 1, 3).sgq(60, len(long), 4, 2).sync(counters=True)
    return prog, groups


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_sgq_program_answers_as_the_golden_backend(config, seed):
    print(f"seed={seed}")
    prog, groups = sgq_program(config, seed)
    # The data holds what the test is about: BASE stripes and every coded width.
    modes = set()
    for _, values, stripe_len, max_shift in groups:
        modes |= {Mode(m) for m in sgq_stripe_modes(values, stripe_len, max_shift)[1]}
    assert modes == set(Mode), modes
    assert response_length(config, prog) is None  # no length in advance

    dev, link = board(config, seed, max_chunk=5)
    got = dev.run(prog)
    golden = Device("golden", config)
    want = golden.run(prog)
    same(got, want)
    sgq = [r for i, r in zip(prog.instructions, got, strict=True) if i.opcode == Opcode.SGQ]
    assert [len(r) > 0 for r in sgq] == [True, False, True, True]  # the empty group sends none
    cfg = PRESETS[config]
    total = (sum(sgq_response_length(cfg, len(r)) for r in sgq)
             + 3 * cfg.word_bytes(Buffer.OUT) + SYNC_BYTES)
    assert link.reads >= total // 5 and link.in_waiting == 0  # read in chunks of <= 5 bytes

    # The board keeps its state: a second program encodes what the first loaded.
    again = Program(config).sgq(60, len(groups[3][1]), 4, 2).sync()
    repeat = dev.run(again)
    same(repeat, golden.run(again))
    assert repeat[0] == sgq[3]
    assert replays(dev)


@pytest.mark.parametrize("config", CONFIGS)
def test_store_and_sync_only(config):
    """No SGQ: the same reader, lengths known; LOAD data shaped like an instruction word is
    skipped as data (the reader walks the host stream as the decoder does)."""
    seed = SEEDS[0]
    print(f"seed={seed}")
    cfg = PRESETS[config]
    rng = np.random.default_rng(seed)
    word = Instruction(Opcode.SGQ, out_addr=0, count=8, stripe_len=1).to_bytes()
    per = cfg.word_bytes(Buffer.OUT)
    fake = np.frombuffer(word + bytes(-len(word) % per), np.int8).reshape(-1, cfg.cols)
    prog = Program(cfg).load(Buffer.OUT, 0, fake)
    prog.load(Buffer.OUT, 8, rng.integers(-128, 128, (8, cfg.cols)).astype(np.int8))
    prog.store(Buffer.OUT, 0, 16).store(Buffer.MASK, 0, 1).sync(counters=True)
    assert response_length(cfg, prog) is not None
    dev, _ = board(config, seed, max_chunk=3)
    got = dev.run(prog)
    same(got, Device("golden", config).run(prog))
    assert got[2][:len(fake)].tobytes() == fake.tobytes()
    assert replays(dev)


def test_a_truncated_answer_names_the_instruction():
    """The link loses the last bytes: the reader says which instruction it was waiting for."""
    config, seed = "ice40", SEEDS[0]
    print(f"seed={seed}")
    prog, _ = sgq_program(config, seed)
    last = len(prog) - 1
    dev, link = board(config, seed, tamper=lambda b: b[:-3])
    with pytest.raises(BackendUnavailable) as err:
        dev.run(prog)
    msg = str(err.value)
    assert f"instruction {last} (SYNC(" in msg
    assert "3 bytes of its response still due" in msg
    assert link.port in msg and f"after {link.timeout} s" in msg
    # Cut inside the frame of the last SGQ instead.
    dev, link = board(config, seed, tamper=lambda b: b[:-(SYNC_BYTES + 2)])
    with pytest.raises(BackendUnavailable, match=rf"instruction {last - 1} \(SGQ\(") as err:
        dev.run(prog)
    assert "SGQ frame after a length header of" in str(err.value)


def _with_first_header(length):
    """Tamper: overwrite the first 4 response bytes (the program starts with an SGQ)."""
    return lambda b: length.to_bytes(SGQ_LENGTH_BYTES, "little") + b[SGQ_LENGTH_BYTES:]


@pytest.mark.parametrize("config", CONFIGS)
def test_a_corrupted_sgq_length_header_is_a_protocol_error(config):
    seed = SEEDS[1]
    print(f"seed={seed}")
    cfg = PRESETS[config]
    rng = np.random.default_rng(seed)
    values = stripes(rng, cfg.cols, ["narrow", "base", "narrow", "base"], 2, -128)
    prog = Program(cfg).sgq(0, 8, 2, 0).sync()  # answered by the status record only
    setup = Program(cfg).load(Buffer.OUT, 0, values)
    true_length = len(Device("golden", cfg).run(Program(cfg).extend(setup).extend(prog))[1])
    assert sgq_response_length(cfg, 0) < sgq_response_length(cfg, true_length)

    # More than 8 words of INT8 can ever take: refused at once, without waiting for it.
    dev, link = board(config, seed)
    dev.run(setup)
    link.tamper = _with_first_header(0x7FFF_FFFF)
    with pytest.raises(ProtocolError, match=rf"instruction 0 \(SGQ\(.*{0x7FFF_FFFF}"):
        dev.run(prog)
    assert link.timeouts == 0

    # Shorter than the payload: the answer has bytes left over, the stream is out of sync.
    dev, link = board(config, seed)
    dev.run(setup)
    link.tamper = _with_first_header(0)
    with pytest.raises(ProtocolError, match="out of sync"):
        dev.run(prog)

    # Longer than what follows it but possible (small codes): the reader waits for bytes that
    # never come and says for what.
    longer = true_length + response_length(cfg, Instruction(Opcode.SYNC)) + cfg.beat_bytes
    dev, link = board(config, seed)
    dev.run(setup)
    link.tamper = _with_first_header(longer)
    with pytest.raises(BackendUnavailable, match=f"length header of {longer}"):
        dev.run(prog)


def test_no_port_names_the_port_option():
    with pytest.raises(BackendUnavailable, match="--port"):
        BoardBackend(PRESETS["sim"])
    with pytest.raises(BackendUnavailable, match="--port"):
        Device("board", "sim")
    with pytest.raises(BackendUnavailable, match="not both"):
        BoardBackend(PRESETS["sim"], port="/dev/ttyUSB0", link=SimulatedSerial("sim"))


def test_the_simulated_link_behaves_like_a_port():
    """Chunks never exceed what is asked or waiting; nothing waiting reads as a timeout."""
    seed = SEEDS[0]
    print(f"seed={seed}")
    link = SimulatedSerial("ice40", seed=seed, max_chunk=4)
    stream = Program("ice40").sync(counters=True).to_bytes()
    assert link.write(stream[:10]) == 10 and link.in_waiting == 0  # half an instruction
    link.write(stream[10:])
    link.flush()
    assert link.in_waiting == SYNC_BYTES
    sizes = []
    while chunk := link.read(6):
        sizes.append(len(chunk))
    assert sum(sizes) == SYNC_BYTES and max(sizes) <= 4 and len(set(sizes)) > 1
    assert link.timeouts == 1
    link.write(stream)
    link.reset_input_buffer()
    assert link.in_waiting == 0 and link.read(1) == b""
    link.close()
    with pytest.raises(OSError, match="closed"):
        link.read(1)
