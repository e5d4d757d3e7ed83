"""tinyaccel: an open hardware/software co-design kit for on-device learning.

Subpackages map to the top-level folders of the repository:
``tinyaccel.hw`` (Amaranth accelerator), ``tinyaccel.sim`` (golden model, testbenches),
``tinyaccel.sw`` (quantizer, compiler, runtime), ``tinyaccel.models``, ``tinyaccel.boards``.
"""

__version__ = "0.1.0"


def compile(model, example_input, backend: str = "golden", config: str = "sim",
            batch_size: int = 64, **backend_options):
    """Quantize ``model`` (calibrated on ``example_input``) and bind it to an accelerator.

    Returns a :class:`~tinyaccel.sw.compiler.CompiledModel`: call it with a float batch
    (N x C x H x W) to get float logits computed with every GEMM on ``backend``
    (``"golden"``, ``"rtl"`` or ``"board"`` with ``port=...``), configuration ``config``.

    Raises
    ------
    tinyaccel.errors.UnsupportedLayerError
        A layer the accelerator cannot run, named with its module path, type and why.
    """
    from .sw.compiler import CompiledModel
    from .sw.quant import quantize
    from .sw.runtime import Device
    qmodel = quantize(model, example_input)
    return CompiledModel(qmodel, Device(backend, config, **backend_options), batch_size)
