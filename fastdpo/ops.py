"""Operator schemas and fake (meta) implementations, one set per backend.

Every backend implements the same row-wise contract, so the autograd layer and the public API
never look at which backend runs:

``<backend>_logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total,
with_entropy) -> (logp, lse, entropy)``
    ``logits`` is ``(B, T, V)`` with unit vocabulary stride and any other strides; ``labels`` is
    ``(B, T)`` int32/int64 with any strides. Outputs are contiguous fp32 ``(B, T)``; ``entropy`` is
    an empty tensor unless ``with_entropy``. ``lse`` is the log-sum-exp of ``logits / temperature``.
    Ignored rows give 0 in every output and are skipped. A label outside ``[0, vocab_total)`` gives
    NaN. A NaN or +inf logit makes its row NaN; -inf logits are masked entries (a row of only -inf
    has ``lse = -inf``). ``vocab_start`` is the global id of column 0 (vocabulary-parallel shards): a valid label
    outside ``[vocab_start, vocab_start + V)`` contributes a label logit of 0, so ``logp = -lse``.

``<backend>_logps_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index,
temperature, vocab_start, vocab_total, grad_logits) -> ()``
    Writes ``d/d logits`` into ``grad_logits`` (``(B, T, V)``, unit vocabulary stride). It may be
    ``logits`` itself (in-place backward): each element is read before it is written.
    ``lse`` and ``entropy`` may be global values combined across vocabulary shards.

The native schemas are defined here and implemented in C++ (``csrc/registration.cpp``); the torch
and triton implementations are registered by their own modules through :func:`register_impl`.
"""

from __future__ import annotations

import torch

LIB_NAME = "fastdpo"
BACKENDS = ("torch", "triton", "native")

_LOGPS_FWD = (
    "(Tensor logits, Tensor labels, int ignore_index, float temperature, int vocab_start, "
    "int vocab_total, bool with_entropy) -> (Tensor, Tensor, Tensor)"
)
_LOGPS_BWD = (
    "(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor lse, "
    "Tensor? entropy, int ignore_index, float temperature, int vocab_start, int vocab_total, "
    "Tensor(a!) grad_logits) -> ()"
)
# Fused LM head: hidden (N, H), weight (V, H), bias (V,) or None, labels (N,).
_LINEAR_FWD = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
    "float temperature, float logit_scale, float softcap, int vocab_start, int vocab_total, "
    "bool with_entropy) -> (Tensor, Tensor, Tensor)"
)
_LINEAR_BWD = (
    "(Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor labels, Tensor lse, Tensor? entropy, int ignore_index, float temperature, "
    "float logit_scale, float softcap, int vocab_start, int vocab_total, bool need_hidden_grad, "
    "bool need_weight_grad, bool need_bias_grad, bool deterministic) -> (Tensor, Tensor, Tensor)"
)

SCHEMAS = {
    "logps_fwd": _LOGPS_FWD,
    "logps_bwd": _LOGPS_BWD,
    "linear_logps_fwd": _LINEAR_FWD,
    "linear_logps_bwd": _LINEAR_BWD,
}

lib = torch.library.Library(LIB_NAME, "DEF")  # noqa: TOR901 - owns the namespace


def op_name(backend: str, op: str) -> str:
    return f"{backend}_{op}"


def get_op(backend: str, op: str):
    """The ``torch.ops`` handle of ``op`` for ``backend``."""
    return getattr(torch.ops.fastdpo, op_name(backend, op)).default


def register_impl(backend: str, op: str, fn, device_types=("cpu", "cuda")) -> None:
    """Register a Python implementation of ``op`` for ``backend`` (torch and triton backends)."""
    for dt in device_types:
        torch.library.impl(f"{LIB_NAME}::{op_name(backend, op)}", dt, lib=lib)(fn)


# ---------------------------------------------------------------- fakes (shape functions)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype of the row ops."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total, with_entropy):
    B, T = labels.shape
    out = logits.new_empty((B, T), dtype=acc_dtype(logits.dtype))
    ent = logits.new_empty((B, T) if with_entropy else (0,), dtype=out.dtype)
    return out, torch.empty_like(out), ent


def _fake_logps_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index,
                    temperature, vocab_start, vocab_total, grad_logits):
    return None


def _fake_linear_fwd(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                     softcap, vocab_start, vocab_total, with_entropy):
    (N,) = labels.shape
    out = hidden.new_empty((N,), dtype=acc_dtype(hidden.dtype))
    ent = hidden.new_empty((N,) if with_entropy else (0,), dtype=out.dtype)
    return out, torch.empty_like(out), ent


def _fake_linear_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                     ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total,
                     need_hidden_grad, need_weight_grad, need_bias_grad, deterministic):
    d_h = torch.empty_like(hidden) if need_hidden_grad else hidden.new_empty((0,))
    d_w = torch.empty_like(weight) if need_weight_grad else weight.new_empty((0,))
    d_b = (torch.empty_like(bias) if (need_bias_grad and bias is not None)
           else weight.new_empty((0,)))
    return d_h, d_w, d_b


_FAKES = {
    "logps_fwd": _fake_logps_fwd,
    "logps_bwd": _fake_logps_bwd,
    "linear_logps_fwd": _fake_linear_fwd,
    "linear_logps_bwd": _fake_linear_bwd,
}

for _backend in BACKENDS:
    for _op, _schema in SCHEMAS.items():
        lib.define(op_name(_backend, _op) + _schema)
        torch.library.register_fake(f"{LIB_NAME}::{op_name(_backend, _op)}", _FAKES[_op], lib=lib)
