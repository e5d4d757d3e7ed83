"""The host link's checksum engine: :data:`~.isa.CRC` over a stream of words, a word per cycle.

It serves the SGQ trailer (section 8: :mod:`.sgq_encoder`, :mod:`.sgq_serial`) and the link
trailer of every SYNC (section 9: the accelerator's received and sent bytes, :mod:`.top`).
"""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.crc import Algorithm
from amaranth.lib.wiring import In, Out

from .isa import CRC

__all__ = ["StreamCrc"]


class StreamCrc(wiring.Component):
    """:data:`~.isa.CRC` over ``width``-bit words, a word per cycle (``valid``); ``start``
    restarts it (and wins over ``valid``); ``crc`` is the CRC of the words taken since (the
    register, reflected and XORed). The CRC is reflected, so over little-endian words of any
    width it equals the CRC over their bytes in order.

    The same generator as ``amaranth.lib.crc.Processor``, with each next-state bit written as
    one XOR reduction of the state and data bits that feed it (the update's matrices come from
    ``amaranth.lib.crc``): Yosys 0.70's abc9 crashes on the Processor's XOR chains in the full
    ECP5 design, and the build's fallback to classic ABC costs some 6,000 LUTs.
    """

    def __init__(self, width: int):
        self._width = width
        super().__init__({"start": In(1), "valid": In(1), "data": In(width),
                          "crc": Out(CRC.crc_width)})

    def elaborate(self, platform):
        m = Module()
        algo, n, w = CRC, CRC.crc_width, self._width

        def update(state, word):  # the linear update alone: no reflection, no output XOR
            plain = Algorithm(crc_width=n, polynomial=algo.polynomial, initial_crc=state,
                              reflect_input=False, reflect_output=False, xor_output=0)
            return plain(w).compute([word])

        from_state = [update(1 << i, 0) for i in range(n)]  # bit k: state bit i feeds bit k
        from_data = [update(0, 1 << j) for j in range(w)]
        reg = Signal(n, init=algo.initial_crc)
        data = self.data[::-1] if algo.reflect_input else self.data
        with m.If(self.start):
            m.d.sync += reg.eq(algo.initial_crc)
        with m.Elif(self.valid):
            for k in range(n):
                taps = [reg[i] for i in range(n) if from_state[i] >> k & 1]
                taps += [data[j] for j in range(w) if from_data[j] >> k & 1]
                m.d.sync += reg[k].eq(Cat(*taps).xor())
        m.d.comb += self.crc.eq((reg[::-1] if algo.reflect_output else reg) ^ algo.xor_output)
        return m
