"""Public log-probability functions over logits: ``token_logps`` and ``sequence_logps``."""

from __future__ import annotations

import torch

from . import _validate, backends
from .autograd.logps import LabelSetLogps, TokenLogps, forward_rows, rows_view
from .autograd.options import RowOptions
from .distributed import shard_setup
from .sequences import check_reduction, mask_sequence_starts, reduce_sequences


def _as_rows(logits, labels):
    """``(B, T, V)`` logits and ``(B, T)`` / ``(B, T, k)`` labels viewing inputs of any leading
    shape ``(..., V)``, and whether the labels carry ``k`` ids a position. Never copies."""
    _validate.check_float("logits", logits)
    _validate.check_index("labels", labels)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., V) with at least one leading dimension, got "
                         f"shape {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    multi = labels.dim() == logits.dim() and tuple(labels.shape[:-1]) == lead
    if not multi and tuple(labels.shape) != lead:
        raise ValueError(f"labels must have shape {lead} (or {lead + ('k',)} for k ids a "
                         f"position) to match logits {tuple(logits.shape)}, got "
                         f"{tuple(labels.shape)}")
    if logits.dim() <= 3:
        return logits, labels, multi
    rows_ = (-1, lead[-1])
    try:
        x = logits.view(rows_ + logits.shape[-1:])
    except RuntimeError as exc:
        raise ValueError(f"logits of shape {tuple(logits.shape)} and strides "
                         f"{tuple(logits.stride())} cannot be viewed as (B, T, V) rows; pass a "
                         "contiguous tensor") from exc
    return x, labels.reshape(rows_ + labels.shape[len(lead):]), multi


def token_logps(logits, labels, *, ignore_index=-100, temperature=1.0, shift=False,
                return_entropy=False, return_lse=False, inplace_backward=False, backend="auto",
                validate=None, process_group=None):
    """Per-token log-probabilities ``log softmax(logits / temperature)[label]``.

    Args:
        logits: ``(..., V)`` (typically ``(B, T, V)`` or ``(N, V)``), fp32/bf16/fp16 (fp64 on the
            torch backend), unit stride along the vocabulary.
        labels: int32/int64 token ids shaped like ``logits.shape[:-1]``, or with one more
            dimension ``k`` for several ids a position (log-probs ``(..., k)``, as for
            distillation); ``ignore_index`` marks skipped tokens.
        shift: pair logits at position ``t`` with the label at ``t + 1`` (causal LM), no copy.
        return_entropy: also return each token's softmax entropy (same pass).
        return_lse: also return each token's log-sum-exp of ``logits / temperature``
            (differentiable, e.g. for a z-loss).
        inplace_backward: write the gradient into the logits' own storage. The logits are
            destroyed by backward; do not reuse them (or anything viewing them) afterwards:
            autograd sees the write, so a second backward through them raises.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        validate: check label values (and ``cu_seqlens``). Default: on for CPU tensors, off for
            CUDA ones (it would synchronise the host). Unchecked out-of-range labels give NaN.
            ``validate=True`` also checks inside ``torch.compile`` (an asynchronous assertion).
        process_group: vocabulary-parallel group; the logits hold this rank's vocabulary shard
            (contiguous, in rank order, any sizes).

    Returns:
        log-probs shaped like ``labels`` (like ``labels[..., 1:]`` with ``shift``), 0 where
        ignored, fp32 (fp64 for fp64 logits); with ``return_entropy`` / ``return_lse`` a tuple
        ``(logps, entropy, lse)`` of the ones asked for.
    """
    temperature = _validate.check_options(
        ignore_index=ignore_index, temperature=temperature, backend=backend, validate=validate,
        shift=shift, return_entropy=return_entropy, return_lse=return_lse,
        inplace_backward=inplace_backward)
    out_shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else None
    logits, labels, multi = _as_rows(logits, labels)
    _validate.check_logits_labels(logits, labels[..., 0] if multi else labels, shift=shift)
    if inplace_backward:
        _validate.check_no_overlap("logits", logits)
    extras = multi or return_lse
    if extras and process_group is not None:
        raise ValueError("several labels a position and return_lse are not supported with "
                         "process_group")
    checked = _validate.checked_mode(validate, logits.device)
    shards = None
    vocab_start, vocab_total = 0, logits.shape[-1]
    if process_group is not None:
        shards = shard_setup(labels, process_group, logits.shape[-1], ignore_index, checked,
                             logits.device)
        vocab_start, vocab_total = shards.vocab_start, shards.vocab_total
    if checked:
        _validate.check_label_values(labels, ignore_index, vocab_total)
    opts = RowOptions(backend=backends.resolve(backend, logits.device, logits.dtype),
                      ignore_index=ignore_index, temperature=float(temperature),
                      vocab_start=vocab_start, vocab_total=vocab_total,
                      with_entropy=return_entropy, shift=shift,
                      inplace_backward=inplace_backward, shards=shards)
    if multi or return_lse:
        lab = labels if multi else labels[..., None]
        logp, ent, lse = LabelSetLogps.apply(logits, lab, opts)
        logp = logp if multi else logp.squeeze(-1)
    elif torch.is_grad_enabled() and logits.requires_grad:
        logp, ent = TokenLogps.apply(logits, labels, opts)
    else:  # reference pass: no graph, nothing saved
        x3, l3 = rows_view(logits, labels, shift)
        logp, _, _, ent = forward_rows(opts, x3, l3)
    lead = out_shape[:-1] if multi else out_shape
    if shift:
        lead = lead[:-1] + (lead[-1] - 1,)
    outs = [logp.reshape(lead + out_shape[-1:] if multi else lead)]
    if return_entropy:
        outs.append(ent.reshape(lead))
    if return_lse:
        outs.append(lse.reshape(lead))
    return outs[0] if len(outs) == 1 else tuple(outs)


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
    _validate.check_options(ignore_index=ignore_index, temperature=temperature, backend=backend,
                            validate=validate, shift=shift, inplace_backward=inplace_backward)
    _validate.check_logits_labels(logits, labels, shift=shift)
    check_reduction(labels, token_weights=token_weights, average=average, cu_seqlens=cu_seqlens,
                    validate=validate)
    if cu_seqlens is not None and shift:
        labels = mask_sequence_starts(labels, cu_seqlens, ignore_index)
    tok = token_logps(logits, labels, ignore_index=ignore_index, temperature=temperature,
                      shift=shift, inplace_backward=inplace_backward, backend=backend,
                      validate=validate, process_group=process_group)
    return reduce_sequences(tok, labels, ignore_index=ignore_index, token_weights=token_weights,
                            average=average, shift=shift, cu_seqlens=cu_seqlens, validate=validate)
