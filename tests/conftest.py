"""One seed per test run, printed in the header, so that a run replays.

``make test`` runs with the fixed seed :data:`tinyaccel.sim.randprog.DEFAULT_SEED`: the same
commit draws the same programs and data on every run. ``TINYACCEL_SEED=<int>`` replays or varies
a run, ``TINYACCEL_SEED=random`` draws a fresh seed (``make regress``). The seed is resolved once,
before the xdist workers start, and written back to ``TINYACCEL_SEED`` so that every worker and
every reader of the variable (``seed_from_env``, module-level ``SEED`` constants) sees the same
integer; Hypothesis takes it too (unless ``--hypothesis-seed`` is given).

Python's, NumPy's and torch's global generators are reseeded before every test from the run seed
and the test's id, so a test that draws from them gets the same numbers whichever tests ran
before it on its worker.
"""

import os
import random
import sys
import zlib

import numpy as np
import pytest

from tinyaccel.sim.randprog import SEED_ENV, parse_seed


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    seed = parse_seed(os.environ.get(SEED_ENV))
    os.environ[SEED_ENV] = str(seed)  # inherited by the xdist workers started after this
    if getattr(config.option, "hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(seed)


def pytest_report_header(config):
    seed = os.environ[SEED_ENV]
    return (f"{SEED_ENV}={seed} (replay: {SEED_ENV}={seed}; vary: {SEED_ENV}=<int> or "
            f"{SEED_ENV}=random)")


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    """Reseed the global random generators from the run seed and the test's id."""
    seed = zlib.crc32(f"{os.environ[SEED_ENV]}:{request.node.nodeid}".encode())
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")  # not yet imported: its generator is at its fixed default
    if torch is not None:
        torch.manual_seed(seed)


#: The configuration the RTL tests of the training and collaborative paths run on (the one
#: tests/test_rtl.py builds too: one cached Verilator build).
RTL_CONFIG = "ecp5"


@pytest.fixture(scope="module")
def rtl_available():
    """Skips the module's RTL tests when the Verilated accelerator cannot be built here."""
    from tinyaccel.errors import BackendUnavailable
    from tinyaccel.sim.rtl import RtlSession
    try:
        RtlSession(RTL_CONFIG).start().close()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
