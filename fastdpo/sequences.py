"""Per-token values reduced into one value per sequence; shared by the logits and fused-linear
paths so both reduce identically."""

from __future__ import annotations

import torch

from . import _validate


def check_reduction(labels, *, token_weights, average, cu_seqlens, validate) -> None:
    """The reduction's own arguments (the public functions check them before any work)."""
    _validate.check_bool("average", average)
    if token_weights is not None:
        _validate.check_token_weights(token_weights, labels)
    if cu_seqlens is not None:
        _validate.check_cu_seqlens(cu_seqlens, labels,
                                   _validate.checked_mode(validate, labels.device))


def token_weights_of(active, token_weights, dtype):
    """Each token's weight in its sequence: 1 (or its ``token_weights`` entry, detached) where
    ``active``, exactly 0 elsewhere: an ignored token's weight is never read (it may be NaN)."""
    if token_weights is None:
        return active.to(dtype)
    return torch.where(active, token_weights.detach().to(dtype), 0.0)


def average_weights(w):
    """Weights ``(S, T)`` divided by each sequence's sum, of any sign; a sequence without any
    non-zero weight keeps 0 (weights that cancel give inf/NaN, as :func:`reduce_sequences`)."""
    has = (w != 0).any(-1, keepdim=True)
    return torch.where(has, w / torch.where(has, w.sum(-1, keepdim=True), 1.0), 0.0)


def reduce_sequences(tok, labels, *, ignore_index, token_weights, average, shift, cu_seqlens,
                     validate):
    """Sum (or weighted mean) of per-token values into one value per sequence.

    ``tok`` comes from :func:`fastdpo.token_logps` with the same ``labels``/``shift``. Ignored
    tokens and tokens of weight 0 contribute exactly 0, whatever their value or weight.
    ``average`` divides by the sum of the weights (of any sign); 0 for a sequence without any.
    """
    check_reduction(labels, token_weights=token_weights, average=average, cu_seqlens=cu_seqlens,
                    validate=validate)
    active = (labels[..., 1:] if shift else labels) != ignore_index
    tw = None if token_weights is None else (token_weights[..., 1:] if shift else token_weights)
    w = token_weights_of(active, tw, tok.dtype)
    # a weight of 0 drops the token: 0 * (-inf) must not turn the sum into NaN
    parts = [torch.where(w != 0, tok * w, 0.0), w, (w != 0).to(tok.dtype)]
    if cu_seqlens is not None:
        total = labels.shape[-1]
        parts = [p.reshape(-1) for p in parts]
        if shift:  # output j belongs to label j + 1: put it back on the label axis
            parts = [torch.nn.functional.pad(p, (1, 0)) for p in parts]
        seg = torch.searchsorted(cu_seqlens.to(torch.int64)[1:],
                                 torch.arange(total, device=tok.device), right=True)
        nseq = cu_seqlens.numel() - 1
        s, d, n = (p.new_zeros(nseq).index_add(0, seg, p) for p in parts)
    else:
        s, d, n = (p.sum() if labels.dim() == 1 else p.sum(-1) for p in parts)
    if average:  # weights may be negative; weights that cancel give inf/NaN, no weights 0
        has = n > 0
        s = torch.where(has, s / torch.where(has, d, 1.0), 0.0)
    return s


def mask_sequence_starts(labels, cu_seqlens, ignore_index):
    """``labels`` with the first label of each packed sequence set to ``ignore_index`` (with
    ``shift`` its logits belong to the previous sequence)."""
    _validate.check_index("cu_seqlens", cu_seqlens)
    _validate.check_same_device(labels=labels, cu_seqlens=cu_seqlens)
    flat = labels.reshape(-1)
    start = torch.zeros(flat.numel() + 1, dtype=torch.bool, device=flat.device)
    start[cu_seqlens[:-1].to(torch.int64)] = True  # an empty last sequence lands on the spare slot
    return torch.where(start[:-1], ignore_index, flat).view(labels.shape)
