"""``tinyaccel bench board``: the real driver against the simulated board.

``BoardBackend`` (pyserial) talks to :class:`tinyaccel.sim.board_sim.SimulatedBoard` — the
Verilated board gateware (UART receiver and transmitter, the board's receive FIFO, the bridge with
its silence resync, the accelerator) behind a pseudo-terminal — exactly as it talks to
``/dev/ttyUSB1``. The UART runs at ``divisor`` cycles per bit (4: the line is 7.5x faster against
the accelerator than on the iCEBreaker, so the accelerator's stalls weigh more on the FIFO than on
a board). Metrics:

* ``board_sim_programs``, ``board_sim_mismatches``, ``board_sim_overruns`` — real compiled work
  (digits-cnn inference layer by layer and resident, the GEMMs of a training step, random
  programs with SGQ and illegal instructions from the regression generator) on each preset; every
  session is replayed on the golden model and must give the same bytes, byte for byte; overruns
  are bytes the board's FIFO or the host's buffer dropped;
* ``link_efficiency`` — payload bytes over the bytes the line could carry in the board's own time
  (its cycle counter), LOAD and STORE each way, the smaller (``tinyaccel board check``);
* ``faults_injected``, ``faults_detected``, ``resync_ok`` — a lost and a corrupted byte each way,
  a board that stops answering, a host interrupted mid-LOAD: each must end in a named error, and
  the next program must run clean;
* ``e2e_images_per_s_<board>`` beside ``compute_images_per_s_<board>`` — digits-cnn on the
  iCEBreaker (30 MHz) and the ULX3S (40 MHz) at 1 Mbaud: the link bytes per image measured here
  (probes and all) over the line rate, plus the accelerator cycles per image measured on the RTL
  at full stream speed, against the cycles alone.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..boards.link import link_for
from ..errors import DeviceError, IntegrityError, LinkTimeout, ProtocolError
from ..hw.config import get_config
from ..hw.isa import Buffer
from ..protocol import Program
from ..sw.board import simulated_board

__all__ = ["run", "compare_workloads", "DEFAULT_CONFIGS"]

DEFAULT_CONFIGS = ("ice40", "ecp5")
#: The boards of the e2e table, with the clock their default bitstream runs at.
BOARD_CLOCKS = {"icebreaker": ("ice40", 30e6), "ulx3s-85f": ("ecp5", 40e6)}


class _Replay:
    """Replays what crossed the link since the last mark on the golden model and compares the
    board's answer with the scoreboard (timing counters aside, zero tolerance otherwise)."""

    def __init__(self, device):
        from ..sim.golden import GoldenMachine
        self.device, self.port = device, device.link._port
        self.golden = GoldenMachine(device.config)
        self.sent = self.received = 0
        self.mismatches: list = []

    def settle(self, label: str) -> None:
        from ..sim.scoreboard import compare_responses
        sent = bytes(self.port.sent[self.sent:])
        got = bytes(self.port.received[self.received:])
        want = self.golden.run(sent)
        mismatch = compare_responses(self.device.config, sent, want, got)
        if mismatch is not None:
            self.mismatches.append(f"{label}: {mismatch}")
        self.sent, self.received = len(self.port.sent), len(self.port.received)


def _programs(cfg, seed: int, count: int):
    """Random programs of the regression generator (SGQ, illegal fields and opcodes included)."""
    from ..sim.randprog import random_program
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield random_program(cfg, rng)


def _training_gemms(batch: int = 1) -> list[tuple[int, int, int]]:
    """(M, K, N) of the forward, dX and dW GEMMs of one digits-cnn training step at ``batch``
    (convolutions as im2col GEMMs)."""
    from ..models import zoo
    net = zoo.build("digits-cnn")
    shapes, h = [], 8
    for module in net.modules():
        name = type(module).__name__
        if name == "Conv2d":
            (kh, kw), (s, _), (p, _) = module.kernel_size, module.stride, module.padding
            h = (h + 2 * p - kh) // s + 1
            m, k, n = batch * h * h, module.in_channels * kh * kw, module.out_channels
        elif name == "Linear":
            m, k, n = batch, module.in_features, module.out_features
        else:
            continue
        shapes += [(m, k, n), (m, n, k), (k, m, n)]  # forward, dX, dW
    return shapes


def _digits(device, images: int, placement: str):
    from ..models import zoo
    from ..models.data import calibration_batch, load_digits_split
    from ..sw.compiler import bind
    from ..sw.quant import quantize
    net, _ = zoo.load_or_train("digits-cnn")
    qmodel = quantize(net, calibration_batch())
    x = load_digits_split().x_test[:images]
    compiled = bind(qmodel, device, min(images, 8), placement)
    return compiled, compiled(x)


def compare_workloads(config: str, divisor: int, seed: int, n_random: int, images: int
                       ) -> dict:
    """Run the program set on one simulated board; count programs, mismatches, overruns."""
    from ..sw.gemm_run import Gemm, run_gemms
    with simulated_board(config, divisor, seed) as device:
        cfg = device.config
        replay = _Replay(device)
        replay.settle("the opening resync")
        _digits(device, images, "per-layer")
        replay.settle("digits-cnn per layer")
        with contextlib.suppress(Exception):  # a preset that cannot hold the model resident
            _digits(device, images, "resident")
        replay.settle("digits-cnn resident")
        rng = np.random.default_rng(seed)
        run_gemms(device, [Gemm(rng.integers(-128, 128, (m, k), dtype=np.int8),
                                rng.integers(-128, 128, (k, n), dtype=np.int8))
                           for m, k, n in _training_gemms()])
        replay.settle("training-step GEMMs")
        for i, prog in enumerate(_programs(cfg, seed, n_random)):
            with contextlib.suppress(DeviceError):
                device.run(prog)
            replay.settle(f"random program {i}")
        stats = device.board.stats()
        return {"programs": device.stats.programs, "mismatches": replay.mismatches,
                "overruns": stats["rx_overflow"] + stats["host_overruns"],
                "probes": device.link.probes,
                "cycles_per_s": stats["cycles"] / max(stats["seconds"], 1e-9)}


def _fault_program(cfg, seed: int) -> Program:
    rng = np.random.default_rng(seed)
    data = rng.integers(-128, 128, (64 // cfg.cols * 4, cfg.cols), dtype=np.int8)
    return Program(cfg).load(Buffer.OUT, 0, data).store(Buffer.OUT, 0, len(data)).sync()


def _faults(config: str, divisor: int, seed: int) -> dict:
    """Each fault kind once: a named error, then a clean program. Returns what happened."""
    from ..sw.runtime import Device
    cfg = get_config(config)
    prog = _fault_program(cfg, seed)
    want = Device("golden", cfg).run(prog)[1]
    outcome = {}
    with simulated_board(config, divisor, seed, timeout=3.0) as device:
        board = device.board
        kinds = [("drop_host", 40), ("corrupt_host", 40), ("drop_board", 5),
                 ("corrupt_board", 5), ("deaf", 0), ("interrupt", 40)]
        for kind, offset in kinds:
            stats = board.stats()
            error = None
            if kind == "interrupt":
                port = device.link._port
                write = port.write

                def interrupted(data, write=write, port=port, offset=offset):
                    write(data[:offset])
                    port.write = write
                    raise KeyboardInterrupt
                port.write = interrupted
            else:
                base = stats["host_bytes"] if kind.endswith("host") else stats["board_bytes"]
                board.inject(kind, base + offset)
            try:
                device.run(prog)
            except (LinkTimeout, IntegrityError, ProtocolError, DeviceError,
                    KeyboardInterrupt) as exc:
                error = type(exc).__name__
            if kind == "deaf":
                board.recover()
            try:
                clean = bool(np.array_equal(device.run(prog)[1], want))
            except Exception as exc:  # noqa: BLE001 - reported, not raised: it is the figure
                clean = f"{type(exc).__name__}: {exc}"
            outcome[kind] = {"error": error, "next_program_ok": clean}
    return outcome


def _e2e(images: int) -> dict:
    """digits-cnn images/s on each board: link bytes per image from the simulated board,
    accelerator cycles per image from the RTL at full stream speed."""
    out = {}
    for board, (config, clock_hz) in BOARD_CLOCKS.items():
        spec = link_for(board)
        per = {}
        for placement in ("per-layer", "resident"):
            from ..sw.runtime import Device
            try:
                with simulated_board(config) as device:
                    port = device.link._port
                    s0, r0 = len(port.sent), len(port.received)
                    _digits(device, images, placement)
                    link_bytes = (len(port.sent) - s0 + len(port.received) - r0) / images
                with Device("rtl", config) as rtl:
                    cycles = _digits(rtl, images, placement)[0].cycles / images
            except Exception:  # noqa: BLE001 - a placement the preset cannot hold
                continue
            per[placement] = (link_bytes, cycles)
        for placement, (link_bytes, cycles) in per.items():
            tag = f"{board}_{placement.replace('-', '_')}"
            t_link = link_bytes / spec.bytes_per_s
            t_compute = cycles / clock_hz
            out[f"link_bytes_per_image_{tag}"] = round(link_bytes, 1)
            out[f"cycles_per_image_{tag}"] = round(cycles)
            out[f"e2e_images_per_s_{tag}"] = round(1 / (t_link + t_compute), 2)
            out[f"compute_images_per_s_{tag}"] = round(1 / t_compute, 1)
            out[f"bound_{tag}"] = "link" if t_link > t_compute else "compute"
    return out


def run(progress=None, configs=DEFAULT_CONFIGS, divisor: int = 4, seed: int = 0,
        random_programs: int = 8, images: int = 16, e2e: bool = True) -> dict:
    """The board suite (see the module docstring); ``random_programs`` and ``images`` size the
    program set (``make regress`` runs a longer one)."""
    from ..sw.board import check_board
    metrics: dict = {"board_sim_divisor": divisor, "board_sim_seed": seed}
    programs = overruns = 0
    mismatches: list = []
    for config in configs:
        r = compare_workloads(config, divisor, seed, random_programs, images)
        programs += r["programs"]
        overruns += r["overruns"]
        mismatches += r["mismatches"]
        metrics[f"board_sim_probes_{config}"] = r["probes"]
        metrics[f"board_sim_cycles_per_s_{config}"] = round(r["cycles_per_s"])
    metrics.update(board_sim_programs=programs, board_sim_mismatches=len(mismatches),
                   board_sim_overruns=overruns)
    if mismatches:
        metrics["board_sim_first_mismatch"] = mismatches[0]
    efficiency = []
    for config in configs:
        with simulated_board(config, divisor, seed) as device:
            r = check_board(config=config, backend=device.link, divisor=divisor)
        for key in ("link_efficiency_down", "link_efficiency_up"):
            metrics[f"{key}_{config}"] = r[key]
        efficiency.append(r["link_efficiency"])
    metrics["link_efficiency"] = min(efficiency)
    faults = _faults(configs[0], divisor, seed)
    metrics["faults_injected"] = len(faults)
    metrics["faults_detected"] = sum(f["error"] is not None for f in faults.values())
    metrics["resync_ok"] = all(f["next_program_ok"] is True for f in faults.values())
    for kind, f in faults.items():
        metrics[f"fault_{kind}"] = f"{f['error']}; next program ok: {f['next_program_ok']}"
    if e2e:
        metrics.update(_e2e(images))
    return metrics
