"""Public log-probability functions over logits: ``token_logps`` and ``sequence_logps``."""

from __future__ import annotations

import torch

from . import _validate as V
from . import backends
from .autograd.logps import TokenLogps, forward_rows, rows_view


def _token_logps(logits, labels, *, ignore_index, temperature, shift, return_entropy,
                 inplace_backward, backend, validate, vocab_start=0, vocab_total=None,
                 shards=None):
    """:func:`token_logps` on one vocabulary shard ``[vocab_start, vocab_start + V)`` of
    ``vocab_total``; ``shards`` (vocabulary-parallel) combines the shards' row statistics."""
    V.check_logits_labels(logits, labels, shift=shift)
    V.check_temperature(temperature)
    vocab_total = logits.shape[-1] if vocab_total is None else vocab_total
    if V.checked_mode(validate, logits.device):
        V.check_label_values(labels, ignore_index, vocab_total)
    be = backends.resolve(backend, logits.device, logits.dtype)
    if torch.is_grad_enabled() and logits.requires_grad:
        logp, ent = TokenLogps.apply(logits, labels, be, ignore_index, temperature, shift,
                                     return_entropy, inplace_backward, vocab_start, vocab_total,
                                     shards)
    else:  # reference pass: no graph, nothing saved
        x3, l3 = rows_view(logits, labels, shift)
        logp, lse, ent = forward_rows(be, x3, l3, ignore_index, temperature, vocab_start,
                                      vocab_total, return_entropy)
        if shards is not None:
            logp, _, ent = shards.combine(logp, lse, ent, l3, x3.shape[-1])
    if logits.dim() == 2:  # (N, V) input: drop the batch dimension rows_view added
        logp = logp.squeeze(0)
        ent = ent.squeeze(0) if return_entropy else ent
    return (logp, ent) if return_entropy else logp


def token_logps(logits, labels, *, ignore_index=-100, temperature=1.0, shift=False,
                return_entropy=False, inplace_backward=False, backend="auto", validate=None,
                process_group=None):
    """Per-token log-probabilities ``log softmax(logits / temperature)[label]``.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, fp32/bf16/fp16, unit stride along the vocabulary.
        labels: ``(B, T)`` or ``(N,)`` int32/int64 token ids; ``ignore_index`` marks skipped tokens.
        shift: pair logits at position ``t`` with the label at ``t + 1`` (causal LM), no copy.
        return_entropy: also return each token's softmax entropy (same pass).
        inplace_backward: write the gradient into the logits' own storage. The logits are
            destroyed by backward; do not reuse them (or anything viewing them) afterwards.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        validate: check label values (and ``cu_seqlens``). Default: on for CPU tensors, off for
            CUDA ones (it would synchronise the host). Unchecked out-of-range labels give NaN.
        process_group: vocabulary-parallel group; the logits hold this rank's vocabulary shard.

    Returns:
        fp32 log-probs shaped like ``labels`` (like ``labels[..., 1:]`` with ``shift``), 0 where
        ignored; with ``return_entropy`` a pair ``(logps, entropy)``.
    """
    if process_group is not None:
        from .distributed import vocab_parallel_token_logps

        return vocab_parallel_token_logps(
            logits, labels, process_group, ignore_index=ignore_index, temperature=temperature,
            shift=shift, return_entropy=return_entropy, inplace_backward=inplace_backward,
            backend=backend, validate=validate)
    return _token_logps(logits, labels, ignore_index=ignore_index, temperature=temperature,
                        shift=shift, return_entropy=return_entropy,
                        inplace_backward=inplace_backward, backend=backend, validate=validate)


def reduce_sequences(tok, labels, *, ignore_index, token_weights, average, shift, cu_seqlens,
                     validate):
    """Sum (or weighted mean) of per-token values into one value per sequence.

    ``tok`` comes from :func:`token_logps` with the same ``labels``/``shift``; shared with the
    fused-linear path so both reduce identically.
    """
    mask_labels = labels[..., 1:] if shift else labels
    w = (mask_labels != ignore_index).to(tok.dtype)
    if token_weights is not None:
        V.check_token_weights(token_weights, labels)
        tw = token_weights[..., 1:] if shift else token_weights
        w = w * tw.detach().to(tok.dtype)
    num = tok * w
    if cu_seqlens is not None:
        if labels.dim() == 2 and labels.shape[0] != 1:
            raise ValueError("cu_seqlens needs a packed batch: logits (1, total, V) or (total, V)")
        total = labels.shape[-1]
        V.check_cu_seqlens(cu_seqlens, total, V.checked_mode(validate, labels.device))
        num, w = num.reshape(-1), w.reshape(-1)
        if shift:  # output j belongs to label j + 1: put it back on the label axis
            num, w = torch.nn.functional.pad(num, (1, 0)), torch.nn.functional.pad(w, (1, 0))
        seg = torch.searchsorted(cu_seqlens.to(torch.int64)[1:],
                                 torch.arange(total, device=num.device), right=True)
        nseq = cu_seqlens.numel() - 1
        s = num.new_zeros(nseq).index_add(0, seg, num)
        d = w.new_zeros(nseq).index_add(0, seg, w)
    elif labels.dim() == 1:
        s, d = num.sum(), w.sum()
    else:
        s, d = num.sum(-1), w.sum(-1)
    if average:
        s = s / torch.where(d > 0, d, torch.ones_like(d))
    return s


def sequence_logps(logits, labels, *, ignore_index=-100, token_weights=None, average=False,
                   shift=False, temperature=1.0, cu_seqlens=None, inplace_backward=False,
                   backend="auto", validate=None, process_group=None):
    """Per-sequence log-probabilities: the (weighted) sum over non-ignored tokens.

    ``(B, T, V)`` logits give ``(B,)``. ``(N, V)`` logits are one packed batch: one value per
    sequence of ``cu_seqlens`` (int32 offsets ``[0, ..., N]`` as in flash-attn varlen), else a 0-dim
    sum. ``token_weights`` (shaped like labels) scales each token's log-prob; gradients flow
    through the log-probs only. ``average=True`` divides by the sum of weights (0 when a sequence
    has none). With ``shift`` and ``cu_seqlens`` the first label of each sequence is ignored: its
    logits belong to the previous sequence. Other arguments as in :func:`token_logps`.
    """
    if cu_seqlens is not None and shift:
        labels = mask_sequence_starts(labels, cu_seqlens, ignore_index)
    tok = token_logps(logits, labels, ignore_index=ignore_index, temperature=temperature,
                      shift=shift, inplace_backward=inplace_backward, backend=backend,
                      validate=validate, process_group=process_group)
    return reduce_sequences(tok, labels, ignore_index=ignore_index, token_weights=token_weights,
                            average=average, shift=shift, cu_seqlens=cu_seqlens, validate=validate)


def mask_sequence_starts(labels, cu_seqlens, ignore_index):
    V.check_index("cu_seqlens", cu_seqlens)
    flat = labels.reshape(-1)
    start = torch.zeros(flat.numel() + 1, dtype=torch.bool, device=flat.device)
    start[cu_seqlens[:-1].to(torch.int64)] = True  # an empty last sequence lands on the spare slot
    return torch.where(start[:-1], ignore_index, flat).view(labels.shape)
