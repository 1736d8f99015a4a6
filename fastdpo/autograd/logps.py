"""The autograd Function of per-token log-probabilities from logits.

It takes the caller's whole logits tensor and slices inside (``shift``), so the gradient it returns
has the caller's shape directly: autograd never pads a sliced gradient with a second full-size copy.
Only the per-token row statistics (and entropy) are saved besides the logits the caller holds.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import ops, rows
from .options import RowOptions, refuse_double_backward


def rows_view(logits, labels, shift: bool):
    """``(B, T, V)`` / ``(B, T)`` views of the inputs, shifted for causal LMs. Never copies."""
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def forward_rows(opts: RowOptions, logits, labels):
    """``(logp, row_max, log_sum, entropy)`` of the row op, combined over shards if any."""
    out = ops.get_op(opts.backend, "logps_fwd")(logits, labels, *opts.row_args(),
                                                opts.with_entropy)
    if opts.shards is not None:
        out = opts.shards.combine(*out, labels, opts.temperature,
                                  opts.with_entropy)
    return out


def backward_into(opts: RowOptions, grad_full, grad_logp, grad_entropy, logits, labels, row_max,
                  log_sum, entropy):
    """Write the gradient of ``logits`` into ``grad_full`` (may be ``logits`` itself)."""
    g3, _ = rows_view(grad_full, labels, False)
    if opts.shift:
        g3[:, -1].zero_()
        g3 = g3[:, :-1]
    x3, l3 = rows_view(logits, labels, opts.shift)
    ops.get_op(opts.backend, "logps_bwd")(grad_logp, grad_entropy, x3, l3, row_max, log_sum,
                                          entropy, *opts.row_args(), g3)
    return grad_full


def row_grads(grad_logp, grad_entropy, like, ent):
    """Incoming per-row gradients in the ops' layout (``None`` for a missing entropy gradient)."""
    shape = like.shape
    grad_logp = (like.new_zeros(shape) if grad_logp is None
                 else grad_logp.reshape(shape).to(like.dtype).contiguous())
    if ent is None or grad_entropy is None:
        return grad_logp, None
    return grad_logp, grad_entropy.reshape(shape).to(like.dtype).contiguous()


def save_rows(ctx, opts: RowOptions, logits, labels, row_max, log_sum, ent):
    """What both Functions keep for backward: the caller's logits and labels plus O(tokens)."""
    ctx.save_for_backward(logits, labels, row_max, log_sum, ent if opts.with_entropy else None)
    ctx.opts = opts
    ctx.set_materialize_grads(False)
    if not opts.with_entropy:
        ctx.mark_non_differentiable(ent)


class TokenLogps(torch.autograd.Function):
    """Outputs ``(logp, entropy)``; with ``opts.shards`` the row statistics are the global ones,
    so backward needs no collective: the op given the global ``(row_max, log_sum)`` yields this
    shard's slice of the full-softmax gradient."""

    @staticmethod
    def forward(ctx, logits, labels, opts: RowOptions):
        x3, l3 = rows_view(logits, labels, opts.shift)
        logp, row_max, log_sum, ent = forward_rows(opts, x3, l3)
        save_rows(ctx, opts, logits, labels, row_max, log_sum, ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("token_logps")
        logits, labels, row_max, log_sum, ent = ctx.saved_tensors
        opts: RowOptions = ctx.opts
        if grad_logp is None and grad_entropy is None:
            return None, None, None
        grad_logp, grad_entropy = row_grads(grad_logp, grad_entropy, row_max, ent)
        grad_full = logits if opts.inplace_backward else torch.empty_like(logits)
        backward_into(opts, grad_full, grad_logp, grad_entropy, logits, labels, row_max, log_sum,
                      ent)
        if opts.inplace_backward:
            # the kernels wrote into the logits' storage behind autograd's back: let it see the
            # mutation, so reusing the saved logits (retain_graph, a second call) raises
            torch.autograd.graph.increment_version(logits)
        return grad_full, None, None


def _label_logits(x3, lab3, opts: RowOptions):
    """``(x_k, local, valid)`` for labels ``(B, T, k)`` on the rows ``x3``: the raw logits of the
    k labels (gathered: k elements a row), and the masks of the row contract."""
    V = x3.shape[-1]
    parts = rows.classify_labels(lab3, opts.ignore_index, 0, V, V)
    return x3.gather(-1, parts.index).to(ops.acc_dtype(x3.dtype)), parts


class LabelSetLogps(torch.autograd.Function):
    """``(logp (B, T, k), entropy, lse)`` for several labels per position and/or the per-row
    log-sum-exp as a differentiable output (a z-loss needs its gradient).

    One pass of the row op gives the row statistics (its own label is an off-shard dummy, so it
    adds no label term); the k label logits are gathered. Backward: one row-op pass with the
    softmax coefficient ``sum_k g_k - g_lse`` and no label term, then ``g_k / T`` added at each
    label (an O(tokens * k) scatter).
    """

    @staticmethod
    def forward(ctx, logits, labels, opts: RowOptions):
        x3, l3 = rows_view(logits, labels, opts.shift)
        V = x3.shape[-1]
        xk, parts = _label_logits(x3, l3, opts)
        row_active = parts.active.any(-1)
        # a valid label outside the op's shard [V, 2V): the op computes the row, adds no label
        dummy = torch.where(row_active, 0, opts.ignore_index)
        dopts = replace(opts, vocab_start=V, vocab_total=2 * V)
        _, row_max, log_sum, ent = forward_rows(dopts, x3, dummy)
        d = rows.scaled_diff(xk, rows.ref_point(row_max)[..., None], opts.temperature)
        logp = torch.where(parts.valid, d - log_sum[..., None], float("nan"))
        logp = torch.where(parts.active, logp, 0.0)
        lse = torch.where(row_active, rows.lse(row_max, log_sum, opts.temperature), 0.0)
        save_rows(ctx, opts, logits, labels, row_max, log_sum, ent)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_lse):
        refuse_double_backward("token_logps")
        logits, labels, row_max, log_sum, ent = ctx.saved_tensors
        opts: RowOptions = ctx.opts
        if grad_logp is None and grad_entropy is None and grad_lse is None:
            return None, None, None
        x3, l3 = rows_view(logits, labels, opts.shift)
        V = x3.shape[-1]
        xk, parts = _label_logits(x3, l3, opts)  # read before an in-place gradient overwrites
        acc = row_max.dtype
        g_k = (torch.zeros(parts.active.shape, dtype=acc, device=row_max.device)
               if grad_logp is None else torch.where(parts.local, grad_logp.to(acc), 0.0))
        coef = g_k.sum(-1)
        if grad_lse is not None:
            coef = coef - grad_lse.to(acc)
        coef, grad_entropy = row_grads(coef, grad_entropy, row_max, ent)
        # the op's dummy labels in the caller's (unshifted) layout, as backward_into slices
        dummy = torch.where((labels != opts.ignore_index).any(-1), 0, opts.ignore_index)
        grad_full = logits if opts.inplace_backward else torch.empty_like(logits)
        dopts = replace(opts, vocab_start=V, vocab_total=2 * V)
        backward_into(dopts, grad_full, coef, grad_entropy, logits, dummy, row_max, log_sum, ent)
        # The label columns get their whole gradient recomputed in fp32 and written once (adding
        # g_k to an already rounded bf16 value would round twice where the terms cancel).
        same = (parts.index[..., :, None] == parts.index[..., None, :]) & parts.local[..., None, :]
        g_col = (same.to(acc) * g_k[..., None, :]).sum(-1)  # every g_k of the same column
        logp_k = rows.scaled_diff(xk, rows.ref_point(row_max)[..., None], opts.temperature)
        logp_k = logp_k - log_sum[..., None]
        p_k = torch.exp(logp_k)
        val = g_col - coef[..., None] * p_k
        if grad_entropy is not None:
            val = val - grad_entropy[..., None] * p_k * (logp_k + ent[..., None])
        g3, _ = rows_view(grad_full, labels, opts.shift)
        vals = (val / opts.temperature).to(g3.dtype)
        # one label slot at a time, gathered again after the last write: a slot without a label
        # (index 0) writes back what is there, with no host sync for a count of labels
        for k in range(vals.shape[-1]):
            idx = parts.index[..., k:k + 1]
            cur = g3.gather(-1, idx)
            g3.scatter_(-1, idx, torch.where(parts.local[..., k:k + 1], vals[..., k:k + 1], cur))
        if opts.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return grad_full, None, None
