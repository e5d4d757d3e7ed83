"""A simulated board link: a pyserial-compatible port with the golden model behind it.

:class:`SimulatedSerial` stands in for the UART of a board running the accelerator. The bytes
the host writes go through :class:`~tinyaccel.sim.golden.GoldenMachine` instruction by
instruction, as the board's decoder consumes them; the response bytes come back through
:meth:`~SimulatedSerial.read` in random-sized chunks (seeded), so a host that reads responses
incrementally is exercised the way a slow serial line exercises it. The machine keeps its state
between writes, like a powered board.

>>> link = SimulatedSerial("ice40", seed=7)
>>> backend = BoardBackend("ice40", link=link)        # tinyaccel.sw.runtime
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..boards.link import LinkSpec
from ..hw.config import AccelConfig, get_config
from ..hw.isa import INSTR_BYTES
from ..protocol import data_length
from .golden import GoldenMachine

__all__ = ["SimulatedSerial"]


class SimulatedSerial:
    """A pyserial-like port (``write``, ``read``, ``flush``, ``reset_input_buffer``,
    ``in_waiting``, ``close``) whose far end is the golden model of ``config``.

    Parameters
    ----------
    config:
        Preset name or :class:`AccelConfig` of the simulated accelerator.
    seed:
        Seeds the chunk sizes of :meth:`read`.
    max_chunk:
        Largest number of bytes one :meth:`read` returns; each read returns a random
        ``1..max_chunk`` bytes (at most what was asked and what is waiting).
    timeout:
        The read timeout a real port would wait. Nothing sleeps here: a read that finds no byte
        waiting returns ``b""`` at once, as a real port does after ``timeout`` seconds.
    tamper:
        Applied to the answer to each :meth:`write` before it is delivered, to model a faulty
        line: e.g. ``lambda b: b[:-3]`` loses the last three bytes.
    tamper_host:
        Applied to the bytes of each :meth:`write` before the board sees them (a faulty line
        the other way).
    silence_s:
        The board's resync (``LinkSpec.silence_s``, default the default link's): a write that
        comes at least this long after the previous one, while that one ended in the middle of
        an instruction, finds the accelerator reset — the partial instruction is gone and the
        golden machine starts afresh (a reset clears the scratchpads, as the RTL's does).
    """

    def __init__(self, config: AccelConfig | str = "sim", *, seed: int = 0, max_chunk: int = 64,
                 timeout: float = 1.0, tamper: Callable[[bytes], bytes] | None = None,
                 tamper_host: Callable[[bytes], bytes] | None = None,
                 silence_s: float | None = None):
        if max_chunk < 1:
            raise ValueError(f"max_chunk={max_chunk} must be >= 1")
        self.config = get_config(config)
        self.machine = GoldenMachine(self.config)
        self.port = f"sim://golden/{self.config.name}"
        self.timeout = timeout
        self.max_chunk = max_chunk
        self.tamper = tamper
        self.tamper_host = tamper_host
        self.silence_s = LinkSpec().silence_s if silence_s is None else silence_s
        self.resets = 0  # resyncs of the board: silences in the middle of an instruction
        self._last_write = time.monotonic()
        self.is_open = True
        self.reads = 0  # read() calls that returned bytes
        self.timeouts = 0  # read() calls that found nothing waiting
        self._rng = np.random.default_rng(seed)
        self._rx = bytearray()  # host bytes not yet a whole instruction (with its LOAD data)
        self._tx = bytearray()  # response bytes not yet read by the host

    def _check_open(self) -> None:
        if not self.is_open:
            raise OSError(f"port {self.port} is closed")

    def write(self, data: bytes) -> int:
        """Send host bytes; every instruction completed by them executes now."""
        self._check_open()
        now = time.monotonic()
        if self._rx and now - self._last_write >= self.silence_s:
            self.machine = GoldenMachine(self.config)
            self._rx.clear()
            self.resets += 1
        self._last_write = now
        self._rx += self.tamper_host(bytes(data)) if self.tamper_host else data
        answer = bytearray()
        pos = 0
        while len(self._rx) - pos >= INSTR_BYTES:
            word = int.from_bytes(self._rx[pos:pos + INSTR_BYTES], "little")
            end = pos + INSTR_BYTES + data_length(self.config, word)
            if end > len(self._rx):
                break  # the LOAD data is still on its way
            answer += self.machine.execute(word, bytes(self._rx[pos + INSTR_BYTES:end]),
                                           strict=False)
            pos = end
        del self._rx[:pos]
        self._tx += self.tamper(bytes(answer)) if self.tamper else answer
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered on the way out: :meth:`write` delivers at once."""
        self._check_open()

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` response bytes: a random chunk of what is waiting, ``b""`` if nothing."""
        self._check_open()
        if size <= 0:
            return b""
        if not self._tx:
            self.timeouts += 1
            return b""
        n = min(size, len(self._tx), int(self._rng.integers(1, self.max_chunk + 1)))
        chunk = bytes(self._tx[:n])
        del self._tx[:n]
        self.reads += 1
        return chunk

    @property
    def in_waiting(self) -> int:
        """Response bytes waiting to be read."""
        return len(self._tx)

    def reset_input_buffer(self) -> None:
        """Drop the response bytes not yet read."""
        self._check_open()
        self._tx.clear()

    def close(self) -> None:
        self.is_open = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SimulatedSerial({self.port!r})"
