"""The long RTL regression: many seeded random programs per configuration against the golden model.

    tinyaccel regress --config ice40 --programs 1000 [--seed S]
    tinyaccel regress --config ecp5 --replay 3735928559   # one program again

Every program runs on one persistent Verilator simulator per configuration (one launch serves
them all) and on a golden machine kept in lockstep; every response byte is compared
(timing counters for plausibility only). Each program is drawn from its own 32-bit seed: its
length, the share of illegal instructions, the idle-gap and back-pressure probabilities of the
two streams and the program itself, so ``--replay <program seed>`` reproduces one program
alone. One program in ten spans whole buffers (every address bit), two in ten use deeper
GEMMs and longer transfers. Program seeds derive from the run's ``--seed`` (``TINYACCEL_SEED``:
an integer or ``random``; default random, printed). Each program starts with ``SYNC clear=1`` and
reads only what it wrote, so it answers the same whatever ran before it. The named corner
programs of ``randprog.corner_programs`` run first.

Mismatches are printed (offset, instruction, field, expected vs got), the failing streams saved
under ``build/rtl_failures/``; ``tinyaccel regress`` exits with status 1 when any program
differs or hangs. :func:`run` is the whole command as a library function.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OpcodeError
from ..hw.config import get_config
from ..hw.isa import Buffer, Opcode
from . import randprog
from .rtl import RtlSession, build_root
from .scoreboard import Checker, isolated

__all__ = ["RegressResult", "program_for_seed", "save_failure", "regress", "run", "run_seed",
           "parse_opcodes", "summary_line", "check_streams", "DEFAULT_CONFIGS"]

#: The configurations ``tinyaccel regress`` runs when none is named: the two boards'.
DEFAULT_CONFIGS = ("ice40", "ecp5")

GAPS = (0.0, 0.0, 0.1, 0.3, 0.5, 0.8)


@dataclass
class RegressResult:
    """Outcome of the regression of one configuration."""
    config: str
    seed: int
    programs: int = 0
    corners: int = 0
    mismatches: int = 0
    hangs: int = 0
    failing_seeds: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    opcodes: list[str] = field(default_factory=list)
    cycles: int = 0
    wall_s: float = 0.0
    launches: int = 0

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.hangs == 0


def program_for_seed(config, prog_seed: int, opcodes) -> tuple[bytes, dict]:
    """The isolated stream of the random program drawn from ``prog_seed``, and its run options.

    Everything about the program comes from its own seed, so it replays alone.
    """
    rng = np.random.default_rng(prog_seed)
    opcodes = sorted((Opcode(op) for op in opcodes), key=lambda op: op.value)  # order matters
    n_instr = int(rng.integers(4, 96))
    illegal = float(rng.choice([0.0, 0.0, 0.02, 0.05, 0.15]))
    kind = rng.random()
    if kind < 0.1:  # whole buffers: every address bit, the largest extents the depths allow
        window = max(config.depth(buf) for buf in Buffer)
        sizes = dict(max_k=128, max_blocks=4, max_count=64)
    elif kind < 0.3:  # deeper GEMMs, more blocks, longer transfers
        window, sizes = 128, dict(max_k=96, max_blocks=4, max_count=48)
    else:
        window, sizes = 64, dict(max_k=32, max_blocks=3, max_count=16)
    prog = randprog.random_program(config, rng, n_instr=n_instr, opcodes=opcodes,
                                   illegal_rate=illegal, window=window, **sizes)
    options = {"valid_gap": float(rng.choice(GAPS)), "ready_gap": float(rng.choice(GAPS)),
               "seed": prog_seed}
    return isolated(config, prog), options


def save_failure(config_name: str, label: str, stream: bytes, report: str) -> Path:
    """Keep a failing stream (``.bin``) and its report (``.txt``) under build/rtl_failures/."""
    folder = build_root().parent / "rtl_failures"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{config_name}-{label}"
    stem.with_suffix(".bin").write_bytes(stream)
    stem.with_suffix(".txt").write_text(report + "\n")
    return stem.with_suffix(".bin")


def regress(config, programs: int, seed: int, *, opcodes=None, corners: bool = True,
            progress: bool = True, out=print, replay: list[int] | None = None) -> RegressResult:
    """Run ``programs`` random programs (plus the corner programs) on ``config``."""
    from tqdm import tqdm
    config = get_config(config)
    ops = sorted(opcodes if opcodes is not None else randprog.implemented_opcodes(config),
                 key=lambda op: op.value)
    result = RegressResult(config.name, seed, opcodes=[op.name for op in ops])
    rng = np.random.default_rng(seed)
    seeds = replay if replay is not None else [int(s) for s in rng.integers(0, 1 << 32,
                                                                              programs)]
    t0 = time.monotonic()
    with RtlSession(config) as session:
        checker = Checker(session)
        if corners and replay is None:
            for corner in randprog.corner_programs(config, ops):
                stream = isolated(config, corner.program)
                res = checker.check(stream, label=f"corner {corner.name}")
                result.corners += 1
                result.cycles += res.cycles
                if not res.ok:
                    result.mismatches += res.hang is None
                    result.hangs += res.hang is not None
                    result.failures.append(str(res))
                    path = save_failure(config.name, f"corner-{corner.name}", stream, str(res))
                    out(f"{res}\n  stream saved to {path}")
        bar = tqdm(seeds, desc=f"{config.name}", unit="prog", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        for prog_seed in bar:
            stream, options = program_for_seed(config, prog_seed, ops)
            res = checker.check(stream, label=f"{config.name} program seed {prog_seed} "
                                              f"(run seed {seed})", **options)
            result.programs += 1
            result.cycles += res.cycles
            if not res.ok:
                result.mismatches += res.hang is None
                result.hangs += res.hang is not None
                result.failing_seeds.append(prog_seed)
                result.failures.append(str(res))
                path = save_failure(config.name, str(prog_seed), stream,
                                     f"{res}\noptions: {options}")
                msg = (f"{res}\n  options {options}; stream saved to {path}; replay: "
                       f"tinyaccel regress --config {config.name} --replay {prog_seed}")
                (bar.write if progress else out)(msg)
            bar.set_postfix(bad=result.mismatches + result.hangs)
        bar.close()
        result.launches = session.stats.launches
    result.wall_s = time.monotonic() - t0
    return result


def check_streams(configs, paths: list[Path], out=print) -> int:
    """Run saved host streams on the RTL and the golden model, at full rate and with gaps.

    Prints each verdict through ``out``; returns how many runs differ or hang.
    """
    bad = 0
    for name in configs:
        with RtlSession(name) as session:
            checker = Checker(session)
            for path in paths:
                for gap in (0.0, 0.5):
                    res = checker.check(Path(path).read_bytes(),
                                        label=f"{name} {path} gaps {gap}",
                                        valid_gap=gap, ready_gap=gap, seed=1)
                    bad += not res.ok
                    out(str(res))
    return bad


def run_seed(seed: int | None = None) -> int:
    """The run seed: ``seed``, else ``$TINYACCEL_SEED`` (any integer literal), else a random one.

    The caller prints it, so a run replays.
    """
    if seed is not None:
        return seed
    return randprog.parse_seed(os.environ.get(randprog.SEED_ENV) or "random")


def parse_opcodes(text: str | None) -> list[Opcode] | None:
    """``"GEMM,load"`` -> those opcodes; ``"all"`` -> every opcode; None/empty -> None (the
    opcodes the RTL implements).

    Raises
    ------
    OpcodeError
        Naming the unknown name and the opcodes of the ISA.
    """
    if not text:
        return None
    if text.strip().lower() == "all":
        return list(Opcode)
    opcodes = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        try:
            opcodes.append(Opcode[name.upper()])
        except KeyError:
            raise OpcodeError(f"unknown opcode {name!r}; opcodes: "
                              f"{', '.join(op.name for op in Opcode)}, or 'all'") from None
    return opcodes


def summary_line(res: RegressResult, replay: list[int] | None = None) -> str:
    """One line per configuration: programs, mismatches, hangs, how to replay, speed."""
    rate = res.cycles / res.wall_s if res.wall_s else 0.0
    seeds = (f"replayed program seeds {' '.join(map(str, replay))}" if replay
             else f"run seed {res.seed} (program seeds = numpy default_rng({res.seed})"
                  f".integers(0, 2**32, {res.programs}))")
    return (f"{res.config}: {res.programs} random programs + {res.corners} corner programs, "
            f"{res.mismatches} mismatches, {res.hangs} hangs; {seeds}; "
            f"opcodes {','.join(res.opcodes)}; "
            f"{res.cycles} cycles in {res.wall_s:.1f} s ({rate:,.0f} cycles/s incl. golden "
            f"model and checking), {res.launches} simulator launch(es)")


def run(configs=DEFAULT_CONFIGS, programs: int = 1000, seed: int = 0, *, opcodes=None,
        corners: bool = True, progress: bool = True, replay: list[int] | None = None,
        out=print) -> list[RegressResult]:
    """:func:`regress` each configuration in turn; print a summary line per configuration.

    ``seed`` is the run seed (see :func:`run_seed`); ``replay`` runs only these program seeds.
    """
    results = []
    for name in configs:
        res = regress(name, programs, seed, opcodes=opcodes, corners=corners,
                      progress=progress, replay=replay, out=out)
        results.append(res)
        out(summary_line(res, replay))
        if res.failing_seeds:
            out(f"{res.config}: failing program seeds: {' '.join(map(str, res.failing_seeds))}")
    return results
