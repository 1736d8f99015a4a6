"""The autograd Function of the fused LM head: per-token log-probs from hidden states.

Saves the caller's own ``hidden`` / ``weight`` / ``bias`` plus O(tokens) (labels, log-sum-exp,
entropy); the backward recomputes the logits tile by tile. Gradients come back in the caller's
shapes and dtypes; a weight used elsewhere too (tied embeddings) accumulates as usual.

``shift`` pairs position ``t`` with label ``t + 1`` without touching ``hidden``: every row keeps its
place and the labels move instead, the last position of each sequence getting ``ignore_index``
(those ``B`` rows are skipped by the kernels); the caller drops that last column afterwards.
"""

from __future__ import annotations

import torch

from .. import ops
from .logps import row_grads


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


def forward_rows(backend, h2, weight, bias, lab, ignore_index, temperature, logit_scale, softcap,
                 vocab_start, vocab_total, with_entropy):
    return ops.get_op(backend, "linear_logps_fwd")(
        h2, weight, bias, lab, ignore_index, float(temperature), float(logit_scale),
        float(softcap or 0.0), vocab_start, vocab_total, with_entropy)


class LinearTokenLogps(torch.autograd.Function):
    """Outputs ``(logp, entropy)`` shaped like ``labels`` (unshifted: the caller slices)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, backend, ignore_index, temperature, logit_scale,
                softcap, shift, with_entropy, deterministic, vocab_start, vocab_total,
                shards=None):
        h2, lab = flat_rows(hidden, labels, shift, ignore_index)
        logp, lse, ent = forward_rows(backend, h2, weight, bias, lab, ignore_index, temperature,
                                      logit_scale, softcap, vocab_start, vocab_total, with_entropy)
        if shards is not None:  # vocabulary-parallel head: global row statistics
            logp, lse, ent = shards.combine(logp, lse, ent, lab, weight.shape[0])
        ctx.save_for_backward(hidden, weight, bias, lab, lse, ent if with_entropy else None)
        ctx.opts = (backend, ignore_index, temperature, logit_scale, softcap, deterministic,
                    vocab_start, vocab_total, shards)
        ctx.set_materialize_grads(False)
        if with_entropy:
            ent = ent.view(labels.shape)
        else:
            ctx.mark_non_differentiable(ent)
        return logp.view(labels.shape), ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, lab, lse, ent = ctx.saved_tensors
        (backend, ignore_index, temperature, logit_scale, softcap, deterministic, vocab_start,
         vocab_total, shards) = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 12
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w or need_b):
            return (None, None, None) + none
        grad_logp, grad_entropy = row_grads(grad_logp, grad_entropy, lse, ent)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        d_h, d_w, d_b = ops.get_op(backend, "linear_logps_bwd")(
            grad_logp, grad_entropy, h2, weight, bias, lab, lse, ent, ignore_index,
            float(temperature), float(logit_scale), float(softcap or 0.0), vocab_start,
            vocab_total, need_h, need_w, bool(need_b and bias is not None), deterministic)
        if shards is not None and need_h:  # each shard holds part of the sum over the vocabulary
            shards.reduce_hidden_grad(d_h)
        return ((d_h.view(hidden.shape) if need_h else None), (d_w if need_w else None),
                (d_b if need_b and bias is not None else None)) + none
