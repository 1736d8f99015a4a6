"""Fused LM head: log-probabilities straight from hidden states and the LM-head weight.

The ``(N, V)`` logits are never stored: kernels build them tile by tile, reduce each tile into
per-token statistics, and rebuild them in backward. Use these in place of
``token_logps(hidden @ weight.T, ...)`` / ``sequence_logps(...)``.
"""

from __future__ import annotations

import importlib
import math

import torch

from . import _validate as V
from . import backends
from .autograd.linear import LinearTokenLogps, flat_rows, forward_rows
from .chunked import linear as _chunked_linear  # noqa: F401  (torch + native linear impls)
from .logps import mask_sequence_starts, reduce_sequences

# Modules registering the linear ops of each backend (the torch module also registers the
# native variant: the same chunk loop around the C++ row kernels).
_IMPL_MODULES = {"torch": "fastdpo.chunked.linear", "native": "fastdpo.chunked.linear",
                 "triton": "fastdpo.triton.linear"}


def ensure_impls(backend: str) -> None:
    """Import the module registering ``backend``'s linear ops (after :func:`backends.resolve`).

    Skipped while torch.compile traces (imports break the graph); the torch/native impls are
    imported with this module and :func:`backends.resolve` loads the triton ones."""
    if not torch.compiler.is_compiling():
        importlib.import_module(_IMPL_MODULES[backend])


def _check(hidden, weight, labels, bias, shift, temperature, logit_scale, softcap):
    V.check_float("hidden", hidden)
    V.check_float("weight", weight)
    V.check_index("labels", labels)
    if bias is not None:
        V.check_float("bias", bias)
    V.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
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
    V.check_temperature(temperature)
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale)
            and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0
                                    and math.isfinite(softcap)):
        raise ValueError(f"softcap must be None (off) or a positive number, got {softcap!r}")


def _linear_token_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0,
                        logit_scale=1.0, softcap=None, shift=False, return_entropy=False,
                        backend="auto", validate=None, deterministic=False, vocab_start=0,
                        vocab_total=None, shards=None):
    """:func:`linear_token_logps` on one vocabulary shard (``weight`` holds rows
    ``[vocab_start, vocab_start + V)`` of ``vocab_total``); the output follows the row contract of
    :mod:`fastdpo.ops` for shards (a label elsewhere counts a logit of 0)."""
    _check(hidden, weight, labels, bias, shift, temperature, logit_scale, softcap)
    vocab_total = weight.shape[0] if vocab_total is None else vocab_total
    if V.checked_mode(validate, hidden.device):
        V.check_label_values(labels, ignore_index, vocab_total)
    dev = hidden.device
    if torch.is_autocast_enabled(dev.type):  # compute in the autocast dtype, like F.linear
        hidden = hidden.to(torch.get_autocast_dtype(dev.type))
    be = backends.resolve(backend, dev, hidden.dtype)
    ensure_impls(be)
    softcap = float(softcap) if softcap else 0.0
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        logp, ent = LinearTokenLogps.apply(hidden, weight, bias, labels, be, ignore_index,
                                           temperature, logit_scale, softcap, shift,
                                           return_entropy, deterministic, vocab_start, vocab_total,
                                           shards)
    else:  # reference pass: no graph, nothing saved
        h2, lab = flat_rows(hidden, labels, shift, ignore_index)
        logp, lse, ent = forward_rows(be, h2, weight, bias, lab, ignore_index, temperature,
                                      logit_scale, softcap, vocab_start, vocab_total,
                                      return_entropy)
        if shards is not None:
            logp, _, ent = shards.combine(logp, lse, ent, lab, weight.shape[0])
        logp = logp.view(labels.shape)
        ent = ent.view(labels.shape) if return_entropy else ent
    if shift:  # the last position predicts nothing
        logp = logp[..., :-1]
        ent = ent[..., :-1] if return_entropy else ent
    return (logp, ent) if return_entropy else logp


def linear_token_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0,
                       logit_scale=1.0, softcap=None, shift=False, return_entropy=False,
                       backend="auto", validate=None, deterministic=False, process_group=None):
    """Per-token log-probabilities of ``labels`` under the logits ``hidden @ weight.T``, without
    storing those logits.

    The logits are ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)``
    (Gemma-2 style soft-capping; ``softcap=None`` leaves ``logit_scale * (...)``), then divided by
    ``temperature``; the result is ``log_softmax(z)[label]``.

    Args:
        hidden: ``(B, T, H)`` or ``(N, H)`` final hidden states (fp32/bf16/fp16; fp64 on the torch
            and native backends). Under autocast they are cast to the autocast dtype.
        weight: ``(V, H)`` LM-head weight; the matmuls run in ``hidden``'s dtype with fp32
            accumulation (weight chunks cast on the fly; on CPU in fp32). With tied embeddings
            pass the embedding matrix: its gradient accumulates with the embedding's as usual.
        labels: ``(B, T)`` or ``(N,)`` int32/int64 token ids; ``ignore_index`` marks skipped tokens.
        bias: optional ``(V,)`` LM-head bias.
        shift: pair position ``t`` with the label at ``t + 1`` (causal LM). ``hidden`` is not
            copied (unless its leading dimensions cannot be merged into one).
        return_entropy: also return each token's softmax entropy (same pass).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        validate: check label values (default: on for CPU tensors, off for CUDA ones).
        deterministic: bitwise-repeatable gradients. Every current kernel already is (fixed
            reduction order, no atomics); the flag forbids any faster non-deterministic path.
        process_group: vocabulary-parallel group; ``weight`` (and ``bias``) hold this rank's shard.

    Returns:
        fp32 log-probs shaped like ``labels`` (like ``labels[..., 1:]`` with ``shift``), 0 where
        ignored; with ``return_entropy`` a pair ``(logps, entropy)``.
    """
    kw = dict(bias=bias, ignore_index=ignore_index, temperature=temperature,
              logit_scale=logit_scale, softcap=softcap, shift=shift,
              return_entropy=return_entropy, backend=backend, validate=validate,
              deterministic=deterministic)
    if process_group is not None:
        from .distributed import vocab_parallel_linear_token_logps

        return vocab_parallel_linear_token_logps(hidden, weight, labels,
                                                 process_group=process_group, **kw)
    return _linear_token_logps(hidden, weight, labels, **kw)


def linear_sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100,
                          temperature=1.0, logit_scale=1.0, softcap=None, shift=False,
                          return_entropy=False, backend="auto", validate=None,
                          deterministic=False, process_group=None, token_weights=None,
                          average=False, cu_seqlens=None):
    """Per-sequence log-probabilities from hidden states: :func:`linear_token_logps` reduced like
    :func:`fastdpo.sequence_logps` (``token_weights``, ``average``, packed ``cu_seqlens``; with
    ``shift`` and ``cu_seqlens`` the first label of each sequence is ignored).

    With ``return_entropy`` returns ``(logps, entropy)``, the entropy reduced the same way (a
    weighted sum, or mean with ``average``, of the token entropies).
    """
    if cu_seqlens is not None and shift:
        labels = mask_sequence_starts(labels, cu_seqlens, ignore_index)
    out = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                             temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                             shift=shift, return_entropy=return_entropy, backend=backend,
                             validate=validate, deterministic=deterministic,
                             process_group=process_group)
    red = dict(ignore_index=ignore_index, token_weights=token_weights, average=average,
               shift=shift, cu_seqlens=cu_seqlens, validate=validate)
    if return_entropy:
        tok, ent = out
        return reduce_sequences(tok, labels, **red), reduce_sequences(ent, labels, **red)
    return reduce_sequences(out, labels, **red)
