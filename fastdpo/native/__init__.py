"""The native backend: C++ kernels (csrc/) for the ``native_logps_fwd`` / ``native_logps_bwd`` ops.

``fastdpo.native.register`` loads the compiled extension ``fastdpo.native._C``, whose import
registers the CPU kernels (AVX2 with a portable scalar fallback) and, when built with CUDA, the CUDA
kernels for the schemas in :mod:`fastdpo.ops`. Build it against the installed torch with
``pip install --no-build-isolation -e .``.
"""
