"""Fused LM head: log-probabilities straight from hidden states and the LM-head weight.

The ``(N, V)`` logits are never stored: kernels build them tile by tile, reduce each tile into
per-token statistics, and rebuild them in backward. Use these in place of
``token_logps(hidden @ weight.T, ...)`` / ``sequence_logps(...)``.
"""

from __future__ import annotations

import torch

from . import _validate, backends
from .autograd.linear import LinearTokenLogps, flat_rows, forward_rows
from .autograd.options import RowOptions
from .distributed import shard_setup
from .torch_backend import linear as _chunk_loops  # noqa: F401  (registers the torch/native impls)
from .sequences import check_reduction, mask_sequence_starts, reduce_sequences


def _entropy_mode(return_entropy):
    """``(with_entropy, entropy_grad)`` of ``return_entropy``: a bool, or ``"detached"``."""
    if isinstance(return_entropy, str):
        if return_entropy != "detached":
            raise ValueError(f"return_entropy must be True, False or 'detached', got "
                             f"{return_entropy!r}")
        return True, False
    return return_entropy, True


def _check(hidden, weight, labels, bias, *, ignore_index, temperature, logit_scale, softcap,
           backend, validate, shift, return_entropy, batch_invariant):
    return_entropy, _ = _entropy_mode(return_entropy)
    _validate.check_options(ignore_index=ignore_index, temperature=temperature, backend=backend,
                            validate=validate, shift=shift, return_entropy=return_entropy,
                            batch_invariant=batch_invariant)
    _validate.check_float("hidden", hidden)
    _validate.check_float("weight", weight)
    _validate.check_index("labels", labels)
    if bias is not None:
        _validate.check_float("bias", bias)
    _validate.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, H) or (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H) with H = {hidden.shape[-1]} (hidden's last "
                         f"dimension), got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(labels.shape)}")
    if shift and hidden.shape[-2] < 1:
        raise ValueError("shift=True needs at least one position")
    _validate.check_logit_transform(logit_scale, softcap)


def linear_token_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0,
                       logit_scale=1.0, softcap=None, shift=False, return_entropy=False,
                       backend="auto", validate=None, process_group=None, batch_invariant=False):
    """Per-token log-probabilities of ``labels`` under the logits ``hidden @ weight.T``, without
    storing those logits.

    The logits are ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)``
    (Gemma-2 style soft-capping; ``softcap=None`` leaves ``logit_scale * (...)``), then divided by
    ``temperature``; the result is ``log_softmax(z)[label]``.

    Args:
        hidden: ``(B, T, H)`` or ``(N, H)`` final hidden states (fp32/bf16/fp16; fp64 on the torch
            backend). Under autocast they are cast to the autocast dtype.
        weight: ``(V, H)`` LM-head weight; the matmuls run in ``hidden``'s dtype with fp32
            accumulation (weight chunks cast on the fly; on CPU in fp32). With tied embeddings
            pass the embedding matrix: its gradient accumulates with the embedding's as usual.
        labels: ``(B, T)`` or ``(N,)`` int32/int64 token ids; ``ignore_index`` marks skipped tokens.
        bias: optional ``(V,)`` LM-head bias.
        shift: pair position ``t`` with the label at ``t + 1`` (causal LM). ``hidden`` is not
            copied (unless its leading dimensions cannot be merged into one).
        return_entropy: also return each token's softmax entropy (same pass); ``"detached"``:
            as a metric without gradient, which keeps a frozen head's 2-matmul path.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        validate: check label values (default: on for CPU tensors, off for CUDA ones;
            ``validate=True`` also checks inside ``torch.compile``).
        process_group: vocabulary-parallel group; ``weight`` (and ``bias``) hold this rank's
            shard (contiguous rows, in rank order, any sizes).
        batch_invariant: a token's results (and its gradients' share) are bitwise the same
            whatever batch it is in: fixed tile shapes, padded, on every backend. Costs up to one
            tile of padding per call (see ``fastdpo bench``).

    Returns:
        log-probs shaped like ``labels`` (like ``labels[..., 1:]`` with ``shift``), 0 where
        ignored, fp32 (fp64 for fp64 inputs); with ``return_entropy`` a pair
        ``(logps, entropy)``.
    """
    _check(hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
           logit_scale=logit_scale, softcap=softcap, backend=backend, validate=validate,
           shift=shift, return_entropy=return_entropy, batch_invariant=batch_invariant)
    dev = hidden.device
    checked = _validate.checked_mode(validate, dev)
    shards = None
    vocab_start, vocab_total = 0, weight.shape[0]
    if process_group is not None:
        shards = shard_setup(labels, process_group, weight.shape[0], ignore_index, checked, dev)
        vocab_start, vocab_total = shards.vocab_start, shards.vocab_total
    if checked:
        _validate.check_label_values(labels, ignore_index, vocab_total)
    if torch.is_autocast_enabled(dev.type):  # compute in the autocast dtype, like F.linear
        hidden = hidden.to(torch.get_autocast_dtype(dev.type))
    return_entropy, entropy_grad = _entropy_mode(return_entropy)
    opts = RowOptions(backend=backends.resolve(backend, dev, hidden.dtype),
                      ignore_index=ignore_index, temperature=float(temperature),
                      vocab_start=vocab_start, vocab_total=vocab_total,
                      with_entropy=return_entropy, entropy_grad=entropy_grad, shift=shift, logit_scale=float(logit_scale),
                      softcap=float(softcap) if softcap else 0.0, shards=shards,
                      batch_invariant=batch_invariant)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        logp, ent = LinearTokenLogps.apply(hidden, weight, bias, labels, opts)
    else:  # reference pass: no graph, nothing saved
        h2, lab = flat_rows(hidden, labels, shift, ignore_index)
        logp, _, _, ent = forward_rows(opts, h2, weight, bias, lab)
        logp = logp.view(labels.shape)
        ent = ent.view(labels.shape) if return_entropy else ent
    if shift:  # the last position predicts nothing
        logp = logp[..., :-1]
        ent = ent[..., :-1] if return_entropy else ent
    return (logp, ent) if return_entropy else logp


def linear_sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100,
                          temperature=1.0, logit_scale=1.0, softcap=None, shift=False,
                          return_entropy=False, backend="auto", validate=None,
                          process_group=None, token_weights=None,
                          average=False, cu_seqlens=None, batch_invariant=False):
    """Per-sequence log-probabilities from hidden states: :func:`linear_token_logps` reduced like
    :func:`fastdpo.sequence_logps` (``token_weights``, ``average``, packed ``cu_seqlens``; with
    ``shift`` and ``cu_seqlens`` the first label of each sequence is ignored).

    With ``return_entropy`` returns ``(logps, entropy)``, the entropy reduced the same way (a
    weighted sum, or mean with ``average``, of the token entropies).
    """
    _check(hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
           logit_scale=logit_scale, softcap=softcap, backend=backend, validate=validate,
           shift=shift, return_entropy=return_entropy, batch_invariant=batch_invariant)
    check_reduction(labels, token_weights=token_weights, average=average, cu_seqlens=cu_seqlens,
                    validate=validate)
    if cu_seqlens is not None and shift:
        labels = mask_sequence_starts(labels, cu_seqlens, ignore_index)
    out = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                             temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                             shift=shift, return_entropy=return_entropy, backend=backend,
                             validate=validate, process_group=process_group,
                             batch_invariant=batch_invariant)
    red = dict(ignore_index=ignore_index, token_weights=token_weights, average=average,
               shift=shift, cu_seqlens=cu_seqlens, validate=validate)
    if return_entropy:
        tok, ent = out
        return reduce_sequences(tok, labels, **red), reduce_sequences(ent, labels, **red)
    return reduce_sequences(out, labels, **red)
