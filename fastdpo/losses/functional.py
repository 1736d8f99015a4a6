"""Per-pair formulas of the DPO-family losses, each with its closed-form derivative.

Every loss type is one function ``term(kind, x, cfg) -> (loss, vjp)``: ``loss`` is the per-pair
loss ``(B,)`` and ``vjp(g)`` maps the upstream per-pair gradient ``g`` to gradients of the inputs
(a dict keyed ``pc pr rc rr s m`` = policy chosen/rejected, reference chosen/rejected, target
probabilities, reward margins). The derivatives are computed together with the loss in forward and
kept (``O(B)`` tensors), so backward is a multiply (plus a scatter for the sorting losses).

Numerics follow TRL 1.16's ``DPOTrainer`` (``trl/trainer/dpo_trainer.py``) term by term, but every
``log(sigmoid(.))`` is a ``logsigmoid`` and every ``1 - sigmoid(x)`` is ``sigmoid(-x)``, so the
losses and gradients stay finite and accurate for implicit-reward gaps of 1e4 in fp32 (DiscoPOP's
``exp(-x) * sigmoid(x / tau)`` is evaluated as ``exp(-x + logsigmoid(x / tau))``, which TRL turns
into ``inf * 0 = nan`` for very negative ``x``).

Notation: ``c = pc - rc`` and ``r = pr - rr`` are the chosen / rejected log-ratios; ``d`` the score
difference (``f(c)/nc - f(r)/nr`` with the f-divergence score ``f`` and, for ``ipo`` and
``sigmoid_norm``, the completion lengths ``nc``/``nr``); ``x = beta * d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# TRL 1.16's loss types, then ours.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
LOSS_TYPES = TRL_LOSS_TYPES + ("soft", "distill")
# Losses of the score difference d alone (optionally length-normalised): the f-divergence applies.
DELTA_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm", "soft",
               "distill")
NORM_TYPES = ("ipo", "sigmoid_norm")  # d uses per-token (length-normalised) log-ratios
# As TRL: only losses built on the chosen-minus-rejected difference generalise to f-divergences.
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                      "sft", "soft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
LABEL_SMOOTHING_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")


def margin_only(cfg: LossConfig) -> bool:
    """Whether every term's pair gradient is ``g_rejected = -g_chosen``: each a loss of the
    difference of the raw log-ratios (no f-divergence score, no length normalisation)."""
    return cfg.f_divergence_type == "reverse_kl" and all(
        t in DELTA_TYPES and t not in NORM_TYPES for t in cfg.loss_types)


@dataclass(frozen=True)
class LossConfig:
    beta: float
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    reduction: str = "mean"


@dataclass
class PairInputs:
    """The loss inputs in the compute dtype (fp32, or fp64 when any input is fp64)."""
    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    s: torch.Tensor | None = None       # target probabilities (soft)
    m: torch.Tensor | None = None       # reward-model margins (distill)
    nc: torch.Tensor | None = None      # chosen completion lengths (token counts)
    nr: torch.Tensor | None = None      # rejected completion lengths
    bco_delta: torch.Tensor | float = 0.0


Grads = dict[str, torch.Tensor]
Vjp = Callable[[torch.Tensor], Grads]


def _local(dc: torch.Tensor, dr: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> Vjp:
    """VJP of a loss whose pair i depends only on pair i's log-ratios (c = pc - rc, r = pr - rr)."""
    def vjp(g):
        gc, gr = g * dc, g * dr
        out = {"pc": gc, "rc": -gc, "pr": gr, "rr": -gr}
        for k, v in (extra or {}).items():
            out[k] = g * v
        return out
    return vjp


def f_score(lr: torch.Tensor, cfg: LossConfig):
    """f-DPO score of a log-ratio and its derivative (``None`` = 1), as TRL computes it."""
    kind = cfg.f_divergence_type
    if kind == "reverse_kl":
        return lr, None
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        e = torch.exp(-lr)
        return 1 - e, e
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(lr), torch.sigmoid(-lr)
    a = cfg.f_alpha_divergence_coef  # alpha_divergence: f'(t) = (t^(a-1) - 1) / (a - 1)
    if abs(a - 1.0) < 1e-6:  # the a -> 1 limit is reverse KL
        return lr, None
    t = (a - 1.0) * lr
    clamp_max = 80.0  # TRL clamps the exponent so exp() stays finite in fp32/bf16
    e = torch.exp(torch.clamp(t, max=clamp_max))
    return (e - 1.0) / (a - 1.0), torch.where(t <= clamp_max, e, torch.zeros_like(e))


def soft_phi(x: torch.Tensor, s, beta: float):
    """``-s log sigmoid(x) - (1 - s) log sigmoid(-x)`` and its derivative in ``d`` (x = beta d).

    Written so that ``s = 1`` reproduces ``sigmoid`` bit for bit: ``-1 * a - 0 * b == -a`` and
    ``beta * (-1 * q + 0 * p) == -beta * q``.
    """
    lp, lq = F.logsigmoid(x), F.logsigmoid(-x)
    loss = -(s * lp) - (1 - s) * lq
    dphi = beta * (-(s * torch.sigmoid(-x)) + (1 - s) * torch.sigmoid(x))
    return loss, dphi


def hinge_phi(d: torch.Tensor, beta: float):
    """``relu(1 - beta d)`` and its derivative in ``d``."""
    t = 1 - beta * d
    return torch.relu(t), (t > 0).to(d.dtype) * -beta


def ipo_phi(d: torch.Tensor, beta: float):
    """``(d - 1 / (2 beta))^2`` and its derivative in ``d``."""
    t = d - 1 / (2 * beta)
    return t * t, 2 * t


def _phi(kind: str, d: torch.Tensor, x_in: PairInputs, cfg: LossConfig):
    """Loss of the score difference ``d``, ``dloss/dd`` and gradients of extra inputs."""
    b, eps = cfg.beta, cfg.label_smoothing
    x = b * d
    if kind in ("sigmoid", "sigmoid_norm"):
        return -F.logsigmoid(x), -b * torch.sigmoid(-x), {}
    if kind == "hinge":
        return (*hinge_phi(d, b), {})
    if kind == "ipo":  # on per-token log-ratios
        return (*ipo_phi(d, b), {})
    if kind == "exo_pair":
        # KL(softmax(x, 0) || (1 - eps, eps)); derivative sigma(x) sigma(-x) (x - logit(1 - eps))
        p, q = torch.sigmoid(x), torch.sigmoid(-x)
        log_pw, log_pl = math.log1p(-eps), math.log(eps)
        loss = p * (F.logsigmoid(x) - log_pw) + q * (F.logsigmoid(-x) - log_pl)
        return loss, b * p * q * (x - (log_pw - log_pl)), {}
    if kind == "robust":
        p, q = torch.sigmoid(x), torch.sigmoid(-x)
        z = 1 - 2 * eps
        loss = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / z
        return loss, b * (-(1 - eps) * q - eps * p) / z, {}
    if kind == "discopop":
        # (1 - m) softplus(-x) + m exp(-x), m = sigmoid(x / tau)
        tau = cfg.discopop_tau
        lm, l1m = F.logsigmoid(x / tau), F.logsigmoid(-x / tau)
        m, one_m = torch.sigmoid(x / tau), torch.sigmoid(-x / tau)
        sp = -F.logsigmoid(x)
        em = torch.exp(-x + lm)  # exp(-x) * m without inf * 0
        loss = sp * one_m + em
        dx = -torch.sigmoid(-x) * one_m - em + (torch.exp(-x + lm + l1m) - sp * m * one_m) / tau
        return loss, b * dx, {}
    if kind == "soft":
        loss, dphi = soft_phi(x, x_in.s, b)
        return loss, dphi, {"s": -x}
    if kind == "distill":  # regress the implicit reward margin on the reward model's margin
        t = x - x_in.m
        return t * t, 2 * b * t, {"m": -2 * t}
    raise AssertionError(kind)


def _delta_term(kind: str, x_in: PairInputs, cfg: LossConfig):
    c, r = x_in.pc - x_in.rc, x_in.pr - x_in.rr
    sc, dsc = f_score(c, cfg)
    sr, dsr = f_score(r, cfg)
    one = torch.ones_like(c)
    dsc = one if dsc is None else dsc
    dsr = one if dsr is None else dsr
    if kind in NORM_TYPES and x_in.nc is not None:
        nc, nr = x_in.nc.clamp(min=1), x_in.nr.clamp(min=1)  # as TRL: empty completions count 1
        sc, dsc = sc / nc, dsc / nc
        sr, dsr = sr / nr, dsr / nr
    loss, dphi, extra = _phi(kind, sc - sr, x_in, cfg)
    return loss, _local(dphi * dsc, -dphi * dsr, extra)


def _pointwise_term(kind: str, x_in: PairInputs, cfg: LossConfig):
    """Losses of the chosen and rejected log-ratios separately (no f-divergence)."""
    b = cfg.beta
    c, r = x_in.pc - x_in.rc, x_in.pr - x_in.rr
    sig = torch.sigmoid
    if kind == "nca_pair":
        a, z = b * c, b * r
        loss = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-z)
        return loss, _local(b * (0.5 * sig(a) - sig(-a)), 0.5 * b * sig(z))
    if kind == "bco_pair":  # bco_delta = 0 is TRL 1.16; a running reward mean is older TRL's BCO
        a, z = b * c - x_in.bco_delta, b * r - x_in.bco_delta
        loss = -F.logsigmoid(a) - F.logsigmoid(-z)
        return loss, _local(-b * sig(-a), b * sig(z))
    if kind == "sppo_hard":
        tc, tr = c - 0.5 / b, r + 0.5 / b
        return tc * tc + tr * tr, _local(2 * tc, 2 * tr)
    if kind == "apo_zero":  # (1 - sigmoid(a)) + sigmoid(z)
        a, z = b * c, b * r
        loss = sig(-a) + sig(z)
        return loss, _local(-b * sig(a) * sig(-a), b * sig(z) * sig(-z))
    if kind == "apo_down":  # sigmoid(a) + (1 - sigmoid(beta (c - r)))
        a, x = b * c, b * (c - r)
        loss = sig(a) + sig(-x)
        sx = b * sig(x) * sig(-x)
        return loss, _local(b * sig(a) * sig(-a) - sx, sx)
    raise AssertionError(kind)


def _scatter(perm: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(v).scatter_(0, perm, v)


def _aot_term(kind: str, x_in: PairInputs, cfg: LossConfig):
    """AOT: the loss of sorted log-ratio differences; pair i of the output is rank i, not pair i."""
    eps = cfg.label_smoothing
    if kind == "aot":  # sort(pc - pr) against sort(rc - rr)
        u, v = x_in.pc - x_in.pr, x_in.rc - x_in.rr
    else:  # aot_unpaired: sort(c) against sort(r)
        u, v = x_in.pc - x_in.rc, x_in.pr - x_in.rr
    us, iu = torch.sort(u, dim=0)
    vs, iv = torch.sort(v, dim=0)
    loss, dphi = soft_phi(cfg.beta * (us - vs), 1 - eps, cfg.beta)

    def vjp(g):
        gu, gv = _scatter(iu, g * dphi), _scatter(iv, -g * dphi)
        if kind == "aot":
            return {"pc": gu, "pr": -gu, "rc": gv, "rr": -gv}
        return {"pc": gu, "rc": -gu, "pr": gv, "rr": -gv}
    return loss, vjp


def _sft_term(x_in: PairInputs, cfg: LossConfig):
    """TRL's ``sft``: minus the mean chosen per-token log-prob over the batch, on every pair."""
    nll, dnll = nll_term(x_in.pc, x_in.nc)
    loss = nll.expand_as(x_in.pc)

    def vjp(g):
        return {"pc": (g.sum() * dnll).expand_as(g)}
    return loss, vjp


def nll_term(logps: torch.Tensor, lengths: torch.Tensor):
    """Token-mean negative log-likelihood ``-sum(logps) / sum(lengths)`` (the total clamped to
    >= 1) of summed sequence log-probs, and its derivative in each ``logps[i]`` (a scalar)."""
    n = lengths.to(logps.dtype).sum().clamp(min=1)
    return -logps.sum() / n, -1.0 / n


def term(kind: str, x_in: PairInputs, cfg: LossConfig):
    if kind in DELTA_TYPES:
        return _delta_term(kind, x_in, cfg)
    if kind in ("aot", "aot_unpaired"):
        return _aot_term(kind, x_in, cfg)
    if kind == "sft":
        return _sft_term(x_in, cfg)
    return _pointwise_term(kind, x_in, cfg)


def combined(x_in: PairInputs, cfg: LossConfig):
    """Weighted sum of the configured loss types: per-pair loss and its VJP."""
    total, vjps = None, []
    for kind, w in zip(cfg.loss_types, cfg.loss_weights):
        loss, vjp = term(kind, x_in, cfg)
        loss = loss if w == 1.0 else loss * w
        total = loss if total is None else total + loss
        vjps.append((w, vjp))

    def vjp(g):
        out: Grads = {}
        for w, f in vjps:
            for k, v in f(g if w == 1.0 else g * w).items():
                out[k] = v if k not in out else out[k] + v
        return out
    return total, vjp
