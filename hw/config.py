"""Accelerator configurations: named presets, defined once.

The same :class:`AccelConfig` object parameterizes the Amaranth hardware, the golden model and the
driver (VTA's lesson: a parameter is never written twice). Word widths of every scratchpad follow
from the array shape; the host stream width must divide every word width so that a LOAD or STORE
moves whole words in whole beats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .isa import ADDR_BITS, CHANNEL_PARAMS_BITS, INSTR_BITS, MASK_IDX_BITS, Buffer

__all__ = ["AccelConfig", "PRESETS", "get_config"]

MASK_WORD_BITS = 64


@dataclass(frozen=True)
class AccelConfig:
    """One accelerator configuration.

    Parameters
    ----------
    name:
        Preset name (``sim``, ``ecp5``, ``ice40``).
    rows, cols:
        MAC array shape: ``rows`` output rows (GEMM M) by ``cols`` output columns (GEMM N).
    host_width:
        Width of the host stream in bits (both directions).
    inp_depth, wgt_depth, acc_depth, out_depth, param_depth:
        Scratchpad depths in words (see :meth:`word_bits`).
    mask_bits:
        Number of skip-mask bits (PASS); the MASK buffer holds them in 64-bit words.
    requant_lanes:
        Output channels the requant unit processes per cycle (divides ``cols``).
    """

    name: str
    rows: int
    cols: int
    host_width: int
    inp_depth: int
    wgt_depth: int
    acc_depth: int
    out_depth: int
    param_depth: int
    mask_bits: int
    requant_lanes: int

    def __post_init__(self):
        for field in ("rows", "cols", "host_width", "inp_depth", "wgt_depth", "acc_depth",
                      "out_depth", "param_depth", "mask_bits", "requant_lanes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config {self.name!r}: {field}={value!r} must be a positive int")
        if self.host_width % 8 or INSTR_BITS % self.host_width:
            raise ConfigError(f"config {self.name!r}: host_width={self.host_width} must be a "
                              f"multiple of 8 dividing the {INSTR_BITS}-bit instruction word")
        if self.cols % self.requant_lanes:
            raise ConfigError(f"config {self.name!r}: requant_lanes={self.requant_lanes} must "
                              f"divide cols={self.cols}")
        if self.mask_bits % MASK_WORD_BITS or self.mask_bits > 2 ** MASK_IDX_BITS:
            raise ConfigError(f"config {self.name!r}: mask_bits={self.mask_bits} must be a "
                              f"multiple of {MASK_WORD_BITS} and <= {2 ** MASK_IDX_BITS}")
        for buf in Buffer:
            depth = self.depth(buf)
            if depth > 2 ** ADDR_BITS:
                raise ConfigError(f"config {self.name!r}: {buf.name} depth {depth} exceeds the "
                                  f"{ADDR_BITS}-bit address space")
            if self.word_bits(buf) % self.host_width:
                raise ConfigError(f"config {self.name!r}: {buf.name} word of "
                                  f"{self.word_bits(buf)} bits is not a whole number of "
                                  f"{self.host_width}-bit host beats")

    # -- derived geometry -------------------------------------------------------------------

    @property
    def macs(self) -> int:
        """Multiply-accumulate units in the array."""
        return self.rows * self.cols

    @property
    def beat_bytes(self) -> int:
        """Bytes per host-stream beat."""
        return self.host_width // 8

    def word_bits(self, buf: Buffer) -> int:
        """Width in bits of one word of scratchpad ``buf``."""
        buf = Buffer(buf)
        return {
            Buffer.INP: 8 * self.rows,
            Buffer.WGT: 8 * self.cols,
            Buffer.ACC: 32 * self.cols,
            Buffer.OUT: 8 * self.cols,
            Buffer.PARAM: CHANNEL_PARAMS_BITS * self.cols,
            Buffer.MASK: MASK_WORD_BITS,
        }[buf]

    def word_bytes(self, buf: Buffer) -> int:
        return self.word_bits(buf) // 8

    def depth(self, buf: Buffer) -> int:
        """Depth in words of scratchpad ``buf``."""
        buf = Buffer(buf)
        return {
            Buffer.INP: self.inp_depth,
            Buffer.WGT: self.wgt_depth,
            Buffer.ACC: self.acc_depth,
            Buffer.OUT: self.out_depth,
            Buffer.PARAM: self.param_depth,
            Buffer.MASK: self.mask_bits // MASK_WORD_BITS,
        }[buf]

    def buffer_bytes(self, buf: Buffer) -> int:
        return self.depth(buf) * self.word_bytes(buf)

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, AccelConfig] = {
    # Fast simulation and the benchmarks: a 16x16 array with roomy buffers.
    "sim": AccelConfig(name="sim", rows=16, cols=16, host_width=64,
                       inp_depth=8192, wgt_depth=8192, acc_depth=8192, out_depth=8192,
                       param_depth=64, mask_bits=4096, requant_lanes=4),
    # ULX3S (ECP5-85F): 128 MACs on MULT18X18D, buffers in EBR.
    "ecp5": AccelConfig(name="ecp5", rows=8, cols=16, host_width=64,
                        inp_depth=4096, wgt_depth=4096, acc_depth=1024, out_depth=2048,
                        param_depth=32, mask_bits=1024, requant_lanes=2),
    # iCEBreaker (iCE40 UP5K): the array on the 8 SB_MAC16 DSPs, small EBR buffers.
    "ice40": AccelConfig(name="ice40", rows=2, cols=4, host_width=16,
                         inp_depth=512, wgt_depth=512, acc_depth=128, out_depth=256,
                         param_depth=8, mask_bits=256, requant_lanes=1),
}


def get_config(config: str | AccelConfig) -> AccelConfig:
    """Return the preset named ``config`` (or ``config`` itself when it already is one)."""
    if isinstance(config, AccelConfig):
        return config
    try:
        return PRESETS[config]
    except KeyError:
        raise ConfigError(f"unknown configuration {config!r}; presets: "
                          f"{', '.join(sorted(PRESETS))}") from None
