"""Co-simulated training runs: FP32, naive INT8 and Octo INT8 on the accelerator, compared.

::

    from tinyaccel.sw.train import TrainConfig, train, compare
    result = train(TrainConfig(method="octo", backend="golden", epochs=5), "runs/octo")
    results = compare(TrainConfig(epochs=5), "runs/cmp")   # fp32, int8-naive, octo + ablations

A run is replayable bit for bit: the model is built from ``seed``, batches are drawn from a
generator seeded by ``(seed, epoch)``, stochastic rounding from per-layer generators
(:func:`tinyaccel.sw.octo.convert`), every GEMM is exact on every backend, and the torch host math
runs single-threaded. So the same run on the golden model and on the RTL gives the same weights.

A run folder ``<run_dir>/<label>/`` holds ``metrics.json`` (per-epoch test accuracy, train loss,
wall time, accelerator cycles; rewritten after every epoch) and ``checkpoint.pt`` (model,
optimizer, scheduler, stochastic-rounding generator states, history; written atomically after
every epoch). ``resume=True`` continues from that checkpoint and ends with the same weights as an
uninterrupted run. :func:`compare` adds ``training.png`` (loss and accuracy per epoch) and
``table.md``.

Saved-activation memory is measured on the first step of a run with
:class:`~tinyaccel.sw.octo.SavedTensorMeter` around the model's forward pass: the bytes of every
tensor autograd saved for backward (parameters excluded, each storage once).

A NaN or infinity in the loss, in a layer's input or incoming gradient, or in any parameter's
gradient stops the run with :class:`~tinyaccel.errors.TrainingDivergedError` naming the step,
the layer and the tensor; the last checkpoint stays in place for a resume.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ResumeError, ShapeError, TrainingDivergedError
from ..models import zoo
from ..models.data import load_digits_split, single_thread
from .octo import (
    LossAwareCompensation,
    SavedTensorMeter,
    convert,
    executor_of,
    lac_penalty,
    load_octo_state,
    octo_state,
)
from .octo_numerics import options_for

__all__ = ["TrainConfig", "ResumeError", "train", "compare", "experiment", "Experiment",
           "comparison_table", "plot_runs", "summarize_seeds", "COMPARE_RUNS", "CHECKPOINT",
           "METRICS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"

#: The runs of :func:`compare`: (label, method, overrides). LAC-only is Octo without PRC,
#: PRC-only is Octo without LAC.
COMPARE_RUNS: list[tuple[str, str, dict]] = [
    ("fp32", "fp32", {}),
    ("int8-naive", "int8-naive", {}),
    ("octo", "octo", {}),
    ("octo-lac-only", "octo", {"prc": False}),
    ("octo-prc-only", "octo", {"lac": False}),
]



@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and so its checkpoint's compatibility)."""

    model: str = "digits-cnn"
    method: str = "octo"  #: fp32 | int8-naive | octo
    backend: str = "golden"  #: golden | rtl | board | host (host: exact GEMMs in NumPy)
    config: str = "sim"  #: accelerator configuration preset
    epochs: int = 5
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-4
    lac: bool | None = None  #: None: the method's default
    prc: bool | None = None
    prc_method: str | None = None
    lac_mode: str | None = None
    lac_lambda: float | None = None
    max_steps: int | None = None  #: cap on steps per epoch (short test runs)
    label: str | None = None  #: run name (default: the method, plus ablation suffixes)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        suffix = "".join(f"-no-{k}" for k in ("lac", "prc") if getattr(self, k) is False)
        return self.method + suffix

    def options(self):
        return options_for(self.method, lac=self.lac, prc=self.prc, prc_method=self.prc_method,
                           lac_mode=self.lac_mode, lac_lambda=self.lac_lambda)

    def recipe(self) -> dict:
        """The fields a resumed run must share with its checkpoint (not backend, not label)."""
        d = asdict(self)
        for key in ("backend", "config", "label"):
            d.pop(key)
        return d


@dataclass
class _Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    history: list = field(default_factory=list)
    activation: dict = field(default_factory=dict)


def _open_device(cfg: TrainConfig):
    """The run's Device, started (an RTL build and simulator start are not epoch time)."""
    if cfg.method == "fp32" or cfg.backend == "host":
        return None
    from ..protocol import Program
    from .runtime import Device
    device = Device(cfg.backend, cfg.config)
    try:
        device.run(Program(device.config))  # a lone SYNC: builds/starts the backend
    except BaseException:
        device.close()
        raise
    return device


def _build(cfg: TrainConfig, device, example: torch.Tensor) -> _Run:
    options = cfg.options()  # validates method and overrides
    if cfg.method == "fp32" and any(v is not None for v in (cfg.lac, cfg.prc, cfg.prc_method,
                                                            cfg.lac_mode, cfg.lac_lambda)):
        raise ShapeError("method 'fp32' takes no INT8 options (--no-lac, --no-prc, ...)")
    model = zoo.build(cfg.model, cfg.seed)
    if options is not None:
        convert(model, cfg.method, device, lac=cfg.lac, prc=cfg.prc, prc_method=cfg.prc_method,
                lac_mode=cfg.lac_mode, lac_lambda=cfg.lac_lambda, example_input=example,
                seed=cfg.seed)
    lac_ids = {id(p) for m in model.modules() if isinstance(m, LossAwareCompensation)
               for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in lac_ids]}]
    if lac_ids:  # LAC has its own L2 penalty: no weight decay on top
        groups.append({"params": [p for p in model.parameters() if id(p) in lac_ids],
                       "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * _steps_per_epoch(cfg, len(load_digits_split().x_train))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return _Run(model, optimizer, scheduler)


def _steps_per_epoch(cfg: TrainConfig, n: int) -> int:
    steps = math.ceil(n / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _epoch_order(cfg: TrainConfig, epoch: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def _check_grads(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            layer, _, tensor = name.rpartition(".")
            raise TrainingDivergedError("after backward", layer=layer or name,
                                        tensor=f"{tensor}.grad")


def _save_checkpoint(path: Path, cfg: TrainConfig, run: _Run, epoch: int) -> None:
    state = {"format": 1, "recipe": cfg.recipe(), "epoch": epoch,
             "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "octo": octo_state(run.model),
             "history": json.dumps(run.history), "activation": json.dumps(run.activation)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, cfg: TrainConfig, run: _Run) -> int:
    if not path.exists():
        raise ResumeError(f"no checkpoint to resume at {path}")
    state = torch.load(path, weights_only=True)
    if state.get("recipe") != cfg.recipe():
        theirs, ours = state.get("recipe", {}), cfg.recipe()
        diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
        raise ResumeError(f"checkpoint {path} was written by another run: differing settings "
                          f"(checkpoint, this run) {diff}")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["octo"]:
        load_octo_state(run.model, state["octo"])
    run.history = json.loads(state["history"])
    run.activation = json.loads(state["activation"])
    return int(state["epoch"])


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    logits = model(x)
    model.train()
    return float((logits.argmax(1) == y).float().mean())


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          progress: bool | Callable = False, log: Callable[[str], None] | None = None) -> dict:
    """Train ``cfg.model`` with ``cfg.method`` on ``cfg.backend``; returns the run's metrics.

    The metrics (also in ``<run_dir>/<cfg.name>/metrics.json``): ``method``, ``label``,
    ``backend``, ``epochs``, ``seed``, ``test_acc``, ``train_loss`` (last epoch's mean
    cross-entropy), ``wall_s`` (training + evaluation), ``train_wall_s``, ``epoch_wall_s`` (list,
    training only), ``accel_cycles``, ``accel_programs``, ``accel_macs``, ``activation_bytes``
    (saved for backward, one step of ``batch_size`` images), ``activation_bytes_per_sample``,
    ``activation_by_dtype``, ``history`` (per epoch), ``options``, ``device_open_s`` (backend
    start, e.g. an RTL build, not counted in ``wall_s``).

    ``progress``: ``True`` for a tqdm bar on stderr, or a tqdm-like callable; ``log`` receives
    one line per epoch.

    Raises
    ------
    TrainingDivergedError
        NaN/inf in the loss, a layer's tensors or a gradient (names step, layer and tensor).
    ResumeError
        ``resume`` without a compatible checkpoint.
    """
    if cfg.epochs < 1:
        raise ShapeError(f"epochs={cfg.epochs} must be >= 1")
    out = Path(run_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    split = load_digits_split()
    x_train, y_train = split.x_train, split.y_train
    if progress is True:
        from tqdm import tqdm
        progress = tqdm
    t_open = time.perf_counter()
    device = _open_device(cfg)
    open_s = time.perf_counter() - t_open
    try:
        with single_thread():
            run = _build(cfg, device, x_train[:1].clone())
            start_epoch = _load_checkpoint(out / CHECKPOINT, cfg, run) + 1 if resume else 0
            executor = executor_of(run.model)
            steps = _steps_per_epoch(cfg, len(x_train))
            for epoch in range(start_epoch, cfg.epochs):
                record = _train_epoch(cfg, run, epoch, steps, x_train, y_train, progress)
                t0 = time.perf_counter()
                record["test_acc"] = _evaluate(run.model, split.x_test, split.y_test)
                record["eval_wall_s"] = time.perf_counter() - t0
                if executor is not None:
                    totals = executor.totals()
                    record.update(accel_cycles=totals.cycles, accel_programs=totals.programs,
                                  accel_macs=totals.macs)
                    executor.reset_stats()
                run.history.append(record)
                _save_checkpoint(out / CHECKPOINT, cfg, run, epoch)
                _write_json(out / METRICS, _summary(cfg, run))
                if log:
                    log(f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}: train loss "
                        f"{record['train_loss']:.4f}, test acc {100 * record['test_acc']:.2f} %, "
                        f"{record['train_wall_s']:.1f} s train + {record['eval_wall_s']:.1f} s "
                        f"eval, {record.get('accel_cycles', 0)} accelerator cycles")
    finally:
        if device is not None:
            device.close()
    return {**_summary(cfg, run), "device_open_s": round(open_s, 3)}


def _train_epoch(cfg: TrainConfig, run: _Run, epoch: int, steps: int, x_train, y_train,
                 progress) -> dict:
    model, opt, sched = run.model, run.optimizer, run.scheduler
    model.train()
    order = _epoch_order(cfg, epoch, len(x_train))
    batches = range(steps)
    if progress:
        batches = progress(batches, desc=f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}",
                           unit="step", leave=False)
    losses, penalties = [], []
    t0 = time.perf_counter()
    for i in batches:
        step = epoch * steps + i
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        xb, yb = x_train[idx], y_train[idx]
        try:
            opt.zero_grad(set_to_none=True)
            meter = SavedTensorMeter(model) if not run.activation else None
            if meter is not None:
                with meter:
                    logits = model(xb)
                run.activation = {"bytes": meter.bytes, "batch": len(xb),
                                  "by_dtype": meter.by_dtype}
            else:
                logits = model(xb)
            ce = F.cross_entropy(logits, yb)
            penalty = lac_penalty(model)
            loss = ce + penalty
            if not bool(torch.isfinite(loss)):
                raise TrainingDivergedError(f"loss = {loss.item()}", layer="loss", tensor="loss")
            loss.backward()
            _check_grads(model)
        except TrainingDivergedError as exc:
            raise exc.at_step(step) from None
        opt.step()
        sched.step()
        losses.append(float(ce.detach()))
        penalties.append(float(penalty.detach()))
        if progress and hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{losses[-1]:.4f}")
    return {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
            "lac_penalty": float(np.mean(penalties)), "steps": steps,
            "train_wall_s": time.perf_counter() - t0}


def _summary(cfg: TrainConfig, run: _Run) -> dict:
    h = run.history
    last = h[-1] if h else {}
    act = run.activation
    options = cfg.options()
    return {
        "method": cfg.method, "label": cfg.name, "backend": cfg.backend if cfg.method != "fp32"
        else "host", "config": cfg.config, "model": cfg.model, "epochs": len(h), "seed": cfg.seed,
        "test_acc": last.get("test_acc"), "train_loss": last.get("train_loss"),
        "wall_s": round(sum(r["train_wall_s"] + r["eval_wall_s"] for r in h), 3),
        "train_wall_s": round(sum(r["train_wall_s"] for r in h), 3),
        "epoch_wall_s": [round(r["train_wall_s"], 3) for r in h],
        "accel_cycles": sum(r.get("accel_cycles", 0) for r in h),
        "accel_programs": sum(r.get("accel_programs", 0) for r in h),
        "accel_macs": sum(r.get("accel_macs", 0) for r in h),
        "activation_bytes": act.get("bytes"),
        "activation_bytes_per_sample": (act["bytes"] / act["batch"]) if act else None,
        "activation_by_dtype": act.get("by_dtype"),
        "options": asdict(options) if options is not None else None,
        "history": h,
    }


# -- comparisons --------------------------------------------------------------------------------

def compare(base: TrainConfig, run_dir: str | Path, runs: list[tuple[str, str, dict]] | None = None,
            resume: bool = False, progress: bool | Callable = False,
            log: Callable[[str], None] | None = None) -> list[dict]:
    """Train every run of ``runs`` (default :data:`COMPARE_RUNS`) from ``base``'s seed and
    settings; write ``metrics.json`` (all runs), ``training.png`` and ``table.md`` into
    ``run_dir``. Returns the per-run metrics."""
    run_dir = Path(run_dir)
    results = []
    for label, method, overrides in runs or COMPARE_RUNS:
        cfg = replace(base, method=method, label=label, **overrides)
        results.append(train(cfg, run_dir, resume=resume and (run_dir / label / CHECKPOINT)
                             .exists(), progress=progress, log=log))
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / METRICS, {"runs": results})
    plot_runs(results, run_dir / "training.png")
    (run_dir / "table.md").write_text(comparison_table(results) + "\n")
    return results


@dataclass
class Experiment:
    """What :func:`experiment` returns: every run's metrics and where they were written."""

    run_dir: Path
    seeds: list[int]
    results: list[dict]
    table: str  #: :func:`comparison_table` of every run (``table.md``)
    plot: Path  #: ``training.png``

    def first_seed_table(self) -> str:
        """The comparison table of the first seed's runs alone."""
        return comparison_table([r for r in self.results if r["seed"] == self.seeds[0]])

    def record(self) -> dict:
        """The JSON record: the Octo run (else the first) at the top level; with several runs
        also every run and the per-label summary over seeds (:func:`summarize_seeds`)."""
        head = next((r for r in self.results if r["label"] == "octo"), self.results[0])
        out = {k: v for k, v in head.items() if k != "history"}
        if len(self.results) > 1:
            out["runs"] = self.results
            out["summary"] = summarize_seeds(self.results)
        return out


def experiment(base: TrainConfig, run_dir: str | Path, seeds: list[int] | None = None,
               compare_methods: bool = False, resume: bool = False,
               progress: bool | Callable = False,
               log: Callable[[str], None] | None = None) -> Experiment:
    """Train ``base`` (or, with ``compare_methods``, every run of :func:`compare`) once per seed
    of ``seeds`` (default: ``base.seed``), each seed in ``run_dir/seed<S>`` when there are
    several; write ``table.md`` and ``training.png`` over all of them into ``run_dir``."""
    run_dir = Path(run_dir)
    seeds = list(seeds) if seeds else [base.seed]
    results = []
    for seed in seeds:
        cfg = replace(base, seed=seed)
        folder = run_dir / f"seed{seed}" if len(seeds) > 1 else run_dir
        if compare_methods:
            results += compare(cfg, folder, resume=resume, progress=progress, log=log)
        else:
            results.append(train(cfg, folder, resume=resume, progress=progress, log=log))
    run_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(results)
    (run_dir / "table.md").write_text(table + "\n")
    plot = plot_runs(results, run_dir / "training.png")
    return Experiment(run_dir, seeds, results, table, plot)


def summarize_seeds(results: list[dict]) -> list[dict]:
    """Group runs by label: mean and spread (sample sd, min, max) of test accuracy over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in groups.items():
        acc = np.array([r["test_acc"] for r in rs], dtype=np.float64)
        rows.append({"label": label, "seeds": [r["seed"] for r in rs],
                     "test_acc_mean": float(acc.mean()),
                     "test_acc_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "test_acc_min": float(acc.min()), "test_acc_max": float(acc.max()),
                     "train_loss_mean": float(np.mean([r["train_loss"] for r in rs])),
                     "epoch_wall_s_mean": float(np.mean([np.mean(r["epoch_wall_s"])
                                                         for r in rs])),
                     "activation_bytes_per_sample": rs[0]["activation_bytes_per_sample"]})
    return rows


def _ratio(reference: float | None, value: float | None) -> str:
    return f"{reference / value:.2f}x" if reference and value else "—"


def comparison_table(results: list[dict]) -> str:
    """A Markdown table of runs (one row per run, or per label with mean ± sd over seeds)."""
    fp32 = next((r for r in results if r["method"] == "fp32"), None)
    ref_bytes = fp32["activation_bytes_per_sample"] if fp32 else None
    multi = len({r["seed"] for r in results}) > 1
    lines = []
    if multi:
        lines.append("| run | seeds | test acc mean ± sd (min..max) | train loss | s/epoch | "
                     "saved act. B/sample | FP32/this |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in summarize_seeds(results):
            ratio = _ratio(ref_bytes, row["activation_bytes_per_sample"])
            lines.append(
                f"| {row['label']} | {len(row['seeds'])} | {100 * row['test_acc_mean']:.2f} ± "
                f"{100 * row['test_acc_sd']:.2f} % ({100 * row['test_acc_min']:.2f}.."
                f"{100 * row['test_acc_max']:.2f}) | {row['train_loss_mean']:.4f} | "
                f"{row['epoch_wall_s_mean']:.1f} | {row['activation_bytes_per_sample']:.0f} | "
                f"{ratio} |")
        return "\n".join(lines)
    lines.append("| run | backend | epochs | test acc | train loss | s/epoch | accel cycles | "
                 "saved act. B/sample | FP32/this |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        per = r["activation_bytes_per_sample"]
        ratio = _ratio(ref_bytes, per)
        lines.append(
            f"| {r['label']} | {r['backend']} | {r['epochs']} | {100 * r['test_acc']:.2f} % | "
            f"{r['train_loss']:.4f} | {np.mean(r['epoch_wall_s']):.1f} | {r['accel_cycles']} | "
            f"{per:.0f} | {ratio} |")
    return "\n".join(lines)


def plot_runs(results: list[dict], path: str | Path) -> Path:
    """Train loss and test accuracy per epoch, one colour per run label (matplotlib, Agg).

    A label trained with several seeds is drawn as its mean with a min..max band.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, (label, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4,
                                    groups.items(), strict=False):
        n = min(len(r["history"]) for r in runs)
        epochs = np.arange(1, n + 1)
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        for ax, key, scale in ((ax_loss, "train_loss", 1.0), (ax_acc, "test_acc", 100.0)):
            values = scale * np.array([[h[key] for h in r["history"][:n]] for r in runs])
            ax.plot(epochs, values.mean(0), marker="o", color=color, label=label + seeds)
            if len(runs) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.15)
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", title="training loss",
                yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (digits)")
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
