"""Quantized inference of a zoo model on the digits test split, on one backend.

::

    from tinyaccel.sw.evaluate import evaluate
    result = evaluate("digits-cnn", backend="rtl", config="ecp5")
    result.acc_int8, result.cycles, result.golden_identical  # logits checked on RTL/board
    result.as_dict()  # the record ``tinyaccel infer`` writes

The model comes from the zoo (trained once, then cached), is quantized after calibration on
training images, compiled for the device and run over all test images. On any backend other
than ``golden`` the golden model runs the same programs too and every logit is compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .compiler import LayerStats, bind

__all__ = ["Evaluation", "evaluate"]


@dataclass
class Evaluation:
    """Accuracy and cost of one quantized model on one backend (see :func:`evaluate`)."""

    model: str
    backend: str
    config: str
    macs: int  #: MAC units of the configuration's array
    images: int  #: test images run
    acc_fp32: float  #: top-1 accuracy of the float model, as a fraction
    acc_int8: float  #: top-1 accuracy of the logits the accelerator computed
    cycles: int  #: accelerator cycles over all layers (0 on the golden model)
    wall_s: float  #: wall time of the accelerator runs
    layers: list[LayerStats] = field(default_factory=list)  #: per layer, in program order
    #: RTL/board logits equal the golden model's on every image; None on the golden backend
    golden_identical: bool | None = None
    placement: str = "per-layer"  #: where the model ran (``resident``: one program per image)
    placement_reason: str | None = None  #: why ``auto`` fell back to per-layer
    #: host-link bytes (both directions) per test image, the resident setup program excluded
    link_bytes_per_image: float = 0.0
    setup_link_bytes: int = 0  #: the resident setup program's bytes (weights loaded once)

    def as_dict(self) -> dict:
        """The flat JSON record: figures rounded to 4 digits, ``util_<layer>`` (None without
        cycles), ``golden_rtl_identical`` only when a comparison ran."""
        record = {"model": self.model, "backend": self.backend, "config": self.config,
                  "images": self.images, "acc_fp32": round(self.acc_fp32, 4),
                  "acc_int8": round(self.acc_int8, 4), "cycles": self.cycles,
                  "wall_s": round(self.wall_s, 3), "placement": self.placement,
                  "link_bytes_per_image": round(self.link_bytes_per_image, 1),
                  "setup_link_bytes": self.setup_link_bytes}
        if self.placement_reason:
            record["placement_reason"] = self.placement_reason
        if self.golden_identical is not None:
            record["golden_rtl_identical"] = self.golden_identical
        for st in self.layers:
            record[f"util_{st.name}"] = round(st.utilization, 4) if st.cycles else None
        return record


def evaluate(model: str = "digits-cnn", backend: str = "golden", config: str = "sim", *,
             port: str | None = None, baud: int | None = None, batch_size: int = 120,
             progress=None, placement: str = "per-layer") -> Evaluation:
    """Quantize zoo model ``model`` and run the digits test split on ``backend``.

    Parameters
    ----------
    model:
        A name in :data:`tinyaccel.models.zoo.MODELS` (weights trained once and cached).
    backend, config:
        A name in :data:`tinyaccel.sw.runtime.BACKENDS` and a preset of
        :data:`tinyaccel.hw.config.PRESETS`.
    port, baud:
        Serial port of the ``board`` backend and its rate (default: ``TINYACCEL_PORT`` and
        ``TINYACCEL_BAUD``, else the board's link, :data:`tinyaccel.boards.link.LINKS`).
    batch_size:
        Images per accelerator program.
    progress:
        A tqdm-like wrapper for the batches (optional).
    placement:
        ``per-layer``, ``resident`` or ``auto`` (:func:`tinyaccel.sw.compiler.bind`).

    Raises
    ------
    tinyaccel.errors.TinyAccelError
        An unknown model, backend or preset; a backend whose tool is missing.
    """
    from ..models import zoo
    from ..models.data import accuracy, calibration_batch, load_digits_split
    from .quant import quantize
    from .runtime import Device

    spec = zoo.get(model)
    if spec.weights != "digits":
        from ..errors import ConfigError
        raise ConfigError(f"model {model!r} has seeded random weights and takes input "
                          f"{spec.input_shape}; infer runs the digits test split. Compile it "
                          f"with tinyaccel.compile on inputs of that shape instead")
    split = load_digits_split()
    net, _ = zoo.load_or_train(model)
    acc_fp32 = accuracy(net, split.x_test, split.y_test)
    qmodel = quantize(net, calibration_batch())
    options = {"port": port, "baud": baud} if backend == "board" else {}
    from .runtime import LinkCounter
    with Device(backend, config, **options) as device:
        link = device.backend = LinkCounter(device.backend)
        compiled = bind(qmodel, device, batch_size, placement)
        logits = compiled(split.x_test, progress=progress)
    setup = getattr(compiled, "res_stats", None)
    setup_bytes = setup.setup_link_bytes if setup else 0
    acc_int8 = float((logits.argmax(1) == split.y_test).float().mean())
    identical = None
    if backend != "golden":
        with Device("golden", config) as golden:
            reference = bind(qmodel, golden, batch_size, compiled.placement)(split.x_test)
        identical = bool(np.array_equal(logits.numpy(), reference.numpy()))
    return Evaluation(model=model, backend=backend, config=config, macs=device.config.macs,
                      images=len(split.y_test), acc_fp32=float(acc_fp32), acc_int8=acc_int8,
                      cycles=compiled.cycles, wall_s=compiled.wall_s,
                      layers=list(compiled.stats.values()), golden_identical=identical,
                      placement=compiled.placement, placement_reason=compiled.placement_reason,
                      link_bytes_per_image=(link.link_bytes - setup_bytes) / len(split.y_test),
                      setup_link_bytes=setup_bytes)
