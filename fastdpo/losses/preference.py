"""Preference targets from an explicit reward model: soft labels, on-policy pairs, rejection
sampling.

A reward model ``r`` says chosen beats rejected with probability ``sigmoid(r_w - r_l)`` (Bradley-
Terry). :func:`preference_probs` turns (ensembles of) rewards into that probability, the target of
``loss_type="soft"``, and the logit margin, the target of ``loss_type="distill"``; their convention
is ``probs == sigmoid(margins)`` for every ensemble reduction. :func:`build_pairs` makes on-policy
pairs from ``K`` scored candidates per prompt, :func:`rejection_sample` draws candidates from the
optimal policy ``pi* ~ pi_ref * exp(r / beta)`` given samples of ``pi_ref``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _validate

ENSEMBLES = ("mean_prob", "mean_margin", "lower_quantile", "mean_minus_std")
STRATEGIES = ("best_worst", "all")


class PreferenceTargets(NamedTuple):
    """``probs``: P(chosen beats rejected), for ``soft``; ``margins``: its logit, for ``distill``.
    """
    probs: torch.Tensor
    margins: torch.Tensor


class PreferencePairs(NamedTuple):
    """Pairs ``(prompt_index[i], chosen_index[i])`` over ``(prompt_index[i], rejected_index[i])``.

    Indices are int64 ``(N,)``; the flat row of a ``(P * K, ...)`` candidate batch is
    ``prompt_index * K + chosen_index``. ``probs``/``margins`` as in :class:`PreferenceTargets`.
    """
    prompt_index: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    probs: torch.Tensor
    margins: torch.Tensor


class RejectionSample(NamedTuple):
    """``indices`` ``(P, num_samples)`` int64 candidate indices in acceptance order, padded with
    -1 after the ``counts[p]`` accepted ones (``counts`` ``(P,)`` int64)."""
    indices: torch.Tensor
    counts: torch.Tensor


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def preference_probs(chosen_rewards, rejected_rewards, *, temperature=1.0, ensemble="mean_prob",
                     quantile=0.1, std_coef=1.0) -> PreferenceTargets:
    """Bradley-Terry preference probabilities (and logit margins) from reward-model scores.

    Args:
        chosen_rewards, rejected_rewards: ``(B,)``, or ``(E, B)`` for an ensemble of ``E`` reward
            models (or samples); the same shape.
        temperature: the member margins are ``(chosen - rejected) / temperature``.
        ensemble: how members combine (all equal for ``E = 1``):

            - ``"mean_prob"``: the mean of the members' probabilities; margin = its logit
              (computed from log-sum-exps, finite even when the probability rounds to 1).
            - ``"mean_margin"``: sigmoid of the mean margin.
            - ``"lower_quantile"``: the ``quantile``-th quantile of the margins (linear
              interpolation; 0 = the most pessimistic member).
            - ``"mean_minus_std"``: mean margin minus ``std_coef`` times its (population)
              standard deviation: pessimistic where the members disagree.

    Returns:
        :class:`PreferenceTargets` ``(probs, margins)``, each ``(B,)`` fp32 (fp64 for fp64 input),
        with ``probs == sigmoid(margins)``.
    """
    _validate.check_float("chosen_rewards", chosen_rewards)
    _validate.check_float("rejected_rewards", rejected_rewards)
    _validate.check_same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                         f"{tuple(rejected_rewards.shape)} must have the same shape")
    if chosen_rewards.dim() not in (1, 2) or chosen_rewards.shape[0] == 0:
        raise ValueError(f"rewards must be (B,) or (E, B) with E >= 1, got shape "
                         f"{tuple(chosen_rewards.shape)}")
    temperature = _validate.check_positive_finite("temperature", temperature)
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if ensemble == "lower_quantile" and not 0 <= _validate.check_finite("quantile", quantile) <= 1:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile!r}")
    if ensemble == "mean_minus_std":
        _validate.check_finite("std_coef", std_coef)
    dt = _float_dtype(chosen_rewards)
    m = (chosen_rewards.to(dt) - rejected_rewards.to(dt)) / temperature
    if m.dim() == 1:
        m = m.unsqueeze(0)
    if ensemble == "mean_prob":
        probs = torch.sigmoid(m).mean(0)
        # logit(mean sigmoid) = log(mean sigmoid(m)) - log(mean sigmoid(-m)), stably
        margins = torch.logsumexp(F.logsigmoid(m), 0) - torch.logsumexp(F.logsigmoid(-m), 0)
        return PreferenceTargets(probs, margins)
    if ensemble == "mean_margin":
        margins = m.mean(0)
    elif ensemble == "lower_quantile":
        margins = torch.quantile(m, float(quantile), dim=0)
    else:
        margins = m.mean(0) - float(std_coef) * m.std(0, correction=0)
    return PreferenceTargets(torch.sigmoid(margins), margins)


def rejection_sample(rewards, beta, num_samples, generator=None, *, max_rounds=1,
                     validate=None) -> RejectionSample:
    """Pick candidates distributed like ``pi* ~ pi_ref * exp(r / beta)`` from samples of pi_ref.

    ``rewards`` ``(P, K)`` scores ``K`` candidates per prompt drawn from the reference policy
    (``-inf`` marks a missing candidate). Each round, every remaining candidate is accepted
    independently with probability ``exp((r - max r) / beta)`` (max over the prompt's remaining
    candidates, so the best is always accepted), and accepted candidates are taken in a uniformly
    random order, without replacement, until ``num_samples`` are chosen. ``max_rounds=1`` is one
    pass (prompts may get fewer); more rounds repeat on the remaining pool as the statistical
    rejection sampling of RSO (Liu et al., 2023) does, until each prompt has ``num_samples`` (or
    runs out of candidates).

    Returns:
        :class:`RejectionSample` ``(indices, counts)``: ``indices`` ``(P, num_samples)`` int64
        padded with -1, ``counts`` ``(P,)`` int64.
    """
    _validate.check_float("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (P, K), got shape {tuple(rewards.shape)}")
    beta = _validate.check_positive_finite("beta", beta)
    for name, v in (("num_samples", num_samples), ("max_rounds", max_rounds)):
        _validate.check_int(name, v, minimum=1)
    if _validate.checked_mode(validate, rewards.device):
        if bool((torch.isnan(rewards) | (rewards == math.inf)).any()):
            raise ValueError("rewards must not be NaN or +inf (-inf marks a missing candidate)")
    P, K = rewards.shape
    dt, dev = _float_dtype(rewards), rewards.device
    r = rewards.detach().to(dt)
    n = int(num_samples)
    indices = torch.full((P, n + 1), -1, dtype=torch.int64, device=dev)  # column n: discard slot
    counts = torch.zeros(P, dtype=torch.int64, device=dev)
    avail = r > -math.inf
    rank = torch.arange(K, device=dev)
    for rnd in range(int(max_rounds)):
        rm = torch.where(avail, r, -math.inf)
        top = rm.amax(1, keepdim=True)
        p_acc = torch.where(avail, torch.exp((rm - top) / beta), torch.zeros_like(rm))
        accept = torch.rand(P, K, generator=generator, device=dev, dtype=dt) < p_acc
        keys = torch.rand(P, K, generator=generator, device=dev, dtype=dt)
        order = torch.argsort(torch.where(accept, keys, 2.0), dim=1)  # accepted first, shuffled
        take = torch.minimum(accept.sum(1), n - counts)
        taken = rank < take.unsqueeze(1)  # (P, K) over the shuffled order
        dest = torch.where(taken, counts.unsqueeze(1) + rank, n)
        indices.scatter_(1, dest, torch.where(taken, order, -1))
        avail.scatter_(1, order, avail.gather(1, order) & ~taken)
        counts = counts + take
        if rnd + 1 < max_rounds and not bool(((counts < n) & avail.any(1)).any()):
            break
    indices = indices[:, :n].contiguous()
    return RejectionSample(indices, counts)


def build_pairs(rewards, *, strategy="best_worst", margin=0.0, temperature=1.0,
                ensemble="mean_prob", quantile=0.1, std_coef=1.0) -> PreferencePairs:
    """On-policy preference pairs from ``K`` scored candidates per prompt.

    Args:
        rewards: ``(P, K)``, or ``(E, P, K)`` for an ensemble; non-finite entries are not
            candidates (pad prompts with fewer candidates with ``-inf``).
        strategy: ``"best_worst"``: one pair per prompt, highest over lowest (mean) reward.
            ``"all"``: every ordered pair whose reward gap exceeds ``margin``.
        margin: keep a pair only when ``r_chosen - r_rejected > margin`` (>= 0; the mean over the
            ensemble), so ties never make a pair.
        temperature, ensemble, quantile, std_coef: targets as in :func:`preference_probs`.

    Returns:
        :class:`PreferencePairs`, prompt-major, then chosen, then rejected index.
    """
    _validate.check_float("rewards", rewards)
    if rewards.dim() not in (2, 3):
        raise ValueError(f"rewards must be (P, K) or (E, P, K), got shape {tuple(rewards.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if _validate.check_finite("margin", margin) < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    r3 = rewards.detach() if rewards.dim() == 3 else rewards.detach().unsqueeze(0)
    dt = _float_dtype(rewards)
    r3 = r3.to(dt)
    valid = torch.isfinite(r3).all(0)  # (P, K)
    rbar = torch.where(valid, r3.mean(0), 0.0)
    if strategy == "best_worst":
        best = torch.where(valid, rbar, -math.inf).argmax(1)
        worst = torch.where(valid, rbar, math.inf).argmin(1)
        gap = rbar.gather(1, best[:, None]) - rbar.gather(1, worst[:, None])
        keep = (valid.sum(1) >= 2) & (gap.squeeze(1) > margin)
        prompt = keep.nonzero().squeeze(1)
        chosen, rejected = best[prompt], worst[prompt]
    else:
        gap = rbar.unsqueeze(2) - rbar.unsqueeze(1)  # (P, K_chosen, K_rejected)
        keep = valid.unsqueeze(2) & valid.unsqueeze(1) & (gap > margin)
        prompt, chosen, rejected = keep.nonzero().unbind(1)
    cr, rr = r3[:, prompt, chosen], r3[:, prompt, rejected]
    if prompt.numel() == 0:
        empty = r3.new_zeros(0)
        return PreferencePairs(prompt, chosen, rejected, empty, empty.clone())
    t = preference_probs(cr if rewards.dim() == 3 else cr[0], rr if rewards.dim() == 3 else rr[0],
                         temperature=temperature, ensemble=ensemble, quantile=quantile,
                         std_coef=std_coef)
    return PreferencePairs(prompt, chosen, rejected, t.probs, t.margins)
