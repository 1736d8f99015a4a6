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


class TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, backend, ignore_index, temperature, shift, with_entropy,
                inplace_backward, vocab_start, vocab_total):
        x3, l3 = rows_view(logits, labels, shift)
        logp, lse, ent = forward_rows(backend, x3, l3, ignore_index, temperature, vocab_start,
                                      vocab_total, with_entropy)
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
            return (None,) * 10
        shape = lse.shape
        grad_logp = (lse.new_zeros(shape) if grad_logp is None
                     else grad_logp.reshape(shape).to(lse.dtype).contiguous())
        if ent is None:
            grad_entropy = None
        elif grad_entropy is not None:
            grad_entropy = grad_entropy.reshape(shape).to(lse.dtype).contiguous()
        grad_full = logits if inplace else torch.empty_like(logits)
        backward_into(backend, grad_full, shift, grad_logp, grad_entropy, logits, labels, lse,
                      ent, ignore_index, temperature, vocab_start, vocab_total)
        return (grad_full,) + (None,) * 9
