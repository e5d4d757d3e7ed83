"""Collaborative (split) learning: a device trains the first layers on the accelerator, a server
trains the rest in FP32, and the features cross a narrow link — SGQ-encoded by the hardware.

::

    from tinyaccel.sw.collab import CollabConfig, run, experiment
    result = run(CollabConfig(model="clutter-cnn", split="relu2", codec="sgq", budget=1.5))
    exp = experiment(CollabConfig(epochs=8), "runs/collab", seeds=[0, 1, 2])   # every codec

One training step (``docs/collab.md`` describes what crosses the link, both ways):

1. **device**: the device half's forward GEMMs run in INT8 on the accelerator (Octo training,
   :mod:`tinyaccel.sw.octo`); its output features are requantized to INT8 (one scale per
   batch) and encoded by the *uplink codec*: for ``sgq`` a program LOADs them into OUT and the
   accelerator's SGQ encoder sends one payload per channel group (:mod:`tinyaccel.sw.sgq`);
2. **uplink**: the encoded bytes (SGQ: the accelerator's whole responses, length header and CRC
   trailer included, plus the 4-byte scale); the server decodes them (:func:`~tinyaccel.sw.sgq.
   decode_payload`) into FP32 features;
3. **server**: the FP32 server half computes the loss and the gradient of the decoded features;
4. **downlink**: that gradient, FP32 or INT8 (one scale per batch);
5. **device**: the gradient passes straight through the feature quantizer (STE) into the device
   half's backward, whose dX and dW GEMMs run in INT8 on the accelerator.

Uplink codecs (:data:`CODECS`): ``fp32``; ``int8`` (per tensor); ``u4-tensor``, ``u4-channel``,
``u2-tensor``, ``u2-channel`` (uniform min/max quantization per tensor or per channel, FP32
min/max sent along); ``sgq`` at a ``budget`` in wire bits per feature value (``None``:
lossless). The SGQ plan (channel order, group size, stripes, per-group shift) is calibrated at
the start of every epoch on the features of a fixed calibration batch (running statistics of
the device half as it trains).

Runs are replayable: the model and batches come from ``seed``, Octo's rounding from seeded
generators, every GEMM and every SGQ payload is exact on every backend, torch runs single-threaded.
On the ``rtl`` backend every SGQ program also runs on the golden model and the payloads are
compared byte for byte (``golden_rtl_identical``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError, SplitError
from ..models import zoo
from ..models.data import single_thread
from ..protocol import sgq_response_length
from . import sgq
from .octo import convert, executor_of

__all__ = ["CollabConfig", "CODECS", "DOWNLINKS", "split_model", "run", "experiment",
           "Experiment", "comparison_table", "plot_tradeoff", "DEFAULT_BUDGETS", "SCALE_BYTES"]

#: Uplink codecs: name -> (kind, bits, granularity).
CODECS: dict[str, tuple[str, int, str]] = {
    "fp32": ("float", 32, "tensor"),
    "int8": ("symmetric", 8, "tensor"),
    "u4-tensor": ("uniform", 4, "tensor"),
    "u4-channel": ("uniform", 4, "channel"),
    "u2-tensor": ("uniform", 2, "tensor"),
    "u2-channel": ("uniform", 2, "channel"),
    "sgq": ("sgq", 8, "group"),
}
DOWNLINKS = ("fp32", "int8")
#: The SGQ budgets of :func:`experiment` (wire bits per feature value).
DEFAULT_BUDGETS = (3.0, 2.0, 1.5, 1.2)
SCALE_BYTES = 4  #: one FP32 scale (or min/max value) on the wire
PAPER_REDUCTION = 15.97  #: SGQ's best published uplink reduction against FP32 features
TARGET_REDUCTION = 20.0  #: this kit's target (docs/collab.md)
CALIBRATION_SAMPLES = 256
SIGNIFICANCE_DECAY = 0.9  #: running mean of the per-channel squared feature gradient
#: Default split layer and data set of each model.
DEFAULT_SPLIT = {"digits-cnn": "relu2", "clutter-cnn": "relu3"}


@dataclass(frozen=True)
class CollabConfig:
    """Everything that determines a collaborative training run."""

    model: str = "clutter-cnn"
    split: str | None = None  #: the last device layer (module name); None: the model's default
    codec: str = "sgq"
    budget: float | None = 1.5  #: SGQ: wire bits per feature value (None: lossless)
    downlink: str = "int8"
    method: str = "octo"  #: the device half's training: octo | int8-naive | fp32
    backend: str = "golden"  #: golden | rtl | host (host: exact GEMMs and SGQ in NumPy)
    config: str = "sim"
    epochs: int = 8
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_steps: int | None = None  #: cap on steps per epoch (short test runs)
    #: SGQ's channel significance when it spends the budget: ``gradient`` weights each channel's
    #: squared error by its running mean squared feature gradient (what the downlink brings),
    #: ``none`` weights every channel alike
    significance: str = "gradient"
    line_rate: float = 1e6  #: link line rate (bit/s) for the link-time figure
    clock_hz: float = 50e6  #: accelerator clock for the encoder-time figure

    @property
    def split_layer(self) -> str:
        if self.split:
            return self.split
        try:
            return DEFAULT_SPLIT[self.model]
        except KeyError:
            raise SplitError(f"model {self.model!r} has no default split layer: pass split=") \
                from None

    @property
    def label(self) -> str:
        if self.codec == "sgq":
            return "sgq-lossless" if self.budget is None else f"sgq-{self.budget:g}b"
        return self.codec


# -- the cut ------------------------------------------------------------------------------------

def split_model(model: nn.Module, split: str) -> tuple[nn.Module, nn.Module]:
    """Cut ``model`` after its submodule ``split``: ``(device half, server half)``, two
    ``torch.fx.GraphModule`` sharing ``model``'s parameters; ``server(device(x)) == model(x)``.

    Raises
    ------
    SplitError
        ``split`` is not a module the forward calls, or a value other than its output (a
        residual branch, an input) is used after the cut.
    """
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many kinds
        raise SplitError(f"model {type(model).__name__} cannot be traced to cut it: {exc}") \
            from exc
    nodes = list(traced.graph.nodes)
    cut = next((n for n in nodes if n.op == "call_module" and n.target == split), None)
    if cut is None:
        names = [n.target for n in nodes if n.op == "call_module"]
        raise SplitError(f"split layer {split!r} is not a module of {type(model).__name__}'s "
                         f"forward; choose one of {', '.join(names)}")
    before = set(nodes[:nodes.index(cut) + 1])
    for node in nodes[nodes.index(cut) + 1:]:
        for used in node.all_input_nodes:
            if used in before and used is not cut:
                raise SplitError(f"cannot cut {type(model).__name__} after {split!r}: "
                                 f"{node.name!r} after the cut uses {used.name!r} from before "
                                 f"it (a residual branch crosses the split)")
    if cut is nodes[-2] and nodes[-1].op == "output":
        raise SplitError(f"split layer {split!r} is the model's last layer: nothing is left "
                         f"for the server")
    device_graph, server_graph = torch.fx.Graph(), torch.fx.Graph()
    env: dict = {}
    for node in nodes[:nodes.index(cut) + 1]:
        env[node] = device_graph.node_copy(node, lambda n: env[n])
    device_graph.output(env[cut])
    env = {cut: server_graph.placeholder("features")}
    for node in nodes[nodes.index(cut) + 1:]:
        env[node] = server_graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(traced, device_graph), torch.fx.GraphModule(traced, server_graph)


# -- the link -----------------------------------------------------------------------------------

class _LinkStats:
    def __init__(self):
        self.samples = self.up_bytes = self.down_bytes = self.values = 0
        self.encoder_cycles = self.sgq_programs = self.compared = 0
        self.identical = True
        self.digest = hashlib.sha256()

    def record(self) -> dict:
        per = max(self.samples, 1)
        return {"uplink_bytes_per_sample": self.up_bytes / per,
                "downlink_bytes_per_sample": self.down_bytes / per,
                "fp32_bytes_per_sample": 4 * self.values / per,
                "encoder_cycles": self.encoder_cycles, "sgq_programs": self.sgq_programs}


class Link:
    """The uplink codec and the downlink, with their byte counts."""

    def __init__(self, cfg: CollabConfig, device=None, golden=None):
        if cfg.codec not in CODECS:
            raise ShapeError(f"unknown uplink codec {cfg.codec!r}; choose one of "
                             f"{', '.join(CODECS)}")
        if cfg.significance not in ("gradient", "none"):
            raise ShapeError(f"unknown significance {cfg.significance!r}; choose gradient or "
                             f"none")
        if cfg.downlink not in DOWNLINKS:
            raise ShapeError(f"unknown downlink {cfg.downlink!r}; choose one of "
                             f"{', '.join(DOWNLINKS)}")
        self.cfg, self.device, self.golden = cfg, device, golden
        from ..hw.config import get_config
        self.accel = get_config(cfg.config)
        self.plan: sgq.SgqPlan | None = None
        self.pending_plan_bytes = 0  # a new plan rides on the next counted uplink message
        self.significance: np.ndarray | None = None  # per channel, running mean squared gradient
        self.stats = _LinkStats()
        self.counting = True

    # uplink
    def calibrate(self, features: torch.Tensor) -> None:
        """SGQ: choose the plan for features like ``features`` (a calibration batch)."""
        if self.cfg.codec == "sgq":
            q, _ = _int8(features)
            self.plan = sgq.calibrate(q.numpy(), self.accel, self.cfg.budget,
                                      weights=self.significance)
            self.pending_plan_bytes = self.plan.wire_bytes

    def uplink(self, f: torch.Tensor) -> torch.Tensor:
        """Encode ``f`` as the device sends it; return what the server decodes."""
        kind, bits, per = CODECS[self.cfg.codec]
        n = f.shape[0]
        f = f.detach()
        if kind == "float":
            out, nbytes = f.clone(), 4 * f.numel()
        elif kind == "symmetric":
            q, s = _int8(f)
            out, nbytes = q.to(torch.float32) * s, q.numel() + SCALE_BYTES
        elif kind == "uniform":
            out, nbytes = _uniform(f, bits, per)
        else:
            out, nbytes = self._sgq(f)
        if self.counting:
            self.stats.samples += n
            self.stats.values += f.numel()
            self.stats.up_bytes += nbytes + self.pending_plan_bytes
            self.pending_plan_bytes = 0
        return out

    def _sgq(self, f: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.plan is None:
            self.calibrate(f)
        q, s = _int8(f)
        q = q.numpy()
        self.plan = sgq.allocate(self.plan, q, self.accel, self.cfg.budget, self.significance)
        prog, emitted = sgq.encode_program(self.plan, q, self.accel)
        payloads = self._run(prog)
        decoded = sgq.decode_responses(self.plan, payloads, emitted, q.shape[0])
        nbytes = (SCALE_BYTES + self.plan.groups  # the scale, each group's shift
                  + sum(sgq_response_length(self.accel, len(p)) for p in payloads))
        return torch.from_numpy(decoded.astype(np.float32)) * s, nbytes

    def _run(self, prog) -> list[bytes]:
        """The SGQ payloads of ``prog`` on the device."""
        before = self.device.stats.cycles
        out = self.device.run(prog)
        self.stats.encoder_cycles += self.device.stats.cycles - before
        if self.golden is not None:
            reference = self.golden.run(prog)
            self.stats.compared += 1
            self.stats.identical &= _payloads(reference) == _payloads(out)
        self.stats.sgq_programs += 1
        payloads = _payloads(out)
        for p in payloads:
            self.stats.digest.update(p)
        return payloads

    # downlink
    def downlink(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient as the device receives it."""
        if self.cfg.downlink == "fp32":
            out, nbytes = g.clone(), 4 * g.numel()
        else:
            q, s = _int8(g)
            out, nbytes = q.to(torch.float32) * s, q.numel() + SCALE_BYTES
        if self.counting:
            self.stats.down_bytes += nbytes
            if self.cfg.significance == "gradient" and out.dim() >= 2:
                energy = out.double().square().transpose(0, 1).reshape(out.shape[1], -1)
                energy = energy.mean(dim=1).numpy()
                self.significance = energy if self.significance is None else (
                    SIGNIFICANCE_DECAY * self.significance + (1 - SIGNIFICANCE_DECAY) * energy)
        return out


def _payloads(responses) -> list[bytes]:
    return [r for r in responses if isinstance(r, bytes)]


def _int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor symmetric INT8, round half to even: ``(codes, scale)``."""
    amax = x.detach().abs().max().to(torch.float32)
    scale = torch.where(amax > 0, amax / 127, torch.ones((), dtype=torch.float32))
    return torch.round(x.detach() / scale).clamp_(-127, 127).to(torch.int8), scale


def _uniform(x: torch.Tensor, bits: int, per: str) -> tuple[torch.Tensor, int]:
    """Uniform ``bits``-bit min/max quantization per tensor or per channel (dim 1), round half
    to even; bytes: the packed codes plus an FP32 min and max per tensor or channel."""
    dims = tuple(d for d in range(x.dim()) if d != 1) if per == "channel" else None
    lo = x.amin(dim=dims, keepdim=True) if dims else x.min()
    hi = x.amax(dim=dims, keepdim=True) if dims else x.max()
    levels = (1 << bits) - 1
    step = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
    q = torch.round((x - lo) / step).clamp_(0, levels)
    ranges = x.shape[1] if per == "channel" else 1
    return q * step + lo, math.ceil(x.numel() * bits / 8) + 2 * SCALE_BYTES * ranges


class _LinkFn(torch.autograd.Function):
    """Forward: the uplink (encode, decode). Backward: the downlink, straight through the
    feature quantizer."""

    @staticmethod
    def forward(ctx, f, link: Link):
        ctx.link = link
        return link.uplink(f)

    @staticmethod
    def backward(ctx, g):
        return ctx.link.downlink(g), None


# -- data ---------------------------------------------------------------------------------------

def _dataset(model: str):
    if model == "clutter-cnn":
        from ..models.clutter import load_clutter_split
        return load_clutter_split()
    from ..models.data import load_digits_split
    return load_digits_split()


# -- one run ------------------------------------------------------------------------------------

def run(cfg: CollabConfig, progress: bool | Callable = False,
        log: Callable[[str], None] | None = None) -> dict:
    """Train ``cfg`` once; returns its metrics (see ``docs/collab.md``)."""
    if cfg.epochs < 1:
        raise ShapeError(f"epochs={cfg.epochs} must be >= 1")
    data = _dataset(cfg.model)
    if progress is True:
        from tqdm import tqdm
        progress = tqdm
    from ..protocol import Program
    from .runtime import Device
    golden = None
    t_open = time.perf_counter()
    # host: the GEMMs in NumPy, the SGQ programs on the golden model
    device = Device("golden" if cfg.backend == "host" else cfg.backend, cfg.config)
    device.run(Program(device.config))  # builds / starts the backend
    if cfg.backend == "rtl":
        golden = Device("golden", cfg.config)
    open_s = time.perf_counter() - t_open
    try:
        with single_thread():
            return _train(cfg, data, device, golden, progress, log) | {
                "device_open_s": round(open_s, 3)}
    finally:
        for d in (device, golden):
            if d is not None:
                d.close()


def _train(cfg, data, device, golden, progress, log) -> dict:
    model = zoo.build(cfg.model, cfg.seed)
    dev_half, srv_half = split_model(model, cfg.split_layer)
    x_train, y_train = data.x_train, data.y_train
    convert(dev_half, cfg.method, None if cfg.backend == "host" else device,
            example_input=x_train[:1].clone(), seed=cfg.seed)
    params = list(dev_half.parameters()) + [p for p in srv_half.parameters()
                                            if all(p is not q for q in dev_half.parameters())]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(x_train) / cfg.batch_size)
    steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    link = Link(cfg, device, golden)
    calib = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
        cfg.seed))[:CALIBRATION_SAMPLES]]
    executor = executor_of(dev_half)
    history, plans = [], []
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        dev_half.eval()
        with torch.no_grad():
            link.calibrate(dev_half(calib))
        plans.append(link.plan.describe() if link.plan else None)
        dev_half.train()
        srv_half.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + epoch))
        batches = range(steps)
        if progress:
            batches = progress(batches, desc=f"{cfg.label} epoch {epoch + 1}/{cfg.epochs}",
                               unit="step", leave=False)
        losses = []
        t0 = time.perf_counter()
        for i in batches:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            features = dev_half(x_train[idx])
            logits = srv_half(_LinkFn.apply(features, link))
            loss = F.cross_entropy(logits, y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress and hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{losses[-1]:.3f}")
        train_s = time.perf_counter() - t0
        acc = _evaluate(dev_half, srv_half, link, data.x_test, data.y_test)
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "test_acc": acc,
                  "train_wall_s": train_s}
        history.append(record)
        if log:
            log(f"{cfg.label} seed {cfg.seed} epoch {epoch + 1}/{cfg.epochs}: loss "
                f"{record['train_loss']:.4f}, test acc {100 * acc:.2f} %, "
                f"{link.stats.up_bytes / max(link.stats.samples, 1):.1f} B/sample up")
    wall = time.perf_counter() - t_start
    stats = link.stats.record()
    steps_total = cfg.epochs * steps
    up_step = stats["uplink_bytes_per_sample"] * cfg.batch_size
    totals = executor.totals() if executor is not None else None
    n_values = math.prod(features.shape[1:])
    return {
        "label": cfg.label, "config_record": asdict(cfg), "model": cfg.model,
        "split": cfg.split_layer, "codec": cfg.codec, "budget": cfg.budget,
        "method": cfg.method, "backend": cfg.backend, "config": cfg.config, "seed": cfg.seed,
        "epochs": cfg.epochs, "test_acc": history[-1]["test_acc"],
        "train_loss": history[-1]["train_loss"], "history": history,
        "feature_shape": list(features.shape[1:]), "feature_values": n_values,
        "input_bytes_per_sample": math.prod(x_train.shape[1:]),
        **stats,
        "uplink_reduction_vs_fp32": stats["fp32_bytes_per_sample"]
        / stats["uplink_bytes_per_sample"],
        "uplink_bits_per_value": 8 * stats["uplink_bytes_per_sample"] / n_values,
        "downlink_fp32_bytes_per_sample": 4 * n_values,
        "downlink_int8_bytes_per_sample": n_values + SCALE_BYTES / cfg.batch_size,
        "link_s_per_step": 8 * (up_step + stats["downlink_bytes_per_sample"] * cfg.batch_size)
        / cfg.line_rate,
        "uplink_s_per_step": 8 * up_step / cfg.line_rate, "line_rate_bps": cfg.line_rate,
        "encoder_cycles_per_step": stats["encoder_cycles"] / steps_total
        if cfg.backend == "rtl" else None,
        "encoder_s_per_step": stats["encoder_cycles"] / steps_total / cfg.clock_hz
        if cfg.backend == "rtl" else None,
        "clock_hz": cfg.clock_hz,
        "gemm_cycles": totals.cycles if totals else 0, "gemm_macs": totals.macs if totals else 0,
        "golden_rtl_identical": link.stats.identical if golden is not None else None,
        "golden_rtl_programs_compared": link.stats.compared,
        "payload_sha256": link.stats.digest.hexdigest() if cfg.codec == "sgq" else None,
        "sgq_plans": plans, "wall_s": round(wall, 3),
    }


@torch.no_grad()
def _evaluate(dev_half, srv_half, link: Link, x, y, batch: int = 120) -> float:
    dev_half.eval()
    srv_half.eval()
    link.counting = False
    correct = 0
    try:
        for i in range(0, len(x), batch):
            logits = srv_half(link.uplink(dev_half(x[i:i + batch])))
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    finally:
        link.counting = True
    return correct / len(x)


# -- experiments --------------------------------------------------------------------------------

@dataclass
class Experiment:
    """Every run of :func:`experiment`, the summary per label and where it was written."""

    out_dir: Path
    results: list[dict]
    summary: list[dict]
    table: str
    plot: Path

    def record(self) -> dict:
        head = _headline(self.summary)
        return {"headline": head, "summary": self.summary,
                "runs": [{k: v for k, v in r.items() if k != "history"} | {
                    "history": r["history"]} for r in self.results]}


def experiment_runs(base: CollabConfig, codecs=None, budgets=None) -> list[CollabConfig]:
    """The runs of :func:`experiment`: every baseline codec and SGQ at every budget."""
    codecs = list(codecs) if codecs else [c for c in CODECS if c != "sgq"] + ["sgq"]
    runs = []
    for codec in codecs:
        if codec == "sgq":
            for b in (budgets if budgets is not None else DEFAULT_BUDGETS):
                runs.append(replace(base, codec="sgq", budget=b))
        else:
            runs.append(replace(base, codec=codec))
    return runs


def experiment(base: CollabConfig, out_dir: str | Path, seeds=(0, 1, 2), codecs=None,
               budgets=None, jobs: int = 1, progress: bool | Callable = False,
               log: Callable[[str], None] | None = None, headline: float | None = None
               ) -> Experiment:
    """Train every codec (and SGQ budget) from each seed; write ``metrics.json``, ``table.md``
    and ``tradeoff.png`` (accuracy against uplink bytes per sample) into ``out_dir``.

    ``jobs`` > 1 trains that many runs at once in worker processes (each single-threaded and
    replayable, so the results do not depend on ``jobs``); the RTL and board backends run one
    at a time.
    ``progress``: a tqdm-like callable, over runs (and, with ``jobs=1``, over steps).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = [cfg for seed in seeds
               for cfg in experiment_runs(replace(base, seed=seed), codecs, budgets)]
    bar = progress(total=len(configs), desc="collab runs", unit="run") if progress else None
    results: list[dict | None] = [None] * len(configs)

    def done(i: int, result: dict) -> None:
        results[i] = result
        if log:
            log(f"{result['label']} seed {result['seed']}: test acc "
                f"{100 * result['test_acc']:.2f} %, uplink "
                f"{result['uplink_bytes_per_sample']:.1f} B/sample "
                f"({result['uplink_reduction_vs_fp32']:.2f}x less than FP32)")
        if bar is not None:
            bar.update(1)
        (out / "metrics.json").write_text(json.dumps(
            {"runs": [r for r in results if r is not None]}, indent=2) + "\n")

    if jobs > 1 and base.backend not in ("rtl", "board") and len(configs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(max_workers=jobs,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run, cfg): i for i, cfg in enumerate(configs)}
            for future in as_completed(futures):
                done(futures[future], future.result())
    else:
        for i, cfg in enumerate(configs):
            done(i, run(cfg, progress=progress))
    if bar is not None:
        bar.close()
    summary = summarize(results, headline=headline if headline is not None else base.budget)
    table = comparison_table(summary)
    (out / "table.md").write_text(table + "\n")
    plot = plot_tradeoff(summary, out / "tradeoff.png",
                         title=f"{base.model} split after {base.split_layer}: accuracy against "
                               f"uplink traffic ({len(seeds)} seeds)")
    exp = Experiment(out, results, summary, table, plot)
    (out / "metrics.json").write_text(json.dumps(exp.record(), indent=2) + "\n")
    return exp


def summarize(results: list[dict], headline: float | None = None) -> list[dict]:
    """Per label: accuracy mean/sd over seeds, bytes per sample, ratios to FP32 features, and the
    accuracy loss against FP32 features (same seeds)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    fp32 = {r["seed"]: r["test_acc"] for r in groups.get("fp32", [])}
    rows = []
    for label, rs in groups.items():
        acc = np.array([r["test_acc"] for r in rs])
        loss_pp = [100 * (fp32[r["seed"]] - r["test_acc"]) for r in rs if r["seed"] in fp32]
        up = float(np.mean([r["uplink_bytes_per_sample"] for r in rs]))
        rows.append({
            "label": label, "codec": rs[0]["codec"], "budget": rs[0]["budget"],
            "seeds": [r["seed"] for r in rs], "test_acc_mean": float(acc.mean()),
            "test_acc_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "acc_loss_pp": float(np.mean(loss_pp)) if loss_pp else None,
            "acc_loss_pp_max": float(np.max(loss_pp)) if loss_pp else None,
            "uplink_bytes_per_sample": up,
            "uplink_bits_per_value": float(np.mean([r["uplink_bits_per_value"] for r in rs])),
            "uplink_reduction_vs_fp32": float(np.mean([r["uplink_reduction_vs_fp32"]
                                                       for r in rs])),
            "downlink_bytes_per_sample": float(np.mean([r["downlink_bytes_per_sample"]
                                                        for r in rs])),
            "fp32_bytes_per_sample": rs[0]["fp32_bytes_per_sample"],
            "link_s_per_step": float(np.mean([r["link_s_per_step"] for r in rs])),
            "encoder_cycles_per_step": rs[0]["encoder_cycles_per_step"],
            "golden_rtl_identical": rs[0]["golden_rtl_identical"],
            "headline": rs[0]["codec"] == "sgq" and rs[0]["budget"] == headline,
        })
    by = {r["label"]: r for r in rows}
    for r in rows:  # against the uniform baselines
        for base in ("int8", "u4-tensor"):
            if base in by:
                r[f"uplink_reduction_vs_{base}"] = (by[base]["uplink_bytes_per_sample"]
                                                     / r["uplink_bytes_per_sample"])
    return rows


def _headline(summary: list[dict]) -> dict | None:
    return next((r for r in summary if r["headline"]), None)


def comparison_table(summary: list[dict]) -> str:
    """Markdown: one row per codec (mean ± sd over seeds)."""
    lines = ["| uplink codec | test acc (mean ± sd) | loss vs FP32 (pp) | uplink B/sample | "
             "bits/value | FP32/this | downlink B/sample | link s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        loss = "—" if r["acc_loss_pp"] is None else f"{r['acc_loss_pp']:+.2f}"
        mark = "**" if r["headline"] else ""
        lines.append(
            f"| {mark}{r['label']}{mark} | {100 * r['test_acc_mean']:.2f} ± "
            f"{100 * r['test_acc_sd']:.2f} % | {loss} | {r['uplink_bytes_per_sample']:.1f} | "
            f"{r['uplink_bits_per_value']:.2f} | {r['uplink_reduction_vs_fp32']:.2f}x | "
            f"{r['downlink_bytes_per_sample']:.1f} | {r['link_s_per_step']:.3f} |")
    return "\n".join(lines)


def plot_tradeoff(summary: list[dict], path: str | Path, title: str = "") -> Path:
    """Test accuracy against uplink bytes per sample, one point per codec (mean, sd bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    sgq_rows = sorted((r for r in summary if r["codec"] == "sgq"),
                      key=lambda r: r["uplink_bytes_per_sample"])
    if sgq_rows:
        ax.errorbar([r["uplink_bytes_per_sample"] for r in sgq_rows],
                    [100 * r["test_acc_mean"] for r in sgq_rows],
                    yerr=[100 * r["test_acc_sd"] for r in sgq_rows], marker="o", color="C3",
                    label="SGQ (on the accelerator)", capsize=3)
        for r in sgq_rows:
            ax.annotate(r["label"], (r["uplink_bytes_per_sample"], 100 * r["test_acc_mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    for i, r in enumerate(x for x in summary if x["codec"] != "sgq"):
        ax.errorbar([r["uplink_bytes_per_sample"]], [100 * r["test_acc_mean"]],
                    yerr=[100 * r["test_acc_sd"]], marker="s", linestyle="none",
                    color=f"C{i % 3}" if i < 3 else f"C{i + 1}", label=r["label"], capsize=3)
    fp32 = next((r for r in summary if r["codec"] == "fp32"), None)
    ref = summary[0]["fp32_bytes_per_sample"] if summary else None
    if ref:
        for ratio, style, text in ((PAPER_REDUCTION, ":", "paper's best"), (TARGET_REDUCTION,
                                                                            "--", "target")):
            ax.axvline(ref / ratio, color="grey", linestyle=style, linewidth=1)
            ax.annotate(f"{text} {ratio:g}x", (ref / ratio, 0.02), xycoords=("data", "axes "
                        "fraction"), rotation=90, fontsize=7, color="grey", xytext=(-9, 0),
                        textcoords="offset points")
    if fp32 is not None:
        ax.axhspan(100 * fp32["test_acc_mean"] - 1, 100 * fp32["test_acc_mean"], color="grey",
                   alpha=0.08, label="within 1 pp of FP32 features")
    ax.set_xscale("log")
    ax.set(xlabel="uplink bytes per sample (log)", ylabel="test accuracy (%)",
           title=title or "collaborative learning: accuracy against uplink traffic")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
