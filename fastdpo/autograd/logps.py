"""The autograd Function of per-token log-probabilities from logits.

It takes the caller's whole logits tensor and slices inside (``shift``), so the gradient it returns
has the caller's shape directly: autograd never pads a sliced gradient with a second full-size copy.
Only the per-token log-sum-exp (and entropy) is saved besides the logits the caller already holds.
"""

from __future__ import annotations

import torch

from .. import ops


def rows_view(logits, labels, shift: bool):
    """``(B, T, V)`` / ``(B, T)`` views of the inputs, shifted for causal LMs. Never copies."""
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def forward_rows(backend, logits, labels, ignore_index, temperature, vocab_start, vocab_total,
                 with_entropy):
    return ops.get_op(backend, "logps_fwd")(logits, labels, ignore_index, float(temperature),
                                            vocab_start, vocab_total, with_entropy)


def backward_into(backend, grad_full, shift, grad_logp, grad_entropy, logits, labels, lse, entropy,
                  ignore_index, temperature, vocab_start, vocab_total):
    """Write the gradient of ``logits`` into ``grad_full`` (may be ``logits`` itself)."""
    g3, _ = rows_view(grad_full, labels, False)
    if shift:
        g3[:, -1].zero_()
        g3 = g3[:, :-1]
    x3, l3 = rows_view(logits, labels, shift)
    ops.get_op(backend, "logps_bwd")(grad_logp, grad_entropy, x3, l3, lse, entropy, ignore_index,
                                     float(temperature), vocab_start, vocab_total, g3)
    return grad_full


def row_grads(grad_logp, grad_entropy, lse, ent):
    """Incoming per-row gradients in the ops' layout (``None`` for a missing entropy gradient)."""
    shape = lse.shape
    grad_logp = (lse.new_zeros(shape) if grad_logp is None
                 else grad_logp.reshape(shape).to(lse.dtype).contiguous())
    if ent is None or grad_entropy is None:
        return grad_logp, None
    return grad_logp, grad_entropy.reshape(shape).to(lse.dtype).contiguous()


class TokenLogps(torch.autograd.Function):
    """``shards`` (see :class:`fastdpo.distributed.Shards`) combines per-shard row statistics into
    global ones for vocabulary-parallel logits; backward then needs no collective, because the op
    given the global lse / entropy yields this shard's slice of the full-softmax gradient."""

    @staticmethod
    def forward(ctx, logits, labels, backend, ignore_index, temperature, shift, with_entropy,
                inplace_backward, vocab_start, vocab_total, shards=None):
        x3, l3 = rows_view(logits, labels, shift)
        logp, lse, ent = forward_rows(backend, x3, l3, ignore_index, temperature, vocab_start,
                                      vocab_total, with_entropy)
        if shards is not None:
            logp, lse, ent = shards.combine(logp, lse, ent, l3, x3.shape[-1])
        ctx.save_for_backward(logits, labels, lse, ent if with_entropy else None)
        ctx.opts = (backend, ignore_index, temperature, shift, inplace_backward, vocab_start,
                    vocab_total)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, ent = ctx.saved_tensors
        backend, ignore_index, temperature, shift, inplace, vocab_start, vocab_total = ctx.opts
        if grad_logp is None and grad_entropy is None:
            return (None,) * 11
        grad_logp, grad_entropy = row_grads(grad_logp, grad_entropy, lse, ent)
        grad_full = logits if inplace else torch.empty_like(logits)
        backward_into(backend, grad_full, shift, grad_logp, grad_entropy, logits, labels, lse,
                      ent, ignore_index, temperature, vocab_start, vocab_total)
        return (grad_full,) + (None,) * 10
