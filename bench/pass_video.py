"""PASS on video: the perception model on a static-camera clip, dense against patch skipping.

``run()`` (``tinyaccel video`` and ``tinyaccel bench pass-video``) streams a clip through the
zoo's ``pass-segnet`` (digit segmentation at 1/4 resolution, :mod:`tinyaccel.models.pass_net`) on
a device, one program per frame (:class:`~tinyaccel.sw.pass_stream.PassStream`), and reports:

* ``speedup_cycles``: dense cycles / PASS cycles per frame, mean over the frames after the first
  (every cost counted: PATCH, DILATE, LOADs, gated IM2COL/GEMM/REQUANT, the STORE); the dense
  cycles are measured on the device on the first frame (the dense program's cycles do not depend
  on the data). Only backends that keep time (RTL, board) have cycles; the golden model reports
  ``speedup_macs`` (dense MACs / issued MACs) instead, counted exactly;
* ``ideal_speedup``: dense cycles / the cycles of only the patches whose receptive field really
  changed (the noiseless frames differ somewhere in it: the clip's ground truth, dilated layer by
  layer as DILATE does), each layer's dense cycles apportioned by its GEMM work; and
  ``speedup_over_ideal`` = ``speedup_cycles / ideal_speedup`` (1 - the overhead of skipping);
* ``task_metric_dense`` / ``task_metric_pass``: foreground IoU of the predicted digit mask
  (:func:`tinyaccel.models.video.iou`) over the clip, dense INT8 and with PASS;
* ``threshold0_identical``: a threshold-0 stream equals dense compute on every frame;
* ``golden_rtl_identical`` (RTL backend): the RTL stream equals the golden model's frame by frame;
* ``host_bytes_dense`` / ``host_bytes_pass``: link bytes per frame (instructions, frame, result;
  the learned gate's mask too);
* ``changed_pixel_fraction``: the scene's fraction of pixels whose noiseless value changes per
  frame; ``coverage``: the fraction the digits cover;
* the same for the learned host gate (:mod:`tinyaccel.models.pass_gate`) with the suffix
  ``_learned``.

With ``sweep`` it runs the thresholds of :data:`SWEEP` (on the golden model unless the backend is
given) for the trade-off curve. ``out_dir`` gets ``tradeoff.png`` (speedup and IoU against the
threshold), ``frames.png`` (per-frame speedup and recomputed fraction) and ``pass.gif`` (frame,
skip mask, prediction side by side).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ShapeError

__all__ = ["run", "DEFAULT_THRESHOLD", "SWEEP", "ANCHORS"]

#: The threshold the README reports (INT8 codes of the input; the frame's scale makes one code
#: about one grey level): above the sensor noise's per-patch maximum, below the digits' contrast.
DEFAULT_THRESHOLD = 24
#: The trade-off curve's thresholds.
SWEEP = (0, 4, 8, 12, 16, 20, 24, 32, 48, 64)
#: Published speedups of change-based skipping on static-camera video, for the table.
ANCHORS = {
    "PASS (MobileHumanPose, Jetson Nano)": 9.43,
    "PASS (FairMOT, Jetson Nano)": 12.19,
    "CBinfer (static camera)": 8.6,
    "DeltaCNN": 7.0,
}
MODEL = "pass-segnet"
#: The default scene per configuration: the video module's default (96 x 64, two 20-pixel
#: digits) where the stream's state fits OUT, else this smaller one with the same >= 3 %
#: coverage (two 13-pixel digits in 64 x 48): the ecp5 preset's OUT holds 64 KB.
SMALL_SCENE = dict(width=64, height=48, digit_px=13)


def _prediction(qmodel, codes_out: np.ndarray) -> np.ndarray:
    """int8 logits ``(2, h, w)`` -> bool digit mask."""
    logits = qmodel.output_q.dequantize(codes_out)
    return logits[1] > logits[0]


def _true_change(clean: np.ndarray) -> np.ndarray:
    """bool ``(T, H, W)``: pixels whose noiseless value changed since the previous frame."""
    change = np.zeros(clean.shape, bool)
    change[1:] = np.abs(np.diff(clean, axis=0)) > 0.5 / 255
    return change


def _layer_shares(plan) -> np.ndarray:
    """Each layer's share of the dense work (GEMM words x blocks)."""
    work = np.array([sum(p.k for parts in sl.blocks for p in parts) * sl.grid[0] * sl.grid[1]
                     for sl in plan.layers], float)
    return work / work.sum()


def _ideal_fractions(plan, change: np.ndarray) -> np.ndarray:
    """``(T, layers)``: the fraction of each layer's output patches whose receptive field (in
    frame pixels, exact: :attr:`Footprint`) holds a truly changed pixel."""
    ph, pw = plan.config.patch_shape
    t_len, h, w = change.shape
    # prefix sums: any change in a rectangle in O(1)
    c = np.zeros((t_len, h + 1, w + 1), np.int64)
    c[:, 1:, 1:] = change.cumsum(axis=1).cumsum(axis=2)
    out = np.zeros((t_len, len(plan.layers)))
    for i, sl in enumerate(plan.layers):
        fy, fx = sl.footprint
        gh, gw = sl.grid

        def span(f, p, n, size):  # frame pixel range [lo, hi) of patch b, clipped
            b = np.arange(n)
            lo = b * p * f.stride - f.pad
            hi = (b * p + p - 1) * f.stride - f.pad + f.extent + 1
            return np.clip(lo, 0, size), np.clip(hi, 0, size)

        y0, y1 = span(fy, ph, gh, h)
        x0, x1 = span(fx, pw, gw, w)
        total = (c[:, y1][:, :, x1] - c[:, y0][:, :, x1] - c[:, y1][:, :, x0]
                 + c[:, y0][:, :, x0])
        out[:, i] = (total > 0).mean(axis=(1, 2))
    return out


def _stream(qmodel, device, codes, threshold, gate=None, progress=None, desc=""):
    """Stream ``codes`` (first frame dense) -> (outputs, history, wall seconds)."""
    from ..sw.pass_stream import PassStream
    stream = PassStream(qmodel, device, threshold, gate="host" if gate else "threshold",
                        host_gate=gate)
    frames = range(len(codes))
    if progress:
        frames = progress(frames, desc=desc, unit="frame", leave=False)
    start = time.perf_counter()
    outs = [stream.step_int(codes[t], dense=(t == 0)) for t in frames]
    return np.stack(outs), stream.history, time.perf_counter() - start


def _figures(hist, dense_cycles, dense_macs, suffix=""):
    after = hist[1:]
    m = {}
    cycles = np.array([h.cycles for h in after], float)
    if dense_cycles:
        m[f"speedup_cycles{suffix}"] = round(float(dense_cycles / cycles.mean()), 3)
        m[f"pass_cycles_mean{suffix}"] = round(float(cycles.mean()), 1)
    macs = np.array([h.macs_issued for h in after], float)
    m[f"speedup_macs{suffix}"] = round(float(dense_macs / max(macs.mean(), 1)), 3)
    m[f"host_bytes_pass{suffix}"] = round(float(np.mean([h.link_bytes for h in after])), 1)
    m[f"recomputed_fraction{suffix}"] = round(float(np.mean([h.computed_fraction
                                                             for h in after])), 4)
    return m


def run(progress=None, config: str = "ecp5", backend: str = "golden",
        threshold: int | None = None, sweep: bool = False, gate: str = "threshold",
        frames: int | None = None, input_path: str | None = None, seed: int = 0,
        out_dir: str | None = None, learned: bool = True) -> dict:
    """Run the PASS video experiment (see the module docstring) -> flat metrics.

    Raises
    ------
    ConfigError
        An unknown gate; ShapeError: a clip too short for a steady state (< 3 frames).
    """
    import torch

    from ..hw.config import get_config
    from ..models import video, zoo
    from ..sw.pass_stream import plan_stream
    from ..sw.quant import quantize
    from ..sw.reference import run_quantized
    from ..sw.runtime import Device

    if gate not in ("threshold", "learned"):
        raise ConfigError(f"gate={gate!r}: use 'threshold' (the PATCH comparator) or 'learned'")
    cfg = get_config(config)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    start = time.perf_counter()
    # -- the clip
    if input_path is None:
        size = {} if _fits(cfg, video.make_clip(frames=1).frames.shape[1:]) else SMALL_SCENE
        clip = video.make_clip(seed=seed, **size, **({"frames": frames} if frames else {}))
        x, gt, clean = clip.frames, clip.masks, clip.clean
        scene = {"scene": f"default (seed {seed})", "coverage": round(float(clip.coverage()), 4),
                 "changed_pixel_fraction": round(float(clip.changed_fraction()), 4)}
    else:
        load = ((lambda size: video.sample_gif(size=size)[:frames]) if input_path == "gif" else
                (lambda size: video.load_video(input_path, size=size, frames=frames)))
        x = load(None if input_path != "gif" else (112, 64))
        scene = {"scene": str(input_path)}
        size = _fit_size(cfg, *x.shape[1:])
        if size != x.shape[1:]:  # the stream's state must fit OUT: scale the video down
            x = load(size)
            scene["resized_to"] = f"{size[1]}x{size[0]}"
        gt = clean = None
    if len(x) < 3:
        raise ShapeError(f"the clip has {len(x)} frames: PASS needs at least 3 (one dense, then "
                         f"a steady state)")
    t_len, h, w = x.shape
    # -- the model, quantized at the clip's size on training frames
    model, _ = zoo.load_or_train(MODEL)
    calib = video.training_frames(16, h, w)
    qmodel = quantize(model, torch.from_numpy(calib[:, None]))
    plan = plan_stream(qmodel, cfg)
    codes = qmodel.input_q.quantize(x[:, None].astype(np.float32))
    dense_out = run_quantized(qmodel, x[:, None].astype(np.float32), return_int=True)
    m = {"config": cfg.name, "backend": backend, "frames": t_len, "frame_h": h, "frame_w": w,
         "threshold": threshold, "gate": gate, **scene,
         "patch_shape": f"{cfg.patch_shape[0]}x{cfg.patch_shape[1]}"}
    # -- the gates
    learned_gate = None
    if gate == "learned" or learned:
        learned_gate = _train_learned_gate(video, qmodel, plan, h, w)
        m["learned_gate_train_recall"] = round(learned_gate.train_recall, 4)
    main_gate = learned_gate if gate == "learned" else None
    # -- the stream on the backend
    dev = Device(backend, cfg)
    out, hist, wall = _stream(qmodel, dev, codes, threshold, main_gate, progress,
                              f"PASS {backend} {cfg.name}")
    dense_cycles, dense_macs = hist[0].cycles, hist[0].macs_issued
    m.update(dense_cycles=dense_cycles or None, dense_macs=dense_macs,
             host_bytes_dense=hist[0].link_bytes, wall_s_stream=round(wall, 2))
    m.update(_figures(hist, dense_cycles, dense_macs))
    m["output_equals_dense_frames"] = int(sum(np.array_equal(a, b)
                                              for a, b in zip(out, dense_out, strict=True)))
    # host bytes of the dense program after the first frame: the same frame LOAD and STORE
    m["changed_tiles_mean"] = round(float(np.mean([h_.changed_tiles for h_ in hist[1:]])), 2)
    # -- the ideal: only patches whose receptive field really changed
    if clean is not None:
        frac = _ideal_fractions(plan, _true_change(clean))[1:]
        shares = _layer_shares(plan)
        ideal = 1 / np.mean(frac @ shares)
        m["ideal_speedup"] = round(float(ideal), 3)
        key = "speedup_cycles" if dense_cycles else "speedup_macs"
        m["speedup_over_ideal"] = round(m[key] / ideal, 3)
        m["ideal_recomputed_fraction"] = round(float(np.mean(frac @ shares)), 4)
    # -- the task
    if gt is not None:
        truth = video.downsample_mask(gt)
        m["task_metric"] = f"foreground IoU (digits, 1/{video.FACTOR} resolution)"
        m["task_metric_dense"] = round(float(video.iou(np.stack(
            [_prediction(qmodel, o) for o in dense_out]), truth)), 4)
        m["task_metric_pass"] = round(float(video.iou(np.stack(
            [_prediction(qmodel, o) for o in out]), truth)), 4)
    # -- threshold 0 is dense
    if threshold == 0:
        m["threshold0_identical"] = m["output_equals_dense_frames"] == t_len
    else:
        out0, _, _ = _stream(qmodel, Device(backend, cfg), codes, 0, None, progress,
                             f"threshold 0 {backend}")
        m["threshold0_identical"] = bool(all(np.array_equal(a, b)
                                             for a, b in zip(out0, dense_out, strict=True)))
    # -- the golden model, frame by frame
    if backend != "golden":
        gold, _, _ = _stream(qmodel, Device("golden", cfg), codes, threshold, main_gate,
                             progress, "PASS golden")
        m["golden_rtl_identical"] = bool(np.array_equal(gold, out))
    # -- the other gate on the same clip
    if learned and gate == "threshold" and learned_gate is not None:
        out_l, hist_l, _ = _stream(qmodel, Device(backend, cfg), codes, threshold, learned_gate,
                                   progress, "learned gate")
        m.update(_figures(hist_l, dense_cycles, dense_macs, "_learned"))
        if gt is not None:
            m["task_metric_pass_learned"] = round(float(video.iou(np.stack(
                [_prediction(qmodel, o) for o in out_l]), truth)), 4)
    # -- the trade-off curve
    curve = None
    if sweep:
        curve = []
        sweep_backend = backend
        for thr in (progress(SWEEP, desc="sweep", unit="threshold") if progress else SWEEP):
            o, hh, _ = _stream(qmodel, Device(sweep_backend, cfg), codes, thr)
            point = {"threshold": thr, **_figures(hh, hh[0].cycles, hh[0].macs_issued)}
            if gt is not None:
                point["iou"] = round(float(video.iou(np.stack(
                    [_prediction(qmodel, oo) for oo in o]), truth)), 4)
            curve.append(point)
        m["sweep"] = curve
    m["per_frame"] = {"cycles": [h_.cycles for h_ in hist], "macs": [h_.macs_issued for h_ in hist],
                      "changed_tiles": [h_.changed_tiles for h_ in hist],
                      "recomputed": [h_.computed for h_ in hist]}
    if out_dir:
        _write_outputs(Path(out_dir), m, x, out, hist, plan, qmodel, gt, curve)
    m["wall_s"] = round(time.perf_counter() - start, 2)
    return m


def _fits(cfg, hw) -> bool:
    """The stream of the model at frame size ``hw`` fits ``cfg`` (OUT: the frame, its reference
    and four 16-channel layer outputs at half resolution, one word per pixel)."""
    import torch

    from ..errors import CapacityError
    from ..models import zoo
    from ..sw.pass_stream import plan_stream
    from ..sw.quant import quantize
    model = zoo.build(MODEL)
    try:
        plan_stream(quantize(model, torch.rand(2, 1, *hw)), cfg)
    except CapacityError:
        return False
    return True


def _fit_size(cfg, h: int, w: int) -> tuple[int, int]:
    """The largest ``(h, w)`` at most the video's, of its aspect, whose stream fits ``cfg``:
    sides multiples of twice the patch (the stride-2 layer's output is whole patches too)."""
    ph, pw = cfg.patch_shape
    for scale in np.linspace(1.0, 0.1, 46):
        size = (max(2 * ph, int(h * scale) // (2 * ph) * 2 * ph),
                max(2 * pw, int(w * scale) // (2 * pw) * 2 * pw))
        if _fits(cfg, size):
            return size if scale < 1 or size != (h, w) else (h, w)
    return (2 * ph, 2 * pw)


def _train_learned_gate(video, qmodel, plan, h, w):
    """The learned gate on training clips of the scene's size (seeds apart from the test's)."""
    from ..models import pass_gate
    pairs = []
    for s in pass_gate.TRAIN_SEEDS:
        clip = video.make_clip(seed=s, frames=12, width=w, height=h)
        codes = qmodel.input_q.quantize(clip.frames[:, None].astype(np.float32))
        visible = np.abs(np.diff(clip.clean, axis=0)) > pass_gate.VISIBLE / 255
        pairs += [(codes[t], codes[t - 1], visible[t - 1]) for t in range(1, len(codes))]
    return pass_gate.train_gate(pairs, plan.config.patch_shape)


def _write_outputs(out_dir: Path, m: dict, x, out, hist, plan, qmodel, gt, curve) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    if curve:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        thr = [p["threshold"] for p in curve]
        key = "speedup_cycles" if "speedup_cycles" in curve[0] else "speedup_macs"
        ax.plot(thr, [p[key] for p in curve], "o-", color="tab:blue")
        ax.set_xlabel("PATCH threshold (INT8 codes of the input)")
        ax.set_ylabel(key.replace("_", " "), color="tab:blue")
        for name, value in ANCHORS.items():
            ax.axhline(value, color="0.8", lw=0.8)
            ax.text(thr[-1], value, f" {name}", fontsize=6, va="center", ha="right", color="0.5")
        if "iou" in curve[0]:
            ax2 = ax.twinx()
            ax2.plot(thr, [p["iou"] for p in curve], "s--", color="tab:red")
            ax2.set_ylabel("foreground IoU", color="tab:red")
        ax.set_title(f"PASS trade-off on {m['config']} ({m['backend']})")
        fig.tight_layout()
        fig.savefig(out_dir / "tradeoff.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    if hist[0].cycles:
        ax.plot([hist[0].cycles / h.cycles for h in hist[1:]], label="speedup (cycles)")
    ax.plot([hist[0].macs_issued / max(h.macs_issued, 1) for h in hist[1:]],
            label="speedup (MACs)")
    ax.set_xlabel("frame")
    ax.set_ylabel("dense / PASS")
    ax2 = ax.twinx()
    ax2.plot([h.computed_fraction for h in hist[1:]], color="0.6", lw=0.8)
    ax2.set_ylabel("patches recomputed", color="0.5")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "frames.png", dpi=120)
    plt.close(fig)
    # the animation: frame | the patches recomputed (frame patches that moved, red; first
    # layer's output patches recomputed, outlined) | the prediction
    ph, pw = plan.config.patch_shape
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.7))

    def draw(t):
        for ax in axes:
            ax.clear()
            ax.axis("off")
        axes[0].imshow(x[t], cmap="gray", vmin=0, vmax=1)
        axes[0].set_title(f"frame {t}", fontsize=8)
        axes[1].imshow(x[t], cmap="gray", vmin=0, vmax=1)
        st = hist[t]
        if st.tile_mask is not None:
            up = np.kron(st.tile_mask, np.ones((ph, pw)))
            axes[1].imshow(np.ma.masked_where(up == 0, up), cmap="autumn", alpha=0.5,
                           vmin=0, vmax=1)
            axes[1].set_title(f"moved: {int(st.tile_mask.sum())}/{st.tile_mask.size} patches; "
                              f"{100 * st.computed_fraction:.0f}% of work", fontsize=8)
        else:
            axes[1].set_title("dense (first frame)", fontsize=8)
        axes[2].imshow(_prediction(qmodel, out[t]), cmap="magma")
        axes[2].set_title("prediction (digit mask, 1/2 res)", fontsize=8)
        return []

    anim = FuncAnimation(fig, draw, frames=len(x))
    anim.save(out_dir / "pass.gif", writer=PillowWriter(fps=8))
    plt.close(fig)
