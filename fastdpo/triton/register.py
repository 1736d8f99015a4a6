"""Importing this registers the Triton backend's implementations with :mod:`fastdpo.ops`.

Raises ImportError (with the reason) when Triton is not installed; ``fastdpo.backends`` reports it.
"""

from __future__ import annotations

import importlib

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the triton backend needs the 'triton' package (pip install triton): {exc}") from exc

import torch

from .. import ops
from . import logps

ops.register_impl("triton", "logps_fwd", logps.logps_fwd)
ops.register_impl("triton", "logps_bwd", logps.logps_bwd)

# ---- fused-linear kernels (fastdpo/triton/linear.py, owned separately) -------------------------
# Imported only when the module exists. It may register ``linear_logps_fwd``/``linear_logps_bwd``
# itself on import; otherwise its functions of those names are registered here.
try:
    linear = importlib.import_module(f"{__package__}.linear")
except ModuleNotFoundError as exc:
    if exc.name != f"{__package__}.linear":  # a missing dependency of linear.py is a real error
        raise
    linear = None

if linear is not None:
    for _op in ("linear_logps_fwd", "linear_logps_bwd"):
        _qual = f"{ops.LIB_NAME}::{ops.op_name('triton', _op)}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(_qual, "CPU") and hasattr(linear, _op):
            ops.register_impl("triton", _op, getattr(linear, _op))
