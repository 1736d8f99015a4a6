"""Row math on tiles, shared by the logits kernels (:mod:`.logps`) and the fused LM head
(:mod:`.linear`): written once, inlined by the compiler into each kernel.

A row's running statistics are kept relative to its running max ``m`` of the *raw* logits
(before the temperature), in base 2: ``d = (x - m) * c2`` with ``c2 = log2(e) / T``, subtracting
before scaling. ``x * c2 - m * c2`` would lose the low digits of ``|x * c2|`` at large logits or
low temperatures, and ``x * c2`` itself overflows for logits near the fp32 limit. The price is one
more operation per element (an FMA and a multiply instead of one FMA, see :func:`shifted`) in a
loop bound by memory bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_BIG: tl.constexpr = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def shifted(x, half_ref, c2):
    """``(x - ref) * c2`` given ``half_ref = ref / 2``, finite whenever the result is: ``x - ref``
    overflows for logits of opposite signs near the fp32 limit, ``x / 2 - ref / 2`` cannot, and
    (halving being exact) it rounds the same. One FMA and one multiply per element."""
    return (x * 0.5 - half_ref) * (c2 * 2.0)


@triton.jit
def fold(x, m, s, u, c2, WITH_ENTROPY: tl.constexpr):
    """Fold a tile ``x`` (rows x columns, fp32 raw logits) into per-row running statistics:
    max ``m``, ``s = sum 2^d`` and ``u = sum 2^d d`` (entropy), ``d = (x - m) * c2``.

    ``m`` starts at -FLT_MAX, so -inf logits (masked entries, tail padding) add exactly 0.
    The rescale exponent is clamped to -FLT_MAX: a finite factor keeps ``0 * delta`` at 0 when
    the max jumps by more than the fp32 range.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    half = m_new * 0.5
    delta = tl.maximum(shifted(m, half, c2), NEG_BIG)
    alpha = tl.exp2(delta)
    d = shifted(x, half[:, None], c2)
    p = tl.exp2(d)
    if WITH_ENTROPY:
        # a -inf logit has p = 0 and adds 0, not 0 * -inf
        u = alpha * u + (alpha * delta) * s + tl.sum(p * tl.maximum(d, NEG_BIG), axis=1)
    s = s * alpha + tl.sum(p, axis=1)
    return m_new, s, u


@triton.jit
def grad_coeffs(g, ge, ent, log_sum, inv_temp, HAS_GE: tl.constexpr):
    """Per-row factors of :func:`softmax_grad`: ``(g / T, a, k)``."""
    gs = g * inv_temp
    if HAS_GE:
        # d entropy / dz_j = -p_j (log p_j + H), log p_j = d_j ln2 - log_sum
        ges = ge * inv_temp
        a = ges * LN2
        k = gs + ges * (ent - log_sum)
    else:
        a = gs * 0.0
        k = gs
    return gs, a, k


@triton.jit
def softmax_grad(x, half_ref, c2, log_sum2, a, k, HAS_GE: tl.constexpr):
    """``-p (a d + k)`` with ``d = (x - ref) * c2`` and ``p = 2^(d - log_sum2)``: the gradient
    w.r.t. the raw logits, less the label's one-hot term. Entries with ``p = 0`` (-inf logits)
    get exactly 0."""
    d = shifted(x, half_ref, c2)
    p = tl.exp2(d - log_sum2)
    if HAS_GE:
        dz = -p * tl.where(p > 0.0, a * d + k, k)
    else:
        dz = -p * k
    return dz
