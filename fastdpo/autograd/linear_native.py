""":func:`fastdpo.autograd.linear_loss.run_pairs` through the native C++ head on CPU, where the
pass needs no ``d_weight``: a forward-only pass (a reference model, a first log-prob pass) runs
``linear_logps_fwd`` and a frozen-head policy pass ``linear_frozen_fwd`` (each token's
``d logp / d hidden`` formed in the same sweep). Both are one parallel region over cache-sized
tiles, with no ``(rows, V)`` buffer, instead of a GEMM and row kernels per chunk from Python.

The per-token results are reduced into sequence log-probs and, chunk by chunk in the same order,
handed to ``pair_grads``, so the caller sees the same calls as from the Python loop.
"""

from __future__ import annotations

import torch

from .. import ops
from .linear_stream import PassResult


def native_applies(head, pr, weight, bias, grads: bool, need_w: bool, need_b: bool) -> bool:
    """Whether the native ops can run this pass (CPU, a dtype the native backend takes, the
    weight in the hidden states' dtype, and no ``d_weight`` / ``d_bias`` wanted)."""
    h2 = pr.h2
    if head.backend != "native" or h2.device.type != "cpu":
        return False
    if h2.dtype not in ops.DTYPES["native"] or weight.dtype != h2.dtype:
        return False
    if bias is not None and bias.dtype != h2.dtype:
        return False
    if grads and (need_w or (need_b and bias is not None)):
        return False
    return not grads or _has_frozen()


def _has_frozen() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastdpo::native_linear_frozen_fwd",
                                                          "CPU")


def native_pass(head, pr, weight, bias, chunks, pair_grads, grads: bool, need_h: bool,
                hidden_shape, batch_invariant: bool, extra_grad=0.0) -> PassResult:
    """The pass of ``run_pairs`` (same results and ``pair_grads`` calls) through the native ops;
    ``grads`` means a frozen head (``d_hidden`` only)."""
    h2, B, K = pr.h2, pr.pairs, pr.parts
    acc = pr.scale.dtype
    ii = head.ignore_index
    lab = torch.full_like(pr.labels, ii)  # only the rows the loop would visit
    lab[pr.order] = pr.labels[pr.order]
    args = (h2, weight, bias, lab, ii, float(head.temperature), float(head.logit_scale),
            float(head.softcap))
    if grads:
        lp, _, _, unit, _ = ops.get_op("native", "linear_frozen_fwd")(*args, batch_invariant,
                                                                     False)
    else:
        lp = ops.get_op("native", "linear_logps_fwd")(*args, 0, weight.shape[0], False,
                                                       batch_invariant)[0]
        unit = None
    lp = lp.to(acc).index_select(0, pr.order)
    scale = pr.scale.index_select(0, pr.order)
    out = torch.zeros(K * B, dtype=acc, device=h2.device)
    ext = None
    if pr.extra is None:
        out.index_add_(0, pr.seq, lp * scale)
    else:  # a row of one term only adds exactly 0 to the other's sums, even a NaN
        extra = pr.extra.index_select(0, pr.order)
        out.index_add_(0, pr.seq, torch.where(scale != 0, lp * scale, 0.0))
        ext = torch.zeros_like(out).index_add_(0, pr.seq, torch.where(extra != 0, lp * extra, 0.0))
    d_h = None
    if pair_grads is not None:
        g_seq = torch.zeros(K * B, dtype=acc, device=h2.device)
        for j0, j1 in chunks:
            g = pair_grads(j0, j1, *(out[k * B + j0:k * B + j1] for k in range(K)))
            for k in range(K):
                g_seq[k * B + j0:k * B + j1] = g[k]
        if grads and need_h:
            g_row = g_seq.index_select(0, pr.seq) * scale
            if ext is not None:
                g_row = g_row + extra_grad * extra
            d_h = torch.zeros(h2.shape, dtype=h2.dtype, device=h2.device)
            rows_u = unit.index_select(0, pr.order) * g_row.to(unit.dtype).unsqueeze(1)
            d_h.index_copy_(0, pr.order, rows_u.to(h2.dtype))
            if hidden_shape is not None:
                d_h = d_h.view(hidden_shape)
    logps = tuple(out[k * B:(k + 1) * B].clone() if K > 1 else out for k in range(K))
    extras = None if ext is None else tuple(ext[k * B:(k + 1) * B] for k in range(K))
    return PassResult(logps, extras, d_h, None, None)
