"""Matmul helpers of the fused head's chunk loops: operand dtypes, fp32-result products into
preallocated buffers, and the logits tile."""

from __future__ import annotations

import functools

import torch

from .. import ops, rows

acc_dtype = ops.acc_dtype


def operand_dtype(compute: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of matmul operands: the input's own on CUDA (tensor cores, fp32 accumulation
    inside), fp32 on CPU (its bf16/fp16 matmuls round the result to the input dtype)."""
    return compute if device.type == "cuda" else acc_dtype(compute)


def dz_bytes(compute: torch.dtype, device: torch.device) -> int:
    """Bytes per logits element of a tile's ``d logits`` in the matmuls' operand dtype, when that
    is not the fp32 tile itself (half-precision operands on CUDA): a copy the epilogue holds
    beside the tile while ``d_hidden`` / ``d_weight`` are formed."""
    opd = operand_dtype(compute, device)
    return 0 if opd == acc_dtype(compute) else torch.empty((), dtype=opd).element_size()


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=fp32)`` works for ``dtype`` operands here, probed once
    on 1x1 tensors (so an out-of-memory error in a real call is never mistaken for "no")."""
    one = torch.ones((1, 1), dtype=dtype, device=device)
    try:
        torch.mm(one, one, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def _addmm_into_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=fp32, out=c)`` accumulates into the fp32 ``c``
    in place (no temporary) for ``dtype`` operands here: probed once on 2x2 tensors, values
    checked, so a kernel that mishandles the aliasing is never used."""
    a = torch.ones((2, 2), dtype=dtype, device=device)
    c = torch.full((2, 2), 3.0, device=device)
    try:
        r = torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except (RuntimeError, TypeError):
        return False
    return r.data_ptr() == c.data_ptr() and bool((c == 5.0).all())


# Without those, a half-precision product is formed in slices of at most this many fp32 bytes
# before landing in ``out``: the backward accumulates d_weight (V, H) chunk by chunk, and one
# full-size fp32 temporary of it is 2.1 GB at V = 128256, H = 4096.
MM_TEMP_BYTES = 64 << 20


def mm_acc(a, b, out=None, accumulate=False):
    """``out (+)= a @ b`` with an fp32/fp64 result whatever the operands' dtype; with ``out``,
    no temporary larger than ``MM_TEMP_BYTES``."""
    target = out.dtype if out is not None else acc_dtype(a.dtype)
    if a.dtype == target:
        if out is None:
            return a @ b
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    direct = a.is_cuda and target == torch.float32 and _mm_out_dtype_ok(a.device, a.dtype)
    if out is None:
        return torch.mm(a, b, out_dtype=target) if direct else (a @ b).to(target)
    if direct and not accumulate:
        return torch.mm(a, b, out_dtype=target, out=out)
    if direct and _addmm_into_ok(a.device, a.dtype):
        return torch.addmm(out, a, b, out_dtype=target, out=out)
    step = max(1, MM_TEMP_BYTES // (out.element_size() * max(1, out.shape[1])))
    for r0 in range(0, a.shape[0], step):
        r1 = min(a.shape[0], r0 + step)
        r = torch.mm(a[r0:r1], b, out_dtype=target) if direct else (a[r0:r1] @ b).to(target)
        if accumulate:
            out[r0:r1].add_(r)
        else:
            out[r0:r1].copy_(r)
    return out


def logits_tile(h, w, b, logit_scale, softcap, out, tanh_out=None):
    """Write the transformed logits (before temperature) of rows ``h`` and vocabulary ``w`` into
    ``out``; with ``tanh_out`` also keep ``tanh(s * a / c)`` for the backward's chain rule."""
    mm_acc(h, w.t(), out=out)
    if b is not None:
        out.add_(b.to(out.dtype))
    return rows.transform_logits_(out, logit_scale, softcap, tanh_out)
