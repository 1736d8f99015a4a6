"""Per-sequence formulas of the reference-free (CPO, SimPO, AlphaPO, ORPO) and unpaired (KTO)
losses, each with its closed-form derivative.

Pure functions of per-sequence log-probabilities (no logits, no autograd): the public losses wrap
them in :class:`fastdpo.losses.autograd.ClosedFormLoss`, and a fused path that forms its own
gradients (from hidden states + LM head) can call them on each chunk's sequence log-probs.
Every function returns the per-example loss and ``dloss/dinput`` per example, in the inputs'
dtype (callers pass fp32 or fp64).

Numerics follow TRL 1.16 (``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``,
``KTOTrainer._compute_loss``) with ``log(sigmoid)`` as ``logsigmoid``, ``1 - sigmoid(x)`` as
``sigmoid(-x)`` and AlphaPO's ``(1 - exp(logp)^-alpha) / alpha`` as ``-expm1(-alpha logp) / alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .functional import hinge_phi, ipo_phi, soft_phi

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
CPO_AVERAGED_TYPES = ("ipo", "simpo")  # TRL's CPOTrainer feeds them per-token average log-probs
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class CPOConfig:
    beta: float
    loss_type: str = "sigmoid"
    simpo_gamma: float = 0.5
    alpha: float = 0.0
    label_smoothing: float = 0.0


class PairTerms(NamedTuple):
    loss: torch.Tensor       # (B,) per-pair loss
    d_chosen: torch.Tensor   # (B,) dloss / d(chosen input)
    d_rejected: torch.Tensor


def alphapo_reward(logps: torch.Tensor, alpha: float):
    """AlphaPO's reward ``(1 - p^-alpha) / alpha`` of ``logps = log p`` and its derivative in
    ``logps`` (``p^-alpha``); ``alpha = 0`` is the log-prob itself. Overflows (like TRL's) once
    ``-alpha * logps`` passes the dtype's exp range."""
    if alpha == 0.0:
        return logps, torch.ones_like(logps)
    t = -alpha * logps
    return -torch.expm1(t) / alpha, torch.exp(t)


def cpo_terms(chosen: torch.Tensor, rejected: torch.Tensor, cfg: CPOConfig) -> PairTerms:
    """CPO / SimPO / AlphaPO pair loss of the policy's log-probs (sums, or per-token averages
    for ``ipo`` and ``simpo`` as TRL feeds them): ``phi(r(chosen) - r(rejected))``."""
    b = cfg.beta
    rc, drc = alphapo_reward(chosen, cfg.alpha)
    rr, drr = alphapo_reward(rejected, cfg.alpha)
    z = rc - rr
    if cfg.loss_type in ("sigmoid", "simpo"):
        if cfg.loss_type == "simpo":
            z = z - cfg.simpo_gamma / b
        loss, dphi = soft_phi(b * z, 1.0 - cfg.label_smoothing, b)
    elif cfg.loss_type == "hinge":
        loss, dphi = hinge_phi(z, b)
    elif cfg.loss_type == "ipo":
        loss, dphi = ipo_phi(z, b)
    else:
        raise AssertionError(cfg.loss_type)
    return PairTerms(loss, dphi * drc, -dphi * drr)


def cpo_rewards(chosen: torch.Tensor, rejected: torch.Tensor, cfg: CPOConfig):
    """TRL's logged CPO rewards: ``beta * r(logps)``."""
    return (cfg.beta * alphapo_reward(chosen, cfg.alpha)[0],
            cfg.beta * alphapo_reward(rejected, cfg.alpha)[0])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


class OddsRatioTerms(NamedTuple):
    loss: torch.Tensor       # (B,) -beta * log sigmoid(log_odds)
    d_chosen: torch.Tensor
    d_rejected: torch.Tensor
    log_odds: torch.Tensor   # (B,) log odds(chosen) - log odds(rejected)
    ratio: torch.Tensor      # (B,) log sigmoid(log_odds)


def orpo_terms(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> OddsRatioTerms:
    """ORPO's odds-ratio loss of per-token average log-probs ``chosen``, ``rejected`` (<= 0).

    ``dloss/dchosen = -beta sigmoid(-log_odds) / (1 - p_c)`` is written as
    ``-beta / ((1 - p_c) + (p_c / p_r) (1 - p_r))``, finite as ``p_c -> 1`` (a log-prob of 0) and
    for very negative log-probs; ``dloss/drejected = beta sigmoid(-log_odds) / (1 - p_r)``.
    """
    one_m_c, one_m_r = -torch.expm1(chosen), -torch.expm1(rejected)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    d_c = -beta / (one_m_c + torch.exp(chosen - rejected) * one_m_r)
    d_r = beta * torch.sigmoid(-log_odds) / one_m_r
    return OddsRatioTerms(-beta * ratio, d_c, d_r, log_odds, ratio)


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's KL baseline as TRL estimates it: the mean log-ratio over the mismatched
    (prompt, completion) pairs, clamped at 0, without gradient."""
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_terms(logratios: torch.Tensor, desirable: torch.Tensor, kl, beta: float,
              desirable_weight: float, undesirable_weight: float):
    """KTO per-example loss and ``dloss/dlogratio``: ``w_d (1 - sigmoid(beta (lr - kl)))`` for a
    desirable completion, ``w_u (1 - sigmoid(beta (kl - lr)))`` for an undesirable one
    (``kl = 0`` gives ``apo_zero_unpaired``)."""
    y = beta * (logratios - kl)
    one = torch.ones_like(y)
    sign = torch.where(desirable, -one, one)
    w = torch.where(desirable, desirable_weight * one, undesirable_weight * one)
    loss = w * torch.sigmoid(sign * y)
    return loss, w * sign * beta * torch.sigmoid(y) * torch.sigmoid(-y)
