"""The native backend: C++ kernels (csrc/) for the ``native_logps_fwd`` / ``native_logps_bwd`` ops.

``fastdpo.native.register`` loads the compiled extension ``fastdpo.native._C``, whose import
registers the CPU kernels (AVX2 with a portable scalar fallback) and, when built with CUDA, the CUDA
kernels for the schemas in :mod:`fastdpo.ops`. The kernels take fp32/bf16/fp16 logits (no fp64)
and compute and return fp32. Build it against the installed torch with
``pip install --no-build-isolation -e .``; the nvcc flags of that build are defined once, in
:mod:`fastdpo.native.build_flags`.
"""
