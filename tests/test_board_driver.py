"""The real driver against the simulated board: ``BoardBackend`` (pyserial, paced, checked) on
the Verilated board gateware behind a pseudo-terminal (``tinyaccel.sw.board.simulated_board``).

The short set of ``make test``: compiled digits-cnn work, the GEMMs of a training step, an SGQ
program, an illegal instruction, a fault and its resync — on the iCEBreaker's gateware (``ice40``,
its 1 KiB receive FIFO, UART at 4 cycles per bit). Every byte that crossed the link is replayed
on the golden model and compared by the scoreboard. The long set is ``tinyaccel bench board``
(``make regress``).
"""

import numpy as np
import pytest

from tinyaccel.errors import DeviceError, IntegrityError
from tinyaccel.hw.isa import Buffer, Instruction, Opcode
from tinyaccel.protocol import Program
from tinyaccel.sim.golden import GoldenMachine
from tinyaccel.sim.randprog import sgq_group
from tinyaccel.sim.scoreboard import compare_responses
from tinyaccel.sw.gemm_run import Gemm, run_gemms
from tinyaccel.sw.runtime import Device

pytestmark = pytest.mark.rtl

CONFIG = "ice40"
SEED = 1601


@pytest.fixture(scope="module")
def device():
    from tinyaccel.errors import BackendUnavailable
    from tinyaccel.sw.board import simulated_board
    try:
        with simulated_board(CONFIG, seed=SEED) as dev:
            yield dev
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


class Replay:
    """What crossed the link since the last check, replayed on a golden machine."""

    def __init__(self, device):
        self.port = device.link._port
        self.golden = GoldenMachine(device.config)
        self.config = device.config
        self.sent = self.received = 0

    def check(self):
        sent = bytes(self.port.sent[self.sent:])
        got = bytes(self.port.received[self.received:])
        self.sent, self.received = len(self.port.sent), len(self.port.received)
        assert compare_responses(self.config, sent, self.golden.run(sent), got) is None
        return len(sent), len(got)


@pytest.fixture(scope="module")
def replay(device):
    r = Replay(device)
    r.check()  # the opening handshake
    return r


def test_compiled_digits_layers_equal_golden(device, replay):
    from tinyaccel.models import zoo
    from tinyaccel.models.data import calibration_batch, load_digits_split
    from tinyaccel.sw.compiler import bind
    from tinyaccel.sw.quant import quantize
    net, _ = zoo.load_or_train("digits-cnn")
    qmodel = quantize(net, calibration_batch())
    x = load_digits_split().x_test[:1]
    got = bind(qmodel, device, 1, "per-layer")(x)
    want = bind(qmodel, Device("golden", CONFIG), 1, "per-layer")(x)
    assert np.array_equal(got.numpy(), want.numpy())
    sent, _ = replay.check()
    assert sent > device.link.spec.window  # paced: more than a FIFO's worth
    assert device.link.probes > 0


def test_training_step_gemms_equal_golden(device, replay):
    """The classifier's forward, dX and dW GEMMs of a digits-cnn training step (batch 2)."""
    rng = np.random.default_rng(SEED)
    gemms = [Gemm(rng.integers(-128, 128, (m, k), dtype=np.int8),
                  rng.integers(-128, 128, (k, n), dtype=np.int8))
             for m, k, n in [(2, 512, 10), (2, 10, 512), (512, 2, 10)]]
    got = run_gemms(device, gemms)
    want = run_gemms(None, gemms)
    for g, w in zip(got.results, want.results, strict=True):
        assert np.array_equal(g, w)
    replay.check()


def test_sgq_and_an_illegal_instruction(device, replay):
    cfg = device.config
    rng = np.random.default_rng(SEED + 1)
    values = sgq_group(rng, 4, 2, cfg.cols)
    prog = Program(cfg).load(Buffer.OUT, 0, values).sgq(0, len(values), 2, 2).sync()
    got = device.run(prog)
    assert got[1] == Device("golden", cfg).run(prog)[1] and len(got[1]) > 0
    bad = Program(cfg).nop().append(Instruction(Opcode.GEMM, k=0)).sync()
    with pytest.raises(DeviceError) as err:
        device.run(bad)
    assert err.value.pc == 1
    replay.check()
    stats = device.board.stats()
    assert stats["rx_overflow"] == 0 and stats["host_overruns"] == 0


def test_a_corrupted_byte_is_caught_and_the_next_program_runs(device, replay):
    cfg = device.config
    data = np.arange(64, dtype=np.int8).reshape(-1, cfg.cols)
    prog = Program(cfg).load(Buffer.OUT, 0, data).store(Buffer.OUT, 0, len(data)).sync()
    board = device.board
    board.inject("corrupt_host", board.stats()["host_bytes"] + 20, mask=0x04)
    with pytest.raises(IntegrityError, match="rx_crc"):
        device.run(prog)
    generation = device.link.generation
    got = device.run(prog)  # resyncs first
    assert np.array_equal(got[1].reshape(data.shape), data)
    assert device.link.generation == generation and device.link.resyncs >= 1
    replay.sent, replay.received = len(replay.port.sent), len(replay.port.received)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ice40", "ecp5"])
def test_the_long_program_set(config):
    """``make regress``: digits-cnn per layer and resident, a training step's GEMMs and random
    programs (SGQ, illegal fields) through the driver on each preset's board; every session
    replayed on the golden model; nothing dropped either way."""
    from tinyaccel.bench.board import compare_workloads
    from tinyaccel.sim.randprog import seed_from_env
    seed = seed_from_env()  # printed: TINYACCEL_SEED=<seed> replays it
    r = compare_workloads(config, 4, seed, n_random=24, images=8)
    assert r["mismatches"] == [] and r["overruns"] == 0
    assert r["programs"] > 24
