"""``tinyaccel board check``: is a board there, running the gateware the driver expects, and how
fast is its link?

:func:`check_board` opens the board (resync and identity check, ``tinyaccel.sw.link``), then
runs a known program: a LOAD of a seeded byte pattern, a STORE of it back, each its own
program between SYNCs that clear and read the counters. It reports what a user needs before a
first ``tinyaccel infer --backend board``: the board's configuration and ``config_id``, its
status, the clock it runs at (cycles counted by the board over the wall time), the payload
rate each way and the *link efficiency* — payload bytes over the bytes the line could have
carried in the board's own time (its cycle counter), so the figure holds in simulation (a
small UART divisor) and on a board alike.

:func:`simulated_board` opens the same driver on the simulated board — the Verilated board
gateware behind a pseudo-terminal — for a user without a board, for the tests and for
``tinyaccel bench board``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import numpy as np

from ..boards.link import BITS_PER_BYTE
from ..errors import IntegrityError
from ..hw.config import AccelConfig, get_config
from ..hw.isa import Buffer, Counter
from ..protocol import Program, response_length
from .runtime import BoardBackend, Device

__all__ = ["check_board", "link_rates", "simulated_board"]

#: Seconds without a byte before the driver gives up, in simulation.
SIM_TIMEOUT = 20.0

#: The buffer the check's pattern goes through: the one every preset has most bytes of.
_CHECK_BUFFERS = (Buffer.INP, Buffer.WGT, Buffer.OUT)


def _pattern_program(config: AccelConfig, nbytes: int, seed: int):
    buf = max(_CHECK_BUFFERS, key=config.buffer_bytes)
    wb = config.word_bytes(buf)
    words = max(1, min(config.depth(buf), nbytes // wb))
    rng = np.random.default_rng(seed)
    data = rng.integers(-128, 128, (words, wb), dtype=np.int8)
    return buf, words, data


def link_rates(device: Device, nbytes: int = 16384, seed: int = 0) -> dict:
    """LOAD then STORE ``nbytes`` (at most one buffer) through ``device``; check the data came
    back; return payload bytes, wall seconds and board cycles of each direction."""
    cfg = device.config
    buf, words, data = _pattern_program(cfg, nbytes, seed)
    out = {"buffer": buf.name, "payload_bytes": int(data.size)}
    device.run(Program(cfg).sync(counters=True, clear=True))
    for direction, prog in (("down", Program(cfg).load(buf, 0, data)),
                            ("up", Program(cfg).store(buf, 0, words))):
        start = time.perf_counter()
        responses = device.run(prog.sync(counters=True, clear=True))
        out[f"{direction}_s"] = time.perf_counter() - start
        out[f"{direction}_cycles"] = int(responses[-1].counters[Counter.CYCLES])
        if direction == "up":
            back = np.asarray(responses[0]).reshape(data.shape).astype(np.int8)
            if not np.array_equal(back, data):
                bad = int(np.count_nonzero(back != data))
                raise IntegrityError(f"board check: {bad} of {data.size} bytes of the pattern "
                                     f"came back different from {buf.name}")
    return out


def check_board(port: str | None = None, config: str | AccelConfig = "ice40", *,
                baud: int | None = None, timeout: float = 5.0, link=None,
                backend: BoardBackend | None = None, nbytes: int = 16384,
                divisor: int | None = None) -> dict:
    """Open a board, check its identity, run the known program and measure the link.

    ``port`` (or ``link``, a pyserial-like object) is opened as :class:`BoardBackend` does; or
    ``backend`` is an open one.

    ``divisor`` (cycles per UART bit) turns the board's cycle counts into line time; default:
    the board's clock over the baud rate, from the clock the board's CYCLES counter shows.

    Raises
    ------
    BoardNotFound, LinkTimeout
        No port, or no answer.
    GatewareMismatch
        The board runs gateware of another configuration (names both ``config_id``).
    IntegrityError
        Bytes changed on the way (link CRC, or the pattern came back different).
    """
    cfg = get_config(config)
    start = time.perf_counter()
    own = backend is None
    if own:
        backend = BoardBackend(cfg, port, baud, timeout, link=link)
    connect_s = time.perf_counter() - start
    try:
        rates = link_rates(Device(backend, cfg), nbytes)
    finally:
        if own:
            backend.close()
    spec = backend.spec
    total_s = rates["down_s"] + rates["up_s"]
    total_cycles = rates["down_cycles"] + rates["up_cycles"]
    clock_hz = total_cycles / total_s if total_s else 0.0
    if divisor is None:
        divisor = max(1, round(clock_hz / spec.baud)) if clock_hz else None
    result = {
        "port": backend.port_name, "config": cfg.name,
        "config_id": f"0x{cfg.config_id:06x}",
        "status": backend.identity.status.name,
        "baud": spec.baud, "rx_fifo_bytes": spec.rx_fifo_bytes,
        "connect_s": round(connect_s, 3),
        "payload_bytes": rates["payload_bytes"], "buffer": rates["buffer"],
        "clock_mhz_measured": round(clock_hz / 1e6, 3),
        "down_bytes_per_s": round(rates["payload_bytes"] / rates["down_s"], 1),
        "up_bytes_per_s": round(rates["payload_bytes"] / rates["up_s"], 1),
        "line_bytes_per_s": spec.bytes_per_s,
        "probes": backend.probes, "resyncs": backend.resyncs,
    }
    if divisor:
        line_cycles = rates["payload_bytes"] * BITS_PER_BYTE * divisor
        result["divisor"] = divisor
        result["link_efficiency_down"] = round(line_cycles / rates["down_cycles"], 4)
        result["link_efficiency_up"] = round(line_cycles / rates["up_cycles"], 4)
        result["link_efficiency"] = min(result["link_efficiency_down"],
                                        result["link_efficiency_up"])
    return result


@contextlib.contextmanager
def simulated_board(config: str, divisor: int = 4, seed: int = 0, timeout: float = SIM_TIMEOUT):
    """A simulated board of ``config`` and a :class:`Device` on it through pyserial, the port
    recording every byte (``device.link._port``: a :class:`RecordingPort`).

    The driver's resync silence is stretched by how much slower the simulated line is than
    the real one (measured on a warm-up), so the driver waits long enough in wall time.
    """
    import serial

    from ..sim.board_sim import SimulatedBoard
    from .link import RecordingPort
    cfg = get_config(config)
    link = SimulatedBoard.default_link(cfg)
    with SimulatedBoard(cfg, link=link, divisor=divisor, seed=seed) as board:
        port = RecordingPort(serial.Serial(board.port, baudrate=board.baud, timeout=timeout))
        # warm-up: how fast the simulated line runs in wall time, on a LOAD and its SYNC
        words = min(cfg.depth(Buffer.WGT), 512 // cfg.word_bytes(Buffer.WGT))
        warm = Program(cfg).load(Buffer.WGT, 0, np.zeros((words, cfg.cols), np.int8)).sync()
        before, start = board.stats()["cycles"], time.monotonic()
        port.write(warm.to_bytes())
        port.read(response_length(cfg, warm))
        cycles_per_s = (board.stats()["cycles"] - before) / (time.monotonic() - start)
        slow = max(1.0, link.baud * divisor / max(cycles_per_s, 1.0))  # wall s per line s
        host = replace(link, silence_bytes=int(link.silence_bytes * 2 * slow) + 1)
        backend = BoardBackend(cfg, link=port, spec=host, timeout=timeout)
        device = Device(backend, cfg)
        device.board, device.link = board, backend  # bind() may wrap device.backend
        try:
            yield device
        finally:
            port.close()
