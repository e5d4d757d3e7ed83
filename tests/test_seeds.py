"""The seed of a test run: fixed by default, set by ``TINYACCEL_SEED``, shared by every worker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyaccel.errors import ConfigError
from tinyaccel.sim.randprog import DEFAULT_SEED, SEED_ENV, parse_seed, seed_from_env


def test_unset_seed_is_the_fixed_default():
    assert parse_seed(None) == DEFAULT_SEED
    assert parse_seed("") == DEFAULT_SEED
    assert parse_seed("  ") == DEFAULT_SEED


def test_integer_seeds_replay():
    assert parse_seed("1234") == 1234
    assert parse_seed("0x10") == 16


def test_random_seed_is_fresh_32_bit():
    seeds = {parse_seed("random") for _ in range(8)}
    assert len(seeds) > 1
    assert all(0 <= s < 1 << 32 for s in seeds)


def test_bad_seed_names_the_value():
    with pytest.raises(ConfigError, match="'seven'"):
        parse_seed("seven")


def test_run_seed_is_resolved_once(request, capsys):
    """conftest writes the resolved integer back, so readers see one seed; Hypothesis too."""
    seed = os.environ[SEED_ENV]
    assert seed == str(int(seed))
    assert seed_from_env() == int(seed)
    assert capsys.readouterr().out == f"{SEED_ENV}={seed}\n"
    assert request.config.getoption("hypothesis_seed") == seed


def _collected_seed(env: dict) -> str:
    """The seed line of the header of a pytest run (collection only) under ``env``."""
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only",
                           "-p", "no:cacheprovider", str(tests / "test_seeds.py")],
                          env=env, capture_output=True, text=True, cwd=tests.parent, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"{SEED_ENV}=")]
    assert done.returncode == 0 and len(lines) == 1, done.stdout + done.stderr
    return lines[0].split()[0]


def test_header_prints_the_seed_of_the_run():
    base = {k: v for k, v in os.environ.items() if k != SEED_ENV}
    assert _collected_seed(base) == f"{SEED_ENV}={DEFAULT_SEED}"
    assert _collected_seed({**base, SEED_ENV: "random"}) != f"{SEED_ENV}=random"
