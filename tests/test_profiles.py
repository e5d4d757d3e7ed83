# amaranth: UnusedElaboratable=no
"""The implementation profile changes cycle counts, never results.

One fixed-seed random program (every opcode the profile implements, some faulting instructions)
runs on the Amaranth simulation of a tiny configuration in both profiles and in every legal
single-flag flip of each (full with one flag flipped, compact with one flag flipped), and every
response byte is compared with the golden model (:func:`hw_tb.check_against_golden`: timing
counters only for plausibility). ``pass_unit`` changes what is legal (PASS opcodes and fields);
the program is drawn per profile, so the flip full -> ``pass_unit=False`` runs the program of a
configuration without the PASS unit.
The program is fixed (its seed chosen once to reach every unit); the run seed (``TINYACCEL_SEED``,
printed) draws the input gaps and output back-pressure.
"""

import dataclasses

import numpy as np
import pytest
from hw_tb import COMPACT, FULL, check_against_golden, seed_from_env, small_config

from tinyaccel.hw.config import PRESETS, Implementation
from tinyaccel.hw.decode_rules import PASS_OPCODES
from tinyaccel.hw.isa import Buffer, Opcode, Status
from tinyaccel.protocol import StatusReport, parse_responses
from tinyaccel.sim.golden import GoldenMachine
from tinyaccel.sim.randprog import random_program

FLAGS = [f.name for f in dataclasses.fields(Implementation)]
#: The fixed default, so that `make test` runs the same program every time; chosen (once) so
#: that the short program executes every unit and also faults (test_program_covers_every_unit).
SEED = 2036


def profile_program(cfg, seed):
    """16 random instructions (10 % faulting) of the opcodes ``cfg`` implements, on small
    windows: short enough for 13 designs; then every buffer a unit writes (INP, ACC, OUT, MASK)
    stored whole, so that every instruction's effect is compared (the PASS units' too: MASK)."""
    program = random_program(cfg, np.random.default_rng(seed), n_instr=16, opcodes=None,
                             illegal_rate=0.1, window=8, max_k=4, max_blocks=2, max_count=4)
    for buf in (Buffer.INP, Buffer.ACC, Buffer.OUT, Buffer.MASK):
        program.store(buf, 0, cfg.depth(buf))
    return program.sync(counters=True)


#: The two profiles and their single-flag flips, as flag values.
FLIPS = {"full": dataclasses.asdict(FULL), "compact": dataclasses.asdict(COMPACT)}
for _name, _base in (("full", FULL), ("compact", COMPACT)):
    for _flag in FLAGS:
        FLIPS[f"{_name}-{_flag}"] = {**dataclasses.asdict(_base), _flag: not getattr(_base, _flag)}
#: The flips that make an illegal combination (see Implementation), and the error they raise:
#: overlap + serial_decode; pass_unit + a serial datapath (decode, IM2COL, requant).
ILLEGAL = {
    "full-serial_decode": "overlap=True with serial_decode=True",
    "compact-overlap": "overlap=True with serial_decode=True",
    "full-serial_im2col": "pass_unit=True with serial_im2col=True is not",
    "full-serial_requant": "pass_unit=True with serial_requant=True is not",
    "compact-pass_unit": ("pass_unit=True with serial_decode=True, serial_im2col=True, "
                          "serial_requant=True is not"),
}
VARIANTS = {name: Implementation(**flags) for name, flags in FLIPS.items() if name not in ILLEGAL}


def test_variants_are_distinct():
    """Sixteen flips plus the two profiles; each flip differs in one flag; five are illegal;
    the flip full -> pass_unit=False is legal (a full build without the PASS unit)."""
    assert len(FLAGS) == 8
    assert len(FLIPS) == 18 and len({tuple(f.values()) for f in FLIPS.values()}) == 18
    for name, flags in FLIPS.items():
        base = dataclasses.asdict(FULL if name.startswith("full") else COMPACT)
        differ = [f for f in FLAGS if flags[f] != base[f]]
        assert len(differ) == (0 if name in ("full", "compact") else 1), (name, differ)
    assert len(VARIANTS) == 13
    assert "full-pass_unit" in VARIANTS and not VARIANTS["full-pass_unit"].pass_unit


@pytest.mark.parametrize("name", sorted(ILLEGAL))
def test_illegal_flip_is_a_config_error(name):
    """overlap with serial_decode: the serial checks compute no access sets (the hazard
    tracking would see none, and a STORE of ACC would overtake the GEMM writing it). pass_unit
    with a serial datapath: the PASS unit is built only with the full datapaths (the serial
    decoder has no PASS checks, the serial IM2COL and requant no tiled/gate)."""
    from tinyaccel.errors import ConfigError
    with pytest.raises(ConfigError, match=ILLEGAL[name]):
        Implementation(**FLIPS[name])


@pytest.mark.parametrize("flag", ["serial_decode", "serial_im2col", "serial_requant"])
def test_pass_unit_needs_the_full_datapaths(flag):
    """Each serial datapath alone (without overlap, which serial_decode forbids anyway) refuses
    the PASS unit, naming both flags; without the PASS unit it is legal."""
    from tinyaccel.errors import ConfigError
    with pytest.raises(ConfigError, match=f"pass_unit=True with {flag}=True is not"):
        Implementation(overlap=False, pass_unit=True, **{flag: True})
    assert not Implementation(overlap=False, pass_unit=False, **{flag: True}).pass_unit


@pytest.mark.parametrize("name", list(VARIANTS))
def test_profile_never_changes_results(name):
    seed = seed_from_env()  # the stream timing (valid gaps, back-pressure); the program is fixed
    print(f"program seed={SEED} run seed={seed} profile={name}")
    cfg = small_config(impl=VARIANTS[name])
    check_against_golden(cfg, profile_program(cfg, SEED), seed=seed, gaps=0.2, backpressure=0.3)


#: The work of an instruction of each unit (0: the unit is not started).
WORK = {Opcode.GEMM: lambda i: i.m_blocks * i.n_blocks, Opcode.REQUANT: lambda i: i.count,
        Opcode.PATCH: lambda i: i.blocks, Opcode.SGQ: lambda i: i.count,
        Opcode.STORE: lambda i: i.count, Opcode.IM2COL: lambda i: i.m_blocks,
        Opcode.DILATE: lambda i: i.out_h * i.out_w}


@pytest.mark.parametrize("name", ["full", "compact", "full-pass_unit"])
def test_program_covers_every_unit(name):
    """The fixed program executes, on each base profile and on the full one without the PASS
    unit, an instruction with work to do of every unit the profile has (GEMM, REQUANT, SGQ,
    IM2COL, STORE; PATCH and DILATE with the PASS unit; by the golden model: not in the shadow
    of a fault) and has a faulting instruction."""
    cfg = small_config(impl=VARIANTS[name])
    program = profile_program(cfg, SEED)
    items = parse_responses(cfg, program, GoldenMachine(cfg).run(program.to_bytes()))
    executed, window, faulted = set(), [], False
    for (instr, _), item in zip(program, items, strict=True):
        window.append(instr)
        if isinstance(item, StatusReport):
            faulted |= item.status != Status.OK
            done = window if item.status == Status.OK else window[:item.error_pc]
            executed.update(i.opcode for i in done if i.opcode in WORK and WORK[i.opcode](i))
            window = []
    assert faulted
    units = {op for op in WORK if cfg.impl.pass_unit or op not in PASS_OPCODES}
    assert units <= executed, units - executed


def test_presets_name_their_profile():
    """Today's choice for every preset, written in the preset itself."""
    assert PRESETS["ice40"].impl == Implementation.compact()
    assert PRESETS["ecp5"].impl == Implementation.full()
    assert PRESETS["sim"].impl == Implementation.full()
    assert small_config().impl == COMPACT


def test_couplings():
    """The block-level consequences of the flags, as the top reads them."""
    assert FULL.access_sets and not FULL.exclusive and not FULL.held_cmd
    assert not FULL.scratchpad_lanes and not FULL.sgq_held_cmd
    assert COMPACT.exclusive and COMPACT.held_cmd and COMPACT.scratchpad_lanes
    assert COMPACT.sgq_held_cmd and not COMPACT.access_sets
    # the SGQ encoder holds its command only with its serial datapath and exclusive issue
    assert not dataclasses.replace(COMPACT, serial_sgq=False).sgq_held_cmd
    assert not dataclasses.replace(FULL, serial_sgq=True).sgq_held_cmd


def test_bad_profile_is_a_config_error():
    from tinyaccel.errors import ConfigError
    with pytest.raises(ConfigError, match="overlap=1"):
        Implementation(overlap=1)
    with pytest.raises(ConfigError, match="impl="):
        dataclasses.replace(PRESETS["ice40"], impl="compact")


def test_profile_reaches_the_hardware():
    """`Accelerator(config)` builds what the config's profile names."""
    from tinyaccel.hw.top import Accelerator
    for impl in (FULL, COMPACT):
        cfg = small_config(impl=impl)
        assert Accelerator(cfg).impl is impl


#: Cycles per instruction that the driver's model leaves out (fixed latencies), by profile.
#: Full: the parallel decode (3 cycles + up to 8 for a GEMM's products, 16 for an SGQ), the
#: dispatcher's hazard register and the units' pipeline tails (GEMM drain 3 stages, STORE FIFO);
#: most of it overlaps other work. Compact: nothing overlaps, and a GEMM's serial decode alone
#: takes a few tens of cycles (docs/architecture.md 11.2, 11.4), plus the start flop and the
#: settle cycles of the exclusive dispatcher and the drain of the last block (rows * cols /
#: group + 3). Measured: 5-11 (ecp5), 20-34 (ice40) per instruction.
LATENCY_PER_INSTRUCTION = {"ecp5": 16, "ice40": 64}


@pytest.mark.rtl
@pytest.mark.parametrize("name", list(LATENCY_PER_INSTRUCTION))
def test_cycle_estimate_follows_the_profile(name):
    """The driver's cycle model against the counters of the Verilated RTL.

    The model is a lower bound (no fixed latencies, and every unit time it uses is the unit's
    shortest), and it misses at most the fixed latencies of each instruction:
    ``estimate <= measured <= estimate + LATENCY_PER_INSTRUCTION * instructions``. Without the
    profile (overlapped issue and a requant channel per cycle for ice40) the estimate of these
    GEMMs on ice40 is 20-40x too low and fails the upper bound.
    """
    from tinyaccel.bench.workloads import random_gemm
    from tinyaccel.errors import BackendUnavailable
    from tinyaccel.hw.config import get_config
    from tinyaccel.hw.isa import Counter
    from tinyaccel.sim.rtl import RtlSession
    from tinyaccel.sim.scoreboard import compare_responses
    from tinyaccel.sw.gemm import estimate_cycles

    cfg = get_config(name)
    try:
        session = RtlSession(cfg).start()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    with session:
        for M, N, K, out in ((16, 16, 16, "int8"), (20, 12, 40, "int8"), (16, 16, 16, "int32")):
            w = random_gemm(cfg, M, N, K, seed=M * N + K, out=out)
            stream = w.to_bytes()
            response = session.run(stream, w.response_bytes())
            want = GoldenMachine(cfg).run(stream)
            assert compare_responses(cfg, stream, want, response) is None
            _, report = w.parse(response)
            measured = report.counters[Counter.CYCLES]
            estimate = estimate_cycles(w.lowering.plan, cfg)
            slack = LATENCY_PER_INSTRUCTION[name] * len(w.program)
            print(f"{name} {M}x{N}x{K} {out}: estimate {estimate}, measured {measured} "
                  f"({estimate / measured:.3f}), {len(w.program)} instructions")
            assert estimate <= measured <= estimate + slack, (name, M, N, K, out)


def test_profile_names():
    """The name in the preset table says the profile, or the nearer one and the flips."""
    assert FULL.name == "full" and COMPACT.name == "compact"
    assert VARIANTS["compact-shadow"].name == "compact with shadow=True"
    assert VARIANTS["full-overlap"].name == "full with overlap=False"
    assert VARIANTS["compact-serial_decode"].name == "compact with serial_decode=False"
