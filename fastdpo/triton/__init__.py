"""The ``triton`` backend: Triton kernels for GPUs (and CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package does not import Triton; :mod:`fastdpo.triton.register` does, and registers
the kernels with :mod:`fastdpo.ops` (``fastdpo.backends`` loads it on first use).
"""
