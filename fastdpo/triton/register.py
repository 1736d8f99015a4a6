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

from .. import ops
from . import logps

ops.register_impl("triton", "logps_fwd", logps.logps_fwd)
ops.register_impl("triton", "logps_bwd", logps.logps_bwd)

# ---- fused-linear kernels: fastdpo/triton/linear.py registers linear_logps_fwd/bwd on import ----
# Imported only when the module exists; a missing dependency *of* linear.py is still an error.
try:
    importlib.import_module(f"{__package__}.linear")
except ModuleNotFoundError as exc:
    if exc.name != f"{__package__}.linear":
        raise
