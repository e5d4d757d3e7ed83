"""Accelerator configurations: named presets, defined once.

The same :class:`AccelConfig` object parameterizes the Amaranth hardware, the golden model and the
driver (VTA's lesson: a parameter is never written twice). Word widths of every scratchpad follow
from the array shape; the host stream width must divide every word width so that a LOAD or STORE
moves whole words in whole beats. The configuration also carries the :class:`Implementation`
profile (area/speed choices that change cycle counts, never results), so that the driver's cycle
model and the hardware read the same choice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import cached_property

from amaranth.lib import data

from ..errors import ConfigError
from .isa import (
    ADDR_BITS,
    CHANNEL_PARAMS_BITS,
    CRC,
    INSTR_BITS,
    MASK_IDX_BITS,
    MASK_WORD_BITS,
    Buffer,
    StatusRecord,
    isa_description,
)

__all__ = ["Implementation", "AccelConfig", "PRESETS", "get_config", "MASK_WORD_BITS"]


@dataclass(frozen=True)
class Implementation:
    """Area/speed choices of the hardware (the *implementation profile*). They change cycle
    counts, never results.

    ``overlap``: units run concurrently under hazard tracking (otherwise one instruction at a
    time). ``serial_requant``: requantize with the small :class:`~.requant.RequantSerial`
    engines (about 141 cycles per channel per lane, no DSP) instead of the DSP pipeline.
    ``shadow``: the MAC array copies finished blocks into a shadow bank (otherwise ``rows``
    idle cycles between blocks). ``ram_counters``: the performance counters live in a block RAM
    behind narrow pending sums (:class:`~.counters.PerfCounters`), not in flip-flops.
    ``serial_decode``: the decoder runs its checks one after another on one adder (up to a few
    hundred cycles per instruction instead of a few). ``serial_sgq``: the SGQ encoder reads one
    value per cycle and packs codes one bit per cycle (:class:`~.sgq_serial.StripeEncoderSerial`,
    not a host beat per cycle as :class:`~.sgq_encoder.StripeEncoderPipeline`).
    ``serial_im2col``: IM2COL gathers one value at a time on one shift-and-add adder
    (:class:`~.im2col.Im2colSerial`, about 19 cycles per value inside the tensor, 2 per padding
    value) instead of in tiles of ``rows`` pixels at up to one INP word per cycle
    (:class:`~.im2col.Im2colTiled`). ``pass_unit``: the PASS instructions (PATCH, DILATE) and
    the PASS fields of IM2COL (``tiled``, ``gate``) and REQUANT (``gate``) are implemented;
    without it PATCH and DILATE are ``ILLEGAL_OPCODE`` and those fields ``BAD_FIELD`` (section
    5). This one flag changes what is legal, not only cycle counts.

    The two profiles are :meth:`full` and :meth:`compact`; each preset names one. Vary the
    profile of a configuration with ``dataclasses.replace(config, impl=...)``. Some combinations
    are illegal and raise :class:`~tinyaccel.errors.ConfigError`: ``overlap`` with
    ``serial_decode`` (the serial checks compute no access sets, and without them the hazard
    tracking lets conflicting instructions run together); ``pass_unit`` with ``serial_decode``,
    ``serial_im2col`` or ``serial_requant`` (the PASS unit is built only with the full
    datapaths: the serial designs implement neither the PASS checks nor ``tiled``/``gate``).
    ``tests/test_profiles.py`` checks every other single-flag flip of either profile against
    the golden model.
    """
    overlap: bool = True
    serial_requant: bool = False
    shadow: bool = True
    ram_counters: bool = False
    serial_decode: bool = False
    serial_sgq: bool = False
    serial_im2col: bool = False
    pass_unit: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                raise ConfigError(f"implementation flag {f.name}={value!r} must be a bool")
        if self.overlap and self.serial_decode:
            raise ConfigError("implementation overlap=True with serial_decode=True is not "
                              "supported: the serial decoder computes no access sets, which "
                              "the hazard tracking of overlap needs")
        serial = [name for name in ("serial_decode", "serial_im2col", "serial_requant")
                  if getattr(self, name)]
        if self.pass_unit and serial:
            raise ConfigError(f"implementation pass_unit=True with "
                              f"{', '.join(f'{name}=True' for name in serial)} is not "
                              f"supported: the PASS unit is built only with the full datapaths "
                              f"(the serial designs implement no PASS checks, tiled or gate)")

    @classmethod
    def full(cls) -> Implementation:
        """Every speed choice: the profile of the ``sim`` and ``ecp5`` presets."""
        return cls()

    @classmethod
    def compact(cls) -> Implementation:
        """Every area-saving choice: the profile of the ``ice40`` preset (the iCE40 UP5K: its 8
        DSPs hold the MAC array, its 5280 LUTs are tight, and its UART host link is far slower
        than anything overlap could hide)."""
        return cls(overlap=False, serial_requant=True, shadow=False, ram_counters=True,
                   serial_decode=True, serial_sgq=True, serial_im2col=True, pass_unit=False)

    @property
    def name(self) -> str:
        """``full``, ``compact``, or the nearer of them with the flags that differ from it
        (``compact with shadow=True``)."""
        diffs = {}
        for base, profile in (("full", Implementation.full()),
                              ("compact", Implementation.compact())):
            diffs[base] = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                           if getattr(self, f.name) != getattr(profile, f.name)]
        base = min(diffs, key=lambda b: len(diffs[b]))
        return base if not diffs[base] else f"{base} with {', '.join(diffs[base])}"

    # -- couplings: what the flags mean for the individual blocks ---------------------------

    @property
    def exclusive(self) -> bool:
        """One instruction executes at a time (no ``overlap``): the dispatcher issues when every
        unit is idle, so the units share the scratchpad ports without hazard tracking
        (:class:`~.dispatcher.ExclusiveDispatcher`, :class:`~.gemm_unit.ExclusiveGemmUnit`,
        :class:`~.store_unit.ExclusiveStoreUnit`)."""
        return not self.overlap

    @property
    def access_sets(self) -> bool:
        """The decoder computes each instruction's scratchpad access set, which the dispatcher's
        hazard tracking needs (only with ``overlap``)."""
        return self.overlap

    @property
    def held_cmd(self) -> bool:
        """The dispatcher keeps a GEMM's or PATCH's operands (``ctrl.cmd``) on offer until its
        unit is done, so the unit keeps no copy: possible only when one instruction executes
        at a time."""
        return self.exclusive

    @property
    def sgq_held_cmd(self) -> bool:
        """As :attr:`held_cmd` for the SGQ encoder, which uses it only with its serial
        datapath."""
        return self.serial_sgq and self.exclusive

    @property
    def scratchpad_lanes(self) -> bool:
        """Each scratchpad is one memory per host beat of its word, so that each beat's read
        register can be zeroed on its own: what the :class:`~.store_unit.ExclusiveStoreUnit`
        reads through."""
        return self.exclusive


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
    impl:
        The :class:`Implementation` profile of the hardware (default: :meth:`~Implementation.
        full`). It changes cycle counts, never results.
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
    impl: Implementation = Implementation()

    def __post_init__(self):
        if not isinstance(self.impl, Implementation):
            raise ConfigError(f"config {self.name!r}: impl={self.impl!r} must be an "
                              f"Implementation")
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

    @property
    def patch_shape(self) -> tuple[int, int]:
        """``(ph, pw)``: the PASS patch, ``ph`` pixel rows of ``pw`` pixels, ``ph*pw = rows`` (one
        GEMM block), as square as a power of two allows: 4x4 for 16 rows, 2x4 for 8. A *tiled*
        tensor (section 7) stores its pixels patch by patch, row-major inside a patch."""
        if self.rows & (self.rows - 1):
            raise ConfigError(f"config {self.name!r}: PASS patches need a power-of-two rows, "
                              f"not {self.rows}")
        pw = 1 << -(-(self.rows.bit_length() - 1) // 2)
        return self.rows // pw, pw

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

    def identity_text(self) -> str:
        """The canonical UTF-8 text :attr:`config_id` hashes: the parameters (:meth:`as_dict`,
        sorted keys, the profile's flags included) and the ISA (:func:`~.isa.isa_description`)."""
        return ("config " + json.dumps(self.as_dict(), sort_keys=True) + "\n"
                + isa_description())

    @cached_property
    def config_id(self) -> int:
        """The low 24 bits (``StatusRecord.config_id``) of :data:`~.isa.CRC` over
        :meth:`identity_text`: the gateware sends it in every status record, so the driver
        knows the board runs the configuration and the ISA it expects. Any change of a
        parameter, of the profile or of the ISA changes it."""
        width = data.Layout.cast(StatusRecord)["config_id"].width
        text = self.identity_text().encode("utf-8")
        return CRC(8).compute(text) & ((1 << width) - 1)


PRESETS: dict[str, AccelConfig] = {
    # Fast simulation and the benchmarks: a 16x16 array with roomy buffers.
    "sim": AccelConfig(name="sim", rows=16, cols=16, host_width=64,
                       inp_depth=8192, wgt_depth=8192, acc_depth=8192, out_depth=8192,
                       param_depth=64, mask_bits=4096, requant_lanes=4,
                       impl=Implementation.full()),
    # ULX3S (ECP5-85F): 128 MACs on MULT18X18D, buffers in EBR (WGT and OUT sized for resident
    # models: ResNet-8's weights and three live 32x32x16 activations).
    "ecp5": AccelConfig(name="ecp5", rows=8, cols=16, host_width=64,
                        inp_depth=4096, wgt_depth=8192, acc_depth=1024, out_depth=4096,
                        param_depth=32, mask_bits=1024, requant_lanes=2,
                        impl=Implementation.full()),
    # iCEBreaker (iCE40 UP5K): the array on the 8 SB_MAC16 DSPs, small EBR buffers, and every
    # area-saving choice (its UART host link is far slower than anything overlap could hide).
    "ice40": AccelConfig(name="ice40", rows=2, cols=4, host_width=16,
                         inp_depth=512, wgt_depth=512, acc_depth=128, out_depth=256,
                         param_depth=8, mask_bits=256, requant_lanes=1,
                         impl=Implementation.compact()),
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
