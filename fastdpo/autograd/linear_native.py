""":func:`fastdpo.autograd.linear_loss.run_pairs` through the native C++ head on CPU.

A pass that needs no ``d_weight`` (a reference model, a first log-prob pass) runs
``linear_logps_fwd``, a frozen-head policy pass ``linear_frozen_fwd`` (each token's
``d logp / d hidden`` formed in the same sweep): one parallel region over cache-sized tiles, with
no ``(rows, V)`` buffer. The per-token results are reduced into sequence log-probs and, chunk by
chunk in the same order, handed to ``pair_grads``, so the caller sees the same calls as from the
Python loop.

A trainable head keeps the chunk loop (a chunk's pair gradients need its log-probs first), but
each chunk is two C++ calls (:class:`KeptChunks`): ``linear_keep_fwd`` writes the chunk's logits
into a buffer reused by every chunk and returns the row statistics; ``linear_keep_bwd`` turns them
into ``d logits`` in place and forms ``d_hidden`` and ``d_weight`` from them. Each call is one
parallel region over the same tiles (3 GEMMs, no recompute).
"""

from __future__ import annotations

import torch

from .. import ops
from .linear_stream import PassResult, active_labels, sequence_sums, token_grads


def native_head(head, pr, weight, bias) -> bool:
    """Whether the native ops take this pass's inputs (the native backend on CPU, a dtype it
    takes, weight and bias in the hidden states' dtype)."""
    h2 = pr.h2
    if head.backend != "native" or h2.device.type != "cpu":
        return False
    if h2.dtype not in ops.DTYPES["native"] or weight.dtype != h2.dtype:
        return False
    return bias is None or bias.dtype == h2.dtype


def native_applies(head, pr, weight, bias, grads: bool, need_w: bool, need_b: bool) -> bool:
    """Whether :func:`native_pass` runs this pass: native inputs and no ``d_weight`` /
    ``d_bias`` wanted."""
    if not native_head(head, pr, weight, bias):
        return False
    if grads and (need_w or (need_b and bias is not None)):
        return False
    return not grads or has_native_op("native_linear_frozen_fwd")


def has_native_op(op: str) -> bool:
    """Whether the loaded extension has ``op`` (one built before it keeps the Python loop)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdpo::{op}", "CPU")


class KeptChunks:
    """The chunk loop's GEMMs and row kernels for a trainable head, in C++: per chunk
    :meth:`forward` (logits kept in one buffer sized for the largest chunk) then
    :meth:`backward` (``d_hidden`` of the chunk's rows, ``d_weight`` / ``d_bias`` added into
    fp32 accumulators)."""

    @staticmethod
    def applies(head, pr, weight, bias, grads: bool) -> bool:
        return (grads and native_head(head, pr, weight, bias)
                and has_native_op("native_linear_keep_bwd"))

    def __init__(self, head, weight, bias, max_rows: int, batch_invariant: bool, ws):
        from ..native import _C

        V, H = weight.shape
        self.head, self.weight, self.bias, self.inv = head, weight, bias, batch_invariant
        self.keep = ws.take("keep", _C.linear_keep_numel(max_rows, V, H, batch_invariant),
                            torch.float32, "cpu")
        self.args = (head.ignore_index, float(head.temperature), float(head.logit_scale),
                     float(head.softcap))

    def forward(self, h, lab):
        """``(logp, row_max, log_sum)`` of rows ``h`` with labels ``lab`` (all ``(R,)`` fp32)."""
        return ops.get_op("native", "linear_keep_fwd")(h, self.weight, self.bias, lab,
                                                       *self.args, self.inv, self.keep)

    def backward(self, h, lab, g_row, row_max, log_sum, need_h: bool, d_w, d_b):
        """``d_hidden`` of the rows (empty unless ``need_h``); ``d_w`` / ``d_b`` (fp32, or empty
        tensors) accumulate."""
        return ops.get_op("native", "linear_keep_bwd")(
            self.keep, g_row, h, self.weight, self.bias, lab, row_max, log_sum, *self.args,
            self.inv, need_h, d_w, d_b)


def native_pass(head, pr, weight, bias, chunks, pair_grads, grads: bool, need_h: bool,
                hidden_shape, batch_invariant: bool, extra_grad=0.0) -> PassResult:
    """The pass of ``run_pairs`` (same results and ``pair_grads`` calls) through the native ops;
    ``grads`` means a frozen head (``d_hidden`` only)."""
    h2, B, K = pr.h2, pr.pairs, pr.parts
    acc = pr.scale.dtype
    ii = head.ignore_index
    args = (h2, weight, bias, active_labels(pr, ii), ii, float(head.temperature),
            float(head.logit_scale), float(head.softcap))
    if grads:
        lp, row_max, log_sum, unit, _ = ops.get_op("native", "linear_frozen_fwd")(
            *args, batch_invariant, False)
    else:
        lp, row_max, log_sum, _ = ops.get_op("native", "linear_logps_fwd")(
            *args, 0, weight.shape[0], False, batch_invariant)
        unit = None
    lp = lp.to(acc).index_select(0, pr.order)
    scale = pr.scale.index_select(0, pr.order)
    extra = None if pr.extra is None else pr.extra.index_select(0, pr.order)
    out, ext = sequence_sums(pr.seq, lp, scale, extra, K * B)
    d_h = None
    if pair_grads is not None:
        g_row = row_grads(pr, chunks, pair_grads, out, scale, extra, extra_grad)
        if grads and need_h:
            d_h = torch.zeros(h2.shape, dtype=h2.dtype, device=h2.device)
            rows_u = unit.index_select(0, pr.order) * g_row.to(unit.dtype).unsqueeze(1)
            d_h.index_copy_(0, pr.order, rows_u.to(h2.dtype))
            if hidden_shape is not None:
                d_h = d_h.view(hidden_shape)
    logps = tuple(out[k * B:(k + 1) * B].clone() if K > 1 else out for k in range(K))
    extras = None if ext is None else tuple(ext[k * B:(k + 1) * B] for k in range(K))
    return PassResult(logps, extras, d_h, None, None, rows=(row_max, log_sum))


def row_grads(pr, chunks, pair_grads, sums, scale, extra=None, extra_grad=0.0):
    """Each active row's ``dL/d logp`` (in ``pr.order``): ``pair_grads`` chunk by chunk on the
    sequence sums ``sums`` (``(parts * B,)``), times the row's weight, plus the extra term's."""
    B, K = pr.pairs, pr.parts
    g_seq = torch.zeros(K * B, dtype=sums.dtype, device=sums.device)
    for j0, j1 in chunks:
        g = pair_grads(j0, j1, *(sums[k * B + j0:k * B + j1] for k in range(K)))
        for k in range(K):
            g_seq[k * B + j0:k * B + j1] = g[k]
    return token_grads(g_seq, pr.seq, scale, extra, extra_grad)


def recompute_pass(head, pr, weight, bias, chunks, pair_grads, first: PassResult, need_h: bool,
                   need_w: bool, need_b: bool, hidden_shape, batch_invariant: bool,
                   extra_grad=0.0) -> PassResult:
    """The second pass of a loss whose pair gradients came from a first (native) log-prob pass:
    the native backward (``linear_logps_bwd``) recomputes each tile's logits in cache from
    ``first``'s row statistics, so no chunk's logits are ever held (1 matmul more than keeping
    them, which the first pass already cost)."""
    h2, V = pr.h2, weight.shape[0]
    acc = pr.scale.dtype
    sums = torch.cat(first.logps).to(acc)
    scale = pr.scale.index_select(0, pr.order)
    extra = None if pr.extra is None else pr.extra.index_select(0, pr.order)
    g_row = row_grads(pr, chunks, pair_grads, sums, scale, extra, extra_grad)
    grad_logp = torch.zeros(h2.shape[0], dtype=torch.float32, device=h2.device)
    grad_logp[pr.order] = g_row.to(torch.float32)
    lab = active_labels(pr, head.ignore_index)
    need_b = need_b and bias is not None
    row_max, log_sum = first.rows
    d_h, d_w, d_b = ops.get_op("native", "linear_logps_bwd")(
        grad_logp, None, h2, weight, bias, lab, row_max, log_sum, None, head.ignore_index,
        float(head.temperature), float(head.logit_scale), float(head.softcap), 0, V, need_h,
        need_w, need_b, batch_invariant)
    if need_h and hidden_shape is not None:
        d_h = d_h.view(hidden_shape)
    return PassResult(first.logps, first.extra, d_h if need_h else None,
                      d_w if need_w else None, d_b if need_b else None)
