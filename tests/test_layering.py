"""Import direction: every arrow between the package's layers points down.

The layers, lowest first (a module may import its own package and lower layers only; packages on
the same level do not import each other)::

    tinyaccel.errors < tinyaccel.hw < tinyaccel.protocol < tinyaccel.boards
        < {tinyaccel.sim, tinyaccel.models} < tinyaccel.sw
        < {tinyaccel.bench, tinyaccel.spec} < tinyaccel.cli < tinyaccel (the package __init__)

and ``tinyaccel.hw`` imports nothing but Amaranth, the standard library and ``tinyaccel.errors``.
The walk reads every module's source (AST, no import): module-level and function-local imports,
absolute and relative alike. The modules and their folders come from pyproject.toml, the same
table that builds the package, so a new module cannot escape the check.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = "tinyaccel"

#: Rank of each layer; equal ranks are peers (no arrows between them).
LAYERS: dict[str, int] = {
    "tinyaccel.errors": 0,
    "tinyaccel.hw": 1,
    "tinyaccel.protocol": 2,
    "tinyaccel.boards": 3,  # board gateware: below its simulation (sim/board_sim.py)
    "tinyaccel.sim": 4, "tinyaccel.models": 4,
    "tinyaccel.sw": 5,
    "tinyaccel.bench": 6, "tinyaccel.spec": 6,
    "tinyaccel.cli": 7,
    "tinyaccel": 8,
}
#: Third-party distributions hw/ may use besides the standard library.
HW_THIRD_PARTY = {"amaranth"}


@dataclass(frozen=True)
class Arrow:
    """One import: ``importer`` (module) at ``path:line`` imports ``target`` (module name)."""

    importer: str
    path: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} -> {self.target}"


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{module name: source file}`` of every module of the package, from pyproject.toml."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup.get("package-dir", {})
    modules = {}
    for package in setup["packages"]:
        folder = root / dirs.get(package, package.replace(".", "/"))
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known) -> list[str]:
    """The modules an ``ImportFrom`` in ``module`` names: ``from X import a`` is ``X.a`` when
    that is a module of the package, else ``X``."""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        if node.level - 1 > len(parts) - 1:
            raise ValueError(f"{module}: relative import beyond the top package")
        base = ".".join(parts[:len(parts) - (node.level - 1)])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    if len(targets) < len(node.names):
        targets.append(base)
    return targets


def imports_of(module: str, source: str, path: str, is_package: bool, known) -> list[Arrow]:
    """Every import in ``source`` (module level and inside functions/classes), resolved."""
    arrows = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            arrows += [Arrow(module, path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            arrows += [Arrow(module, path, node.lineno, target)
                       for target in _resolve(module, is_package, node, known)]
    return arrows


def layer_of(module: str) -> str | None:
    """The layer a module of the package belongs to (its ``tinyaccel.<x>`` prefix)."""
    if module == TOP:
        return TOP
    parts = module.split(".")
    name = ".".join(parts[:2])
    return name if name in LAYERS else None


def violations(arrows: list[Arrow]) -> list[str]:
    """Arrows that point the wrong way, each as ``path:line: importer -> target (why)``."""
    bad = []
    for arrow in arrows:
        src = layer_of(arrow.importer)
        if src is None:
            bad.append(f"{arrow}: module {arrow.importer} is in no layer (add it to LAYERS)")
            continue
        root = arrow.target.split(".")[0]
        if src == "tinyaccel.hw" and root != TOP:
            if root not in sys.stdlib_module_names and root not in HW_THIRD_PARTY:
                bad.append(f"{arrow}: hw/ imports only amaranth, the standard library and "
                           f"tinyaccel.errors")
            continue
        if root != TOP:
            continue
        dst = layer_of(arrow.target)
        if dst is None:
            bad.append(f"{arrow}: {arrow.target} is in no layer")
        elif src == "tinyaccel.hw" and dst not in ("tinyaccel.hw", "tinyaccel.errors"):
            bad.append(f"{arrow}: hw/ imports only amaranth, the standard library and "
                       f"tinyaccel.errors")
        elif dst != src and LAYERS[dst] >= LAYERS[src]:
            how = "a peer" if LAYERS[dst] == LAYERS[src] else "a higher layer"
            bad.append(f"{arrow}: {src} (layer {LAYERS[src]}) imports {how}, {dst} "
                       f"(layer {LAYERS[dst]})")
    return bad


def all_arrows(root: Path = ROOT) -> list[Arrow]:
    modules = package_modules(root)
    arrows = []
    for name, path in modules.items():
        arrows += imports_of(name, path.read_text(), str(path.relative_to(root)),
                             path.stem == "__init__", modules)
    return arrows


# -- the checks on the tree --------------------------------------------------------------------

def test_the_walk_sees_every_layer():
    """The module table is not empty or partial: every layer has modules, imports are found."""
    modules = package_modules()
    for layer in LAYERS:
        assert any(layer_of(m) == layer for m in modules), f"no module in layer {layer}"
    arrows = all_arrows()
    assert any(a.importer == "tinyaccel.sw.runtime" and a.target == "tinyaccel.sim.golden"
               for a in arrows)  # a function-local relative import is seen


def test_imports_point_down():
    bad = violations(all_arrows())
    assert not bad, "imports pointing the wrong way:\n" + "\n".join(bad)


# -- the checker catches wrong arrows (synthetic sources) ---------------------------------------

KNOWN = {"tinyaccel", "tinyaccel.errors", "tinyaccel.hw", "tinyaccel.hw.isa", "tinyaccel.sim",
         "tinyaccel.sim.golden", "tinyaccel.sim.numerics", "tinyaccel.sw", "tinyaccel.sw.gemm",
         "tinyaccel.models", "tinyaccel.models.zoo", "tinyaccel.boards", "tinyaccel.protocol",
         "tinyaccel.cli", "tinyaccel.bench", "tinyaccel.spec"}


PACKAGES = {"tinyaccel", "tinyaccel.hw", "tinyaccel.sim", "tinyaccel.sw", "tinyaccel.models",
            "tinyaccel.boards", "tinyaccel.bench"}


def _check(module: str, source: str) -> list[str]:
    return violations(imports_of(module, source, "synthetic.py", module in PACKAGES, KNOWN))


@pytest.mark.parametrize("module, source, arrow", [
    # sim -> sw, hidden inside a function (the cycle sim/workloads.py used to dodge)
    ("tinyaccel.sim.workloads", "def f():\n    from ..sw.gemm import lower_gemm\n",
     "synthetic.py:2: tinyaccel.sim.workloads -> tinyaccel.sw.gemm"),
    # absolute form of the same
    ("tinyaccel.sim.golden", "import tinyaccel.sw.gemm\n",
     "synthetic.py:1: tinyaccel.sim.golden -> tinyaccel.sw.gemm"),
    # upwards: boards -> models
    ("tinyaccel.boards.build", "from ..models import zoo\n",
     "tinyaccel.boards.build -> tinyaccel.models.zoo"),
    # hw -> protocol (a higher layer), and hw -> numpy (not amaranth/stdlib)
    ("tinyaccel.hw.isa", "from .. import protocol\n", "tinyaccel.hw.isa -> tinyaccel.protocol"),
    ("tinyaccel.hw.isa", "import numpy as np\n", "tinyaccel.hw.isa -> numpy"),
    # the package __init__ is the top: nothing below imports it
    ("tinyaccel.sw.gemm", "from .. import __version__\n", "tinyaccel.sw.gemm -> tinyaccel"),
    # a package __init__ importing upwards (relative level counted from the package)
    ("tinyaccel.sim", "from ..sw import gemm\n", "tinyaccel.sim -> tinyaccel.sw.gemm"),
    # errors is the bottom
    ("tinyaccel.errors", "from .hw import isa\n", "tinyaccel.errors -> tinyaccel.hw.isa"),
])
def test_wrong_arrows_are_caught(module, source, arrow):
    bad = _check(module, source)
    assert len(bad) == 1 and arrow in bad[0], bad


@pytest.mark.parametrize("module, source", [
    ("tinyaccel.sw.gemm", "from ..sim.numerics import exact_gemm\nfrom . import runtime\n"),
    ("tinyaccel.sim.golden", "from ..protocol import Program\nfrom ..hw.isa import Opcode\n"),
    ("tinyaccel.hw.isa", "from amaranth.lib import data\nfrom dataclasses import dataclass\n"
                         "from ..errors import FieldError\nfrom . import config\n"),
    ("tinyaccel.cli", "def f():\n    from .sw import train\n    from .bench import SUITES\n"),
    ("tinyaccel", "from .sw.compiler import CompiledModel\n"),
])
def test_right_arrows_pass(module, source):
    assert _check(module, source) == []


def test_a_wrong_arrow_in_a_real_module_is_caught(tmp_path):
    """Copy the tree's package table, add a wrong import to a real module: the walk reports it."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for name, path in package_modules().items():
        dest = tmp_path / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text()
        if name == "tinyaccel.sim.numerics":
            text += "\n\ndef _late():\n    from ..sw import compiler  # noqa\n"
        dest.write_text(text)
    bad = violations(all_arrows(tmp_path))
    assert len(bad) == 1, bad
    assert "sim/numerics.py:" in bad[0] and "tinyaccel.sim.numerics -> tinyaccel.sw.compiler" \
        in bad[0] and "imports a higher layer" in bad[0]
