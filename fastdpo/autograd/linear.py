"""The autograd Function of the fused LM head: per-token log-probs from hidden states.

Saves the caller's own ``hidden`` / ``weight`` / ``bias`` plus O(tokens) (labels, row statistics,
entropy); the backward recomputes the logits tile by tile. Gradients come back in the caller's
shapes and dtypes; a weight used elsewhere too (tied embeddings) accumulates as usual.

A frozen head (only ``hidden`` needs a gradient, no entropy, one device) takes another path:
the forward also forms each token's ``d logp / d hidden`` (an ``(N, H)`` fp32 tensor, see
:func:`fastdpo.autograd.linear_loss.frozen_head_forward`) and the backward only scales it, so the
pass costs 2 matmuls instead of 3.

``shift`` pairs position ``t`` with label ``t + 1`` without touching ``hidden``: every row keeps its
place and the labels move instead, the last position of each sequence getting ``ignore_index``
(those ``B`` rows are skipped by the kernels); the caller drops that last column afterwards.
"""

from __future__ import annotations

import torch

from .. import ops
from .linear_loss import frozen_head_forward
from .logps import row_grads
from .options import RowOptions, refuse_double_backward


def flat_rows(hidden, labels, shift: bool, ignore_index: int):
    """``(N, H)`` rows of ``hidden`` and the ``(N,)`` labels they predict.

    The rows are a view unless ``hidden``'s leading dimensions cannot be merged (then ``reshape``
    copies ``B * T * H`` elements, still small next to ``B * T * V`` logits).
    """
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if shift:
        pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
    return h2, labels.reshape(-1)


def forward_rows(opts: RowOptions, h2, weight, bias, lab):
    """``(logp, row_max, log_sum, entropy)`` of the fused op, combined over shards if any."""
    out = ops.get_op(opts.backend, "linear_logps_fwd")(
        h2, weight, bias, lab, opts.ignore_index, float(opts.temperature),
        float(opts.logit_scale), float(opts.softcap), opts.vocab_start, opts.vocab_total,
        opts.with_entropy, opts.batch_invariant)
    if opts.shards is not None:  # vocabulary-parallel head: global row statistics
        out = opts.shards.combine(*out, lab, opts.temperature, opts.with_entropy)
    return out


class LinearTokenLogps(torch.autograd.Function):
    """Outputs ``(logp, entropy)`` shaped like ``labels`` (unshifted: the caller slices)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: RowOptions):
        h2, lab = flat_rows(hidden, labels, opts.shift, opts.ignore_index)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.unit = None
        ent_grad = opts.with_entropy and opts.entropy_grad
        if (need_h and not need_w and not (need_b and bias is not None) and not ent_grad
                and opts.shards is None and opts.vocab_start == 0
                and not torch.compiler.is_compiling()):  # data-dependent row selection
            logp, row_max, log_sum, ctx.unit, ent = frozen_head_forward(
                opts.backend, h2, weight, bias, lab, opts.ignore_index, opts.temperature,
                opts.logit_scale, opts.softcap, batch_invariant=opts.batch_invariant,
                with_entropy=opts.with_entropy)
            ctx.hidden_meta = (hidden.shape, hidden.dtype)
            ctx.set_materialize_grads(False)
            ent = ent.view(labels.shape) if opts.with_entropy else ent
            ctx.mark_non_differentiable(ent)
            return logp.view(labels.shape), ent
        logp, row_max, log_sum, ent = forward_rows(opts, h2, weight, bias, lab)
        ctx.save_for_backward(hidden, weight, bias, lab, row_max, log_sum,
                              ent if ent_grad else None)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        if opts.with_entropy:
            ent = ent.view(labels.shape)
        if not ent_grad:
            ctx.mark_non_differentiable(ent)
        return logp.view(labels.shape), ent

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("the fused LM head")
        if ctx.unit is not None:  # frozen head: d hidden = grad_logp * (d logp / d hidden)
            shape, dtype = ctx.hidden_meta
            if grad_logp is None:
                return None, None, None, None, None
            d_h = ctx.unit * grad_logp.reshape(-1, 1).to(ctx.unit.dtype)
            return d_h.to(dtype).view(shape), None, None, None, None
        hidden, weight, bias, lab, row_max, log_sum, ent = ctx.saved_tensors
        opts: RowOptions = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = bool(need_b and bias is not None)
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None
        grad_logp, grad_entropy = row_grads(grad_logp, grad_entropy, row_max, ent)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        d_h, d_w, d_b = ops.get_op(opts.backend, "linear_logps_bwd")(
            grad_logp, grad_entropy, h2, weight, bias, lab, row_max, log_sum, ent,
            opts.ignore_index, float(opts.temperature), float(opts.logit_scale),
            float(opts.softcap), opts.vocab_start, opts.vocab_total, need_h, need_w, need_b,
            opts.batch_invariant)
        if opts.shards is not None and need_h:  # each shard holds part of the vocabulary sum
            opts.shards.reduce_hidden_grad(d_h)
        return ((d_h.view(hidden.shape) if need_h else None), (d_w if need_w else None),
                (d_b if need_b else None), None, None)
