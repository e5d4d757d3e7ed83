"""The long RTL regression: many seeded random programs per configuration against the golden model.

    python -m tinyaccel.sim.regress --config ice40 --programs 1000 [--seed S]
    python -m tinyaccel.sim.regress --config ecp5 --replay 3735928559   # one program again

Every program runs on one persistent Verilator simulator per configuration (one launch serves
them all) and on a golden machine kept in lockstep; every response byte is compared
(timing counters for plausibility only). Each program is drawn from its own 32-bit seed: its
length, the share of illegal instructions, the idle-gap and back-pressure probabilities of the
two streams and the program itself, so ``--replay <program seed>`` reproduces one program
alone. One program in ten spans whole buffers (every address bit), two in ten use deeper
GEMMs and longer transfers. Program seeds derive from the run's ``--seed``
(``TINYACCEL_SEED``; default random, printed). Each program starts with ``SYNC clear=1`` and
reads only what it wrote, so it answers the same whatever ran before it. The named corner
programs of ``randprog.corner_programs`` run first.

Mismatches are printed (offset, instruction, field, expected vs got), the failing streams saved
under ``build/rtl_failures/``; the exit status is 1 when any program differs or hangs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..hw.config import get_config
from ..hw.isa import Buffer, Opcode
from . import randprog
from .rtl import RtlSession, build_root
from .scoreboard import Checker, isolated

__all__ = ["RegressResult", "program_for_seed", "save_failure", "regress", "main"]

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
    ops = sorted(opcodes if opcodes is not None else Opcode, key=lambda op: op.value)
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
                msg = (f"{res}\n  options {options}; stream saved to {path}; replay: python -m "
                       f"tinyaccel.sim.regress --config {config.name} --replay {prog_seed}")
                (bar.write if progress else out)(msg)
            bar.set_postfix(bad=result.mismatches + result.hangs)
        bar.close()
        result.launches = session.stats.launches
    result.wall_s = time.monotonic() - t0
    return result


def _check_streams(configs: list[str], paths: list[Path]) -> int:
    """Run saved streams on the RTL and the golden model; print each verdict."""
    bad = 0
    for name in configs:
        with RtlSession(name) as session:
            checker = Checker(session)
            for path in paths:
                for gap in (0.0, 0.5):
                    res = checker.check(path.read_bytes(), label=f"{name} {path} gaps {gap}",
                                        valid_gap=gap, ready_gap=gap, seed=1)
                    bad += not res.ok
                    print(res, flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinyaccel.sim.regress",
        description="RTL vs golden model on seeded random programs, zero tolerance.")
    parser.add_argument("--config", action="append", default=None,
                        help="configuration preset (repeatable; default ice40 and ecp5)")
    parser.add_argument("--programs", type=int, default=1000,
                        help="random programs per configuration (default 1000)")
    parser.add_argument("--seed", type=lambda s: int(s, 0), default=None,
                        help="run seed (default: TINYACCEL_SEED or random; printed)")
    parser.add_argument("--replay", type=lambda s: int(s, 0), action="append", default=None,
                        help="run only the program drawn from this program seed (repeatable)")
    parser.add_argument("--stream", type=Path, action="append", default=None,
                        help="check a saved host stream (e.g. build/rtl_failures/*.bin) at full "
                             "rate and with gaps, then stop (repeatable)")
    parser.add_argument("--opcodes", default=None,
                        help="comma-separated opcodes to draw from (default: what the RTL "
                             "implements; 'all' for every opcode)")
    parser.add_argument("--no-corners", action="store_true", help="skip the corner programs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    if args.seed is None:
        env = os.environ.get("TINYACCEL_SEED")
        args.seed = int(env, 0) if env else int(np.random.default_rng().integers(1 << 32))
    opcodes = None
    if args.opcodes == "all":
        opcodes = list(Opcode)
    elif args.opcodes:
        opcodes = [Opcode[name.strip().upper()] for name in args.opcodes.split(",")]
    configs = args.config or ["ice40", "ecp5"]
    if args.stream:
        return _check_streams(configs, args.stream)
    print(f"TINYACCEL_SEED={args.seed}", flush=True)
    results = []
    for name in configs:
        res = regress(name, args.programs, args.seed, opcodes=opcodes,
                      corners=not args.no_corners, progress=not args.no_progress,
                      replay=args.replay)
        results.append(res)
        rate = res.cycles / res.wall_s if res.wall_s else 0.0
        seeds = (f"replayed program seeds {' '.join(map(str, args.replay))}" if args.replay
                 else f"run seed {res.seed} (program seeds = numpy default_rng({res.seed})"
                      f".integers(0, 2**32, {args.programs}))")
        print(f"{res.config}: {res.programs} random programs + {res.corners} corner programs, "
              f"{res.mismatches} mismatches, {res.hangs} hangs; {seeds}; "
              f"opcodes {','.join(res.opcodes)}; "
              f"{res.cycles} cycles in {res.wall_s:.1f} s ({rate:,.0f} cycles/s incl. golden "
              f"model and checking), {res.launches} simulator launch(es)", flush=True)
        if res.failing_seeds:
            print(f"{res.config}: failing program seeds: "
                  f"{' '.join(map(str, res.failing_seeds))}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    bad = sum(r.mismatches + r.hangs for r in results)
    print(f"{'FAIL' if bad else 'PASS'}: {sum(r.programs for r in results)} random programs, "
          f"{bad} failing", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
