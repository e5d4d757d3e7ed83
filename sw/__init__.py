"""The driver side: quantizer, compiler, runtime and INT8 training. One concern per module:

=================  ===============================================================================
module             holds
=================  ===============================================================================
``runtime``        :class:`~tinyaccel.sw.runtime.Device`: one host interface over the golden,
                   RTL and board backends
``gemm``           the lowering of one GEMM: tiling, buffer slots, schedule, cycle estimate
``gemm_run``       :func:`~tinyaccel.sw.gemm_run.run_gemms`: a list of GEMMs on a device (or the
                   host), results and counters back — the one run path
``im2col``         convolution as GEMM rows (``im2col``) and its exact adjoint (``col2im_int``)
``quant_ir``       the quantized model's records (``QuantModel``, ``QuantLayer``, ...)
``fx_frontend``    torch.fx trace of a float model to float ops (BatchNorm folded, ReLU fused)
``quant``          post-training quantization: calibration, weights, biases, fixed-point scales
``lowering``       the one layer-to-GEMM mapping (and the host layers)
``reference``      the host INT8 reference executor (and the FP32 one), through ``lowering``
``compiler``       :class:`~tinyaccel.sw.compiler.CompiledModel`: a quantized model on a device,
                   layer by layer; :func:`~tinyaccel.sw.compiler.bind` chooses the placement
``resident_plan``  :func:`~tinyaccel.sw.resident_plan.plan_resident`: arena, weight residency and
                   the instructions of each layer for the resident path
``resident``       :class:`~tinyaccel.sw.resident.ResidentModel`: the whole model as one program
                   per inference, activations in OUT, weights loaded once (``docs/resident.md``)
``octo_numerics``  Octo training's options, rounding and range clipping
``octo_autograd``  Octo's autograd Functions and the training GEMM executor
``octo``           :func:`~tinyaccel.sw.octo.convert` and the INT8 training modules
                   (the method and its measured figures: ``docs/octo.md``)
``train``          training runs: checkpoints, resume, comparisons
=================  ===============================================================================
"""
