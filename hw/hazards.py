"""Address-range hazards between instructions in flight.

Each instruction is summarized at decode by its *access set*: per buffer, one read range and one
write range ``[lo, hi)`` in architectural words, each with an enable. The dispatcher keeps the
access set of every instruction in flight (one slot per unit, two for GEMM) and issues a new
instruction only when :func:`conflict` is false against all of them, so that any overlap is
invisible: results are those of sequential execution.

Two instructions conflict on a buffer when one writes a range the other reads or writes (RAW, WAR,
WAW), or -- structurally -- when both need the buffer's single read port or its single write port
(see :mod:`.scratchpads`). Two GEMMs share the GEMM unit's ports in order, so between them only
ranges count.
"""

from functools import reduce
from operator import or_

from amaranth.hdl import Value
from amaranth.lib import data

from .config import AccelConfig
from .isa import Buffer

__all__ = ["AccessLayout", "RangeLayout", "conflict", "UNIT_ACCESSES"]


def RangeLayout(depth: int) -> data.StructLayout:
    """An enabled word range ``[lo, hi)`` of a buffer of ``depth`` words."""
    return data.StructLayout({"en": 1, "lo": range(depth + 1), "hi": range(depth + 1)})


def AccessLayout(config: AccelConfig) -> data.StructLayout:
    """Read and write range of every buffer."""
    return data.StructLayout({
        buf.name.lower(): data.StructLayout({
            "r": RangeLayout(config.depth(buf)),
            "w": RangeLayout(config.depth(buf)),
        })
        for buf in Buffer
    })


#: Which (buffer, "r"/"w") ranges each in-flight unit can hold; the slots store only these.
#: A MASK range is always the whole buffer (the decoder's access sets: MASK operands count
#: bits, its depth words); PATCH's OUT read range is the hull of its new and reference tiles.
#: The PASS units ("patch", "dilate") and the MASK reads of "im2col" and "requant" (their
#: ``gate``) exist only with ``Implementation.pass_unit``; without it the decoder never enables
#: those ranges (constant 0: the slots' flip-flops for them are optimized away).
UNIT_ACCESSES = {
    "gemm": [(Buffer.INP, "r"), (Buffer.WGT, "r"), (Buffer.ACC, "r"), (Buffer.ACC, "w"),
             (Buffer.MASK, "r")],
    "requant": [(Buffer.ACC, "r"), (Buffer.PARAM, "r"), (Buffer.OUT, "w"), (Buffer.MASK, "r")],
    "store": [(buf, "r") for buf in Buffer],
    "patch": [(Buffer.OUT, "r"), (Buffer.OUT, "w"), (Buffer.MASK, "r"), (Buffer.MASK, "w")],
    "dilate": [(Buffer.MASK, "r"), (Buffer.MASK, "w")],
    "sgq": [(Buffer.OUT, "r")],
    "im2col": [(Buffer.OUT, "r"), (Buffer.INP, "w"), (Buffer.MASK, "r")],
}


def _overlap(a, b) -> Value:
    return (a.lo < b.hi) & (b.lo < a.hi)


def conflict(new, held, accesses, *, structural: bool = True) -> Value:
    """True when the access set ``new`` may not start while ``held`` is in flight.

    ``accesses`` lists the (buffer, kind) ranges ``held`` can have; ``structural=False`` ignores
    port sharing (used between two GEMMs, which the GEMM unit serializes itself).
    """
    terms = []
    for buf, kind in accesses:
        name = buf.name.lower()
        h = held[name][kind]
        n_same, n_other = new[name][kind], new[name]["w" if kind == "r" else "r"]
        if kind == "r":
            # new write over a held read (WAR); two readers share one port
            terms.append(h.en & n_other.en & _overlap(n_other, h))
            if structural:
                terms.append(h.en & n_same.en)
        else:
            # new read of a held write (RAW), new write over a held write (WAW)
            terms.append(h.en & n_other.en & _overlap(n_other, h))
            terms.append(h.en & n_same.en & (_overlap(n_same, h) if not structural else 1))
    return reduce(or_, terms, Value.cast(0))
