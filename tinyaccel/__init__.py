"""tinyaccel: an open hardware/software co-design kit for on-device learning.

Subpackages map to the top-level folders of the repository:
``tinyaccel.hw`` (Amaranth accelerator), ``tinyaccel.sim`` (golden model, testbenches),
``tinyaccel.sw`` (quantizer, compiler, runtime), ``tinyaccel.models``, ``tinyaccel.boards``.
"""

__version__ = "0.1.0"


def compile(model, example_input, backend: str = "golden", config: str = "sim",
            batch_size: int = 64, placement: str = "per-layer", **backend_options):
    """Quantize ``model`` (calibrated on ``example_input``) and bind it to an accelerator.

    Returns a :class:`~tinyaccel.sw.compiler.CompiledModel`: call it with a float batch
    (N x C x H x W) to get float logits computed with every GEMM on ``backend``
    (``"golden"``, ``"rtl"`` or ``"board"`` with ``port=...``), configuration ``config``.
    ``placement``: ``"per-layer"`` (the default: every layer round-trips through the host),
    ``"resident"`` (:class:`~tinyaccel.sw.resident.ResidentModel`: one program per inference,
    the activations in OUT, the weights loaded once) or ``"auto"`` (resident when the planner
    accepts the model, else per-layer, the reason in ``placement_reason``); the logits are the
    same integers either way (``docs/resident.md``).

    Raises
    ------
    tinyaccel.errors.UnsupportedLayerError
        A layer the accelerator cannot run (or, with ``placement="resident"``, cannot run
        resident), named with its module path, type and why.
    tinyaccel.errors.CapacityError
        ``placement="resident"`` for a model that does not fit the buffers.
    """
    from .sw.compiler import bind
    from .sw.quant import quantize
    from .sw.runtime import Device
    qmodel = quantize(model, example_input)
    return bind(qmodel, Device(backend, config, **backend_options), batch_size, placement)
