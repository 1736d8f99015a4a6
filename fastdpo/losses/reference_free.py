"""Public reference-free pair losses: ``cpo_loss`` (CPO, SimPO, AlphaPO) and ``orpo_loss``.

Both take the policy's sequence log-probs only (no reference model) and add the chosen
completions' negative log-likelihood as TRL's ``CPOTrainer`` / ``ORPOTrainer`` do. The formulas
and their derivatives are in :mod:`fastdpo.losses.formulas`.
"""

from __future__ import annotations

import torch

from .. import _validate
from . import args
from .autograd import ClosedFormLoss, compute_dtype
from .formulas import (CPO_AVERAGED_TYPES, CPO_LOSS_TYPES, CPOConfig, cpo_rewards, cpo_terms,
                       orpo_terms)
from .functional import nll_term

_PAIR_NAMES = ("policy_chosen_logps", "policy_rejected_logps")


class _Nll:
    """The NLL term's checked inputs: ``weight * -sum(logps) / sum(lengths)``."""

    def __init__(self, weight, weight_name, pc, chosen_lengths, nll_logps, nll_lengths, sums):
        self.weight = _validate.check_finite(weight_name, weight)
        self.logps = self.lengths = None
        if nll_logps is not None or nll_lengths is not None:
            if nll_logps is None or nll_lengths is None:
                raise ValueError("pass both nll_logps and nll_lengths, or neither")
            _validate.check_float("nll_logps", nll_logps)
            args.check_pair_tensor("nll_logps", nll_logps, pc)
            args.check_pair_tensor("nll_lengths", nll_lengths, pc, integer_ok=True)
            if self.weight == 0.0:
                raise ValueError(f"nll_logps / nll_lengths are unused with {weight_name}=0")
            self.logps, self.lengths = nll_logps, nll_lengths
        elif self.weight != 0.0:
            if chosen_lengths is None or not sums:
                raise ValueError(
                    f"{weight_name}={self.weight} adds the chosen negative log-likelihood per "
                    f"token, which needs summed log-probs and their token counts: pass "
                    f"chosen_lengths with summed policy_chosen_logps, or nll_logps and "
                    f"nll_lengths, or {weight_name}=0 for the pair loss alone")
            self.logps, self.lengths = pc, chosen_lengths

    def add(self, per, nl):
        """``per + weight * nll`` and the VJP of the NLL's input (or ``None``)."""
        if self.weight == 0.0:
            return per, (lambda g: None), per.new_zeros(())
        nll, dnll = nll_term(nl, self.lengths)
        w = self.weight
        return per + w * nll, (lambda g: (g.sum() * (w * dnll)).expand_as(nl)), nll


def _per_token(t, lengths):
    """``t / lengths`` (clamped to >= 1, as TRL counts an empty completion as one token) and the
    scale of the derivative; ``t`` itself without lengths."""
    if lengths is None:
        return t, 1.0
    scale = 1.0 / lengths.to(t.dtype).clamp(min=1)
    return t * scale, scale


def _check_lengths(chosen_lengths, rejected_lengths, pc, averaged: bool):
    args.check_lengths(chosen_lengths, rejected_lengths, pc)
    if averaged and (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")


def _pair_metrics(rc, rr, ac, ar, reduce: bool):
    out = {"rewards/chosen": rc, "rewards/rejected": rr,
           "rewards/accuracies": (rc > rr).to(rc.dtype), "rewards/margins": rc - rr,
           "logps/chosen": ac, "logps/rejected": ar}
    return {k: v.mean() for k, v in out.items()} if reduce else out


def _pair_loss(pc, pr, norm_c, norm_r, nll: _Nll, terms, reduction):
    """The closed-form pair loss ``terms(a_c, a_r)`` (a :class:`PairTerms`-like result) of the
    log-probs, per token where lengths are given, plus the NLL term; also the detached log-probs
    the loss saw and the NLL's value, for the metrics."""
    own = nll.logps is pc  # the NLL of the chosen log-probs themselves: pass them once

    def formula(pc, pr, nl):
        (ac, sc), (ar, sr) = _per_token(pc, norm_c), _per_token(pr, norm_r)
        t = terms(ac, ar)
        per, nll_vjp, _ = nll.add(t.loss, pc if own else nl)

        def vjp(g):
            gc, gn = g * t.d_chosen * sc, nll_vjp(g)
            return (gc + gn, g * t.d_rejected * sr, None) if own else (gc, g * t.d_rejected * sr,
                                                                        gn)
        return per, vjp

    loss = ClosedFormLoss.apply(formula, reduction, pc, pr, None if own else nll.logps)
    with torch.no_grad():
        dt = compute_dtype(pc, pr)
        ac, ar = (_per_token(t.detach().to(dt), n)[0] for t, n in ((pc, norm_c), (pr, norm_r)))
        nl = None if nll.logps is None else nll.logps.detach().to(dt)
        return loss, ac, ar, nll.add(ac.new_zeros(()), nl)[2]


def cpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, loss_type="sigmoid",
             simpo_gamma=0.5, alpha=0.0, label_smoothing=0.0, cpo_alpha=1.0, chosen_lengths=None,
             rejected_lengths=None, nll_logps=None, nll_lengths=None, reduction="mean",
             validate=None):
    """CPO, SimPO and AlphaPO: reference-free pair losses of the policy's log-probs, with the
    numerics of TRL 1.16's ``CPOTrainer`` (``cpo_loss`` plus ``cpo_alpha`` times the NLL).

    With ``r(a) = a`` (or AlphaPO's ``(1 - exp(a)^-alpha) / alpha`` for ``alpha != 0``) and
    ``z = r(a_chosen) - r(a_rejected)``, per pair:

    - ``sigmoid``: ``-(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z)`` (CPO)
    - ``simpo``: the same with ``z - simpo_gamma / beta`` (SimPO; AlphaPO with ``alpha``)
    - ``hinge``: ``relu(1 - beta z)``; ``ipo``: ``(z - 1 / (2 beta))^2``

    plus ``cpo_alpha * nll``, ``nll = -sum(chosen token log-probs) / (chosen token count)`` over
    the batch (TRL's cross-entropy of the chosen completions), on every pair.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)``. With ``chosen_lengths`` and
            ``rejected_lengths`` (completion token counts) they are sums over the completion,
            and ``ipo``/``simpo`` divide them by the lengths (clamped to >= 1) as TRL's
            ``average_log_prob`` does; without lengths they are used as given (pass per-token
            averages for ``ipo``/``simpo`` then).
        beta, simpo_gamma, alpha: TRL's ``CPOConfig`` fields (``simpo_gamma`` is used by
            ``simpo`` only).
        label_smoothing: in [0, 1], for ``sigmoid`` and ``simpo`` (others reject it).
        cpo_alpha: weight of the NLL term (TRL default 1.0; 0 for plain SimPO/AlphaPO). Needs
            summed chosen log-probs with ``chosen_lengths``, or ``nll_logps`` (``(B,)`` summed
            log-probs of the tokens the NLL covers) with ``nll_lengths`` (their counts).
        reduction: ``"mean"`` (TRL), ``"sum"`` or ``"none"`` (per pair, each with the NLL term).
        validate: value checks; default on for CPU tensors.

    Returns:
        ``(loss, metrics)``: fp32 (fp64 for fp64 input) loss; metrics under TRL's names
        (``rewards/chosen`` = ``beta * r(a_chosen)``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen`` and ``logps/rejected`` =
        the log-probs the loss used, ``nll_loss``), batch means or per pair for ``"none"``.
    """
    pc, pr = policy_chosen_logps, policy_rejected_logps
    kind = args.loss_types(loss_type, CPO_LOSS_TYPES, many=False)[0]
    cfg = CPOConfig(beta=_validate.check_positive_finite("beta", beta), loss_type=kind,
                    simpo_gamma=_validate.check_finite("simpo_gamma", simpo_gamma),
                    alpha=_validate.check_finite("alpha", alpha),
                    label_smoothing=_validate.check_finite("label_smoothing", label_smoothing))
    if cfg.label_smoothing != 0.0 and kind not in ("sigmoid", "simpo"):
        raise ValueError(f"label_smoothing has no effect on loss_type={kind!r}; it is used by "
                         f"'sigmoid' and 'simpo'")
    if not 0.0 <= cfg.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {cfg.label_smoothing}")
    reduction = args.check_reduction(reduction)
    _validate.check_optional_bool("validate", validate)  # no value checks: any real log-prob
    args.check_logps(_PAIR_NAMES, (pc, pr))
    averaged = kind in CPO_AVERAGED_TYPES
    _check_lengths(chosen_lengths, rejected_lengths, pc, averaged)
    norm_c, norm_r = ((chosen_lengths, rejected_lengths) if averaged else (None, None))
    nll = _Nll(cpo_alpha, "cpo_alpha", pc, chosen_lengths, nll_logps, nll_lengths,
               sums=not averaged or norm_c is not None)

    loss, ac, ar, nll_value = _pair_loss(pc, pr, norm_c, norm_r, nll,
                                         lambda a, b: cpo_terms(a, b, cfg), reduction)
    metrics = _pair_metrics(*cpo_rewards(ac, ar, cfg), ac, ar, reduction != "none")
    metrics["nll_loss"] = nll_value
    return loss, metrics


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, chosen_lengths=None,
              rejected_lengths=None, nll_weight=1.0, nll_logps=None, nll_lengths=None,
              reduction="mean", validate=None):
    """ORPO: the odds-ratio loss ``-beta log sigmoid(log_odds)`` plus the chosen NLL, with the
    numerics of TRL 1.16's ``ORPOTrainer`` (``odds_ratio_loss``; the trainer minimises
    ``nll - mean(beta log sigmoid(log_odds))``).

    ``log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))`` of the per-token average
    log-probs ``a`` (``log1mexp`` evaluated stably; its gradient stays finite as ``a_c -> 0``).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` log-probs (<= 0): sums over the
            completion with ``chosen_lengths``/``rejected_lengths`` (divided by them, clamped to
            >= 1), else per-token averages as TRL passes them.
        beta: ORPO's lambda (TRL ``ORPOConfig.beta``, default 0.1).
        nll_weight: weight of the NLL term (1 in TRL). Its inputs: ``chosen_lengths`` with
            summed chosen log-probs, or ``nll_logps``/``nll_lengths`` (TRL's ORPO takes the NLL
            over prompt and completion: pass those sums and counts). 0 for the odds ratio alone.
        reduction, validate: as :func:`cpo_loss`.

    Returns:
        ``(loss, metrics)``: TRL's ``rewards/*`` (``beta * a``), ``logps/*`` (the averages),
        ``nll_loss``, ``log_odds_ratio`` (mean ``log sigmoid(log_odds)``) and
        ``log_odds_chosen`` (mean ``log_odds``); per pair for ``reduction="none"``.
    """
    pc, pr = policy_chosen_logps, policy_rejected_logps
    beta = _validate.check_positive_finite("beta", beta)
    reduction = args.check_reduction(reduction)
    validate = _validate.check_optional_bool("validate", validate)
    args.check_logps(_PAIR_NAMES, (pc, pr))
    _check_lengths(chosen_lengths, rejected_lengths, pc, True)
    nll = _Nll(nll_weight, "nll_weight", pc, chosen_lengths, nll_logps, nll_lengths,
               sums=chosen_lengths is not None)
    args.require_values(validate, pc, lambda: ((pc <= 0) & (pr <= 0)).all(),
                        "policy_chosen_logps and policy_rejected_logps must be log-probabilities "
                        "(<= 0, not NaN)")
    loss, ac, ar, nll_value = _pair_loss(pc, pr, chosen_lengths, rejected_lengths, nll,
                                         lambda a, b: orpo_terms(a, b, beta), reduction)
    with torch.no_grad():
        t = orpo_terms(ac, ar, beta)
        reduce = reduction != "none"
        metrics = _pair_metrics(beta * ac, beta * ar, ac, ar, reduce)
        metrics["nll_loss"] = nll_value
        metrics["log_odds_ratio"] = t.ratio.mean() if reduce else t.ratio
        metrics["log_odds_chosen"] = t.log_odds.mean() if reduce else t.log_odds
    return loss, metrics


__all__ = ["cpo_loss", "orpo_loss"]
