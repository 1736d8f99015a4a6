"""Operator schemas and fake (meta) implementations, one set per backend.

Every backend implements the same row-wise contract, so the autograd layer and the public API
never look at which backend runs. A *row* is one token: the logits ``x`` of its vocabulary (or of
one vocabulary shard), ``c = 1 / temperature``.

``<backend>_logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total,
with_entropy) -> (logp, row_max, log_sum, entropy)``
    ``logits`` is ``(B, T, V)`` with unit vocabulary stride and any other strides; ``labels`` is
    ``(B, T)`` int32/int64 with any strides. Outputs are contiguous ``(B, T)``, fp32 (fp64 for
    fp64 logits, which only the torch backend takes); ``entropy`` is an empty tensor unless
    ``with_entropy``.

    * ``row_max = max_j x_j`` of the raw logits (before the temperature),
    * ``log_sum = log sum_j exp((x_j - row_max) * c)`` (in ``[0, log V]`` for finite rows),
    * so ``lse = row_max * c + log_sum`` (:func:`fastdpo.rows.lse`), but the two are kept apart:
      every consumer works with ``(x - row_max) * c``, which is exact to fp32 rounding at any
      logit offset or temperature, where ``x * c - lse`` loses the digits of ``|x * c|``.
    * ``logp = (x_label - row_max) * c - log_sum``.

    Ignored rows give 0 in every output and are skipped. A label outside ``[0, vocab_total)``
    gives NaN. A NaN or +inf logit makes its row NaN; -inf logits are masked entries; a row of
    only -inf has ``row_max = log_sum = -inf``. ``vocab_start`` is the global id of column 0
    (vocabulary shards and tiles): a valid label outside ``[vocab_start, vocab_start + V)`` is
    *off-shard* and its ``logp`` is ``-lse`` (a label logit of 0); combiners ignore it.

``<backend>_logps_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
ignore_index, temperature, vocab_start, vocab_total, grad_logits) -> ()``
    Writes ``d/d logits`` into ``grad_logits`` (``(B, T, V)``, unit vocabulary stride). It may be
    ``logits`` itself (in-place backward): each element is read before it is written.
    ``p_j = exp((x_j - row_max) * c - log_sum)``; the pair may be the global values of all shards
    (any reference point ``row_max >= x_j`` works with its matching ``log_sum``).

``<backend>_linear_logps_fwd`` / ``_bwd``: the same contract for the fused LM head, whose logits
``x = transform(hidden @ weight.T + bias)`` (:func:`fastdpo.rows.transform_logits`) never exist
in full. ``hidden`` is ``(N, H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` or None, ``labels``
``(N,)``; outputs ``(N,)``. The backward returns ``(d_hidden, d_weight, d_bias)`` (empty where not
needed). ``batch_invariant``: a row's results are bitwise the same whatever the other rows (fixed
tile shapes and reduction order, no size-dependent matmul choices).

The native schemas are defined here and implemented in C++ (``csrc/registration.cpp``); the torch
and triton implementations are registered by their own modules through :func:`register_impl`.
"""

from __future__ import annotations

import torch

LIB_NAME = "fastdpo"
BACKENDS = ("torch", "triton", "native")

_LOGPS_FWD = (
    "(Tensor logits, Tensor labels, int ignore_index, float temperature, int vocab_start, "
    "int vocab_total, bool with_entropy) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LOGPS_BWD = (
    "(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor row_max, "
    "Tensor log_sum, Tensor? entropy, int ignore_index, float temperature, int vocab_start, "
    "int vocab_total, Tensor(a!) grad_logits) -> ()"
)
# Fused LM head: hidden (N, H), weight (V, H), bias (V,) or None, labels (N,).
_LINEAR_FWD = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
    "float temperature, float logit_scale, float softcap, int vocab_start, int vocab_total, "
    "bool with_entropy, bool batch_invariant) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LINEAR_BWD = (
    "(Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor labels, Tensor row_max, Tensor log_sum, Tensor? entropy, int ignore_index, "
    "float temperature, float logit_scale, float softcap, int vocab_start, int vocab_total, "
    "bool need_hidden_grad, bool need_weight_grad, bool need_bias_grad, bool batch_invariant) "
    "-> (Tensor, Tensor, Tensor)"
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
    """Accumulation and output dtype of the row ops: fp64 for fp64 inputs (torch backend only),
    fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_outputs(like, rows: tuple, with_entropy: bool):
    acc = acc_dtype(like.dtype)
    out = like.new_empty(rows, dtype=acc)
    ent = like.new_empty(rows if with_entropy else (0,), dtype=acc)
    return out, torch.empty_like(out), torch.empty_like(out), ent


def _fake_logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total,
                    with_entropy):
    torch._check(logits.dim() == 3, lambda: f"logits must be (B, T, V), got {logits.shape}")
    torch._check(labels.shape == logits.shape[:2],
                 lambda: f"labels {labels.shape} do not match logits {logits.shape}")
    return _row_outputs(logits, tuple(labels.shape), with_entropy)


def _fake_logps_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                    ignore_index, temperature, vocab_start, vocab_total, grad_logits):
    torch._check(grad_logits.shape == logits.shape,
                 lambda: f"grad_logits {grad_logits.shape} does not match logits {logits.shape}")
    for name, t in (("grad_logp", grad_logp), ("row_max", row_max), ("log_sum", log_sum)):
        torch._check(t.shape == labels.shape,
                     lambda: f"{name} {t.shape} does not match labels {labels.shape}")
    return None


def _fake_linear_fwd(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                     softcap, vocab_start, vocab_total, with_entropy, batch_invariant):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1],
                 lambda: f"hidden {hidden.shape} and weight {weight.shape} must be (N, H), (V, H)")
    torch._check(labels.shape == hidden.shape[:1],
                 lambda: f"labels {labels.shape} do not match hidden {hidden.shape}")
    return _row_outputs(hidden, tuple(labels.shape), with_entropy)


def _fake_linear_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum,
                     entropy, ignore_index, temperature, logit_scale, softcap, vocab_start,
                     vocab_total, need_hidden_grad, need_weight_grad, need_bias_grad,
                     batch_invariant):
    torch._check(row_max.shape == labels.shape and log_sum.shape == labels.shape,
                 lambda: "row statistics do not match labels")
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

# dtypes of the logits / hidden states each backend's kernels take (fp64: the torch backend,
# for gradcheck and as the oracle's twin).
DTYPES = {
    "torch": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "native": (torch.float32, torch.bfloat16, torch.float16),
}


# Position of the logits / hidden states among each op's arguments.
_INPUT_ARG = {"logps_fwd": 0, "logps_bwd": 2, "linear_logps_fwd": 0, "linear_logps_bwd": 2}


def _fake_for(backend: str, op: str):
    fake, pos = _FAKES[op], _INPUT_ARG[op]

    def checked(*args):
        x = args[pos]
        torch._check(x.dtype in DTYPES[backend],
                     lambda: f"the {backend} backend does not take {x.dtype} inputs")
        return fake(*args)

    return checked


# Native CPU only: a frozen head's forward (the weight and bias need no gradient) returning each
# token's ``u = d logp / d hidden`` as well, ``(N, H)`` fp32 (0 on ignored rows), so the backward
# is ``grad_logp * u`` (:func:`fastdpo.autograd.linear_loss.frozen_head_forward`); with
# ``with_entropy`` also the entropy (a metric, no gradient), else an empty 5th output.
_LINEAR_FROZEN_FWD = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
    "float temperature, float logit_scale, float softcap, bool batch_invariant, "
    "bool with_entropy=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _fake_linear_frozen_fwd(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                            softcap, batch_invariant, with_entropy=False):
    torch._check(hidden.dtype in DTYPES["native"],
                 lambda: f"the native backend does not take {hidden.dtype} inputs")
    logp, row_max, log_sum, ent = _fake_linear_fwd(hidden, weight, bias, labels, ignore_index,
                                                   temperature, logit_scale, softcap, 0, 0,
                                                   with_entropy, batch_invariant)
    return (logp, row_max, log_sum, hidden.new_empty(tuple(hidden.shape), dtype=torch.float32),
            ent)


lib.define("native_linear_frozen_fwd" + _LINEAR_FROZEN_FWD)
torch.library.register_fake(f"{LIB_NAME}::native_linear_frozen_fwd", _fake_linear_frozen_fwd,
                            lib=lib)

# Native CPU only: one chunk of a trainable head with its logits kept, so the backward needs no
# recompute (3 GEMMs; :class:`fastdpo.autograd.linear_native.KeptChunks`). The forward writes the
# transformed logits into ``keep`` (``fastdpo.native._C.linear_keep_numel`` fp32 floats, tile by
# tile) and returns ``(logp, row_max, log_sum)``; the backward forms ``d logits`` there in place,
# adds ``d_weight`` / ``d_bias`` into the fp32 accumulators it is given (empty: not wanted) and
# returns ``d_hidden`` (empty unless ``need_hidden_grad``).
_LINEAR_KEEP_FWD = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
    "float temperature, float logit_scale, float softcap, bool batch_invariant, "
    "Tensor(a!) keep, bool with_entropy=False) -> (Tensor, Tensor, Tensor, Tensor)"
)
_LINEAR_KEEP_BWD = (
    "(Tensor(a!) keep, Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor labels, Tensor row_max, Tensor log_sum, int ignore_index, float temperature, "
    "float logit_scale, float softcap, bool batch_invariant, bool need_hidden_grad, "
    "Tensor(b!) d_weight, Tensor(c!) d_bias) -> Tensor"
)


def _fake_linear_keep_fwd(hidden, weight, bias, labels, ignore_index, temperature, logit_scale,
                          softcap, batch_invariant, keep, with_entropy=False):
    torch._check(hidden.dtype in DTYPES["native"],
                 lambda: f"the native backend does not take {hidden.dtype} inputs")
    n = hidden.shape[0]
    return tuple(hidden.new_empty((k,), dtype=torch.float32)
                 for k in (n, n, n, n if with_entropy else 0))


def _fake_linear_keep_bwd(keep, grad_logp, hidden, weight, bias, labels, row_max, log_sum,
                          ignore_index, temperature, logit_scale, softcap, batch_invariant,
                          need_hidden_grad, d_weight, d_bias):
    return hidden.new_empty(tuple(hidden.shape) if need_hidden_grad else (0,))


lib.define("native_linear_keep_fwd" + _LINEAR_KEEP_FWD)
lib.define("native_linear_keep_bwd" + _LINEAR_KEEP_BWD)
torch.library.register_fake(f"{LIB_NAME}::native_linear_keep_fwd", _fake_linear_keep_fwd, lib=lib)
torch.library.register_fake(f"{LIB_NAME}::native_linear_keep_bwd", _fake_linear_keep_bwd, lib=lib)

for _backend in BACKENDS:
    for _op, _schema in SCHEMAS.items():
        lib.define(op_name(_backend, _op) + _schema)
        torch.library.register_fake(f"{LIB_NAME}::{op_name(_backend, _op)}",
                                    _fake_for(_backend, _op), lib=lib)
