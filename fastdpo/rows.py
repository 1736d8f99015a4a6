"""Row math shared by every Python layer: written once, called by the torch backend, the fused
LM head's chunk loops, the Triton launchers' merges and the vocabulary-parallel combiner.

A row's statistics follow the contract of :mod:`fastdpo.ops`: ``row_max`` (raw logits, before the
temperature) and ``log_sum = log sum exp((x - row_max) * c)`` with ``c = 1 / temperature``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NEG_INF = float("-inf")


class LabelParts(NamedTuple):
    active: torch.Tensor  # not ignore_index
    valid: torch.Tensor   # inside [0, vocab_total)
    local: torch.Tensor   # active, valid and inside this shard's columns
    index: torch.Tensor   # column of the label when local, else 0 (always safe to gather)


def classify_labels(labels, ignore_index: int, vocab_start: int, vocab_total: int,
                    width: int) -> LabelParts:
    """The label rule of the row contract for a shard (or tile) of ``width`` columns starting
    at global id ``vocab_start``."""
    labels = labels.long()
    active = labels != ignore_index
    valid = (labels >= 0) & (labels < vocab_total)
    col = labels - vocab_start
    local = active & valid & (col >= 0) & (col < width)
    return LabelParts(active, valid, local, torch.where(local, col, 0))


def ref_point(row_max):
    """The reference the sums are taken at: the max, or 0 for a row with no finite logit (so
    ``-inf - ref`` stays ``-inf`` instead of NaN)."""
    return torch.where(row_max == NEG_INF, 0.0, row_max)


def lse(row_max, log_sum, temperature: float = 1.0):
    """The log-sum-exp of ``logits / temperature`` from a row's statistics."""
    ref = ref_point(row_max)
    return log_sum + (ref if temperature == 1.0 else ref / temperature)


def scaled_diff(x, ref, temperature: float):
    """``(x - ref) / temperature``, subtracting before scaling (exact for large ``|x|``).

    At temperature 1 that is ``x - ref``. Otherwise it is formed as ``(x / 2 - ref / 2) *
    (2 / temperature)``: halving is exact, so the rounding is that of ``x - ref``, but a row
    spanning more than the fp32 range (``3e38`` and ``-3e38``) does not overflow before a
    temperature above 1 brings it back in range. One full-size temporary.
    """
    if temperature == 1.0:
        return x - ref
    return torch.mul(x, 0.5).sub_(ref * 0.5).mul_(2.0 / temperature)


def row_stats(x, temperature: float, with_entropy: bool):
    """``(row_max, log_sum, d, entropy)`` of fp32/fp64 rows ``x`` (last dimension), with
    ``d = (x - ref) / temperature`` formed by subtracting first (:func:`scaled_diff`).

    A +inf or NaN anywhere makes the row NaN (as the kernels), an all -inf row gives
    ``row_max = log_sum = -inf``; ``entropy`` is None unless asked for. One exponential an
    element.
    """
    row_max = x.amax(dim=-1)
    d = scaled_diff(x, ref_point(row_max)[..., None], temperature)
    e = torch.exp(d)
    s = e.sum(dim=-1)
    log_sum = torch.log(s)
    ent = None
    if with_entropy:
        # H = log s - sum e d / s; masked (-inf) entries have e = 0 and add 0, not 0 * -inf
        ed = torch.where(e > 0, e.mul_(d), 0.0).sum(-1)
        ent = log_sum - ed / s
        ent = torch.where(log_sum == NEG_INF, float("nan"), ent)  # no distribution at all
    return row_max, log_sum, d, ent


def combine(logp, row_max, log_sum, entropy, holder, active, temperature: float = 1.0):
    """Global statistics of a row from ``K`` disjoint parts of its vocabulary (shards or tiles)
    stacked on dimension 0, each reported by the row op over its own columns.

    ``holder`` (``(K, ...)`` bool) marks the part whose columns hold the label: its ``logp`` is
    re-based onto the global sum; a row that no part holds gets ``-lse`` (a label logit of 0, the
    contract's off-shard value). ``entropy`` may be None. Exact and stable: every exponent is a
    part's share ``a_k = (m_k - M) * c + log_sum_k <= log_sum_k``.

    Returns ``(logp, row_max, log_sum, entropy)`` relative to the global max ``M``; rows that
    are not ``active`` (ignored) are 0 in every output, as the row ops give them.
    """
    M = row_max.amax(0)
    a = scaled_diff(row_max, ref_point(M), temperature) + log_sum                      # log of each part's share (relative to M); -inf if dead
    L = torch.logsumexp(a, dim=0)
    # a holder part with no finite logit (share -inf) makes the label's log-prob -inf, not the
    # NaN of its own -inf - -inf
    held = torch.where(holder, torch.where(a == NEG_INF, NEG_INF, logp + a), 0.0).sum(0)
    logp_g = torch.where(holder.any(0), held - L, -lse(M, L, temperature))
    ent_g = None
    if entropy is not None:
        log_w = a - L[None]
        w = torch.exp(log_w)
        # a dead part (all -inf, w = 0) has no distribution of its own: it adds nothing
        ent_g = torch.where(w > 0, w * (entropy - log_w), 0.0).sum(0)
        ent_g = torch.where(L == NEG_INF, float("nan"), ent_g)
    # an invalid label is NaN on every part (a dead part's own log-prob is NaN too, so any()
    # would turn a dead part into a NaN row; NaN logits reach L anyway)
    logp_g = torch.where(torch.isnan(logp).all(0), float("nan"), logp_g)
    out = [logp_g, M, L] + ([] if ent_g is None else [ent_g])
    out = [torch.where(active, t, 0.0) for t in out]
    return out[0], out[1], out[2], (out[3] if ent_g is not None else None)


def transform_logits_(a, logit_scale: float, softcap: float, tanh_out=None):
    """In place: ``a -> softcap * tanh(logit_scale * a / softcap)`` (Gemma-2 soft-capping), or
    ``logit_scale * a`` when ``softcap`` is 0. ``tanh_out`` keeps the tanh for the chain rule."""
    if softcap:
        a.mul_(logit_scale / softcap).tanh_()
        if tanh_out is not None:
            tanh_out.copy_(a)
        a.mul_(softcap)
    elif logit_scale != 1.0:
        a.mul_(logit_scale)
    return a


def transform_grad_(dz, tanh, logit_scale: float, softcap: float):
    """In place: ``d x -> d a`` through :func:`transform_logits_` (``tanh`` is consumed)."""
    if softcap:
        dz.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # 1 - tanh^2
    if logit_scale != 1.0:
        dz.mul_(logit_scale)
    return dz
