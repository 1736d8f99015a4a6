"""Importing this registers the Triton backend's implementations with :mod:`fastdpo.ops`.

Raises ImportError (with the reason) when Triton is not installed; ``fastdpo.backends`` reports it.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the triton backend needs the 'triton' package (pip install triton): {exc}") from exc

import os

from .. import ops
from ..torch_backend import linear as chunk_loop
from . import linear, logps

ops.register_impl("triton", "logps_fwd", logps.logps_fwd)
ops.register_impl("triton", "logps_bwd", logps.logps_bwd)

# The fused LM head by default: cuBLAS GEMMs per chunk, each followed by the Triton row kernels as
# the epilogue (online log-sum-exp / log-prob / entropy; the gradient written in place). Design
# estimate for an H100/H200 (~790 TFLOP/s bf16, ~4.3 TB/s): per logits element the GEMM costs
# 2H flops and the epilogue moves 8 bytes (fp32 tile written, read back), so the epilogue takes
# 8 * 790e12 / (4.3e12 * 2H) = 735 / H of the GEMM time from HBM -- 18% at H = 4096 -- whatever
# the chunk size; a chunk whose fp32 tile stays in L2 (the plan's budget keeps tiles to a few tens
# of MB) reads it back at L2 bandwidth, about a third of that: ~6% at H = 4096, under the 10%
# aimed for. The tl.dot kernels of linear.py fuse the matmul too; they are the alternative
# (FASTDPO_TRITON_LINEAR=dot) until a GPU run shows them faster.
_chunk_fwd, _chunk_bwd = chunk_loop.make_impls("triton")


def _dot_kernels() -> bool:
    return os.environ.get("FASTDPO_TRITON_LINEAR", "") == "dot"


def linear_fwd(*args):
    return (linear.linear_logps_fwd if _dot_kernels() else _chunk_fwd)(*args)


def linear_bwd(*args):
    return (linear.linear_logps_bwd if _dot_kernels() else _chunk_bwd)(*args)


ops.register_impl("triton", "linear_logps_fwd", linear_fwd)
ops.register_impl("triton", "linear_logps_bwd", linear_bwd)
