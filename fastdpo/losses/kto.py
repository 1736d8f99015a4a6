"""Public ``kto_loss``: KTO and unpaired APO-zero on unpaired completions (TRL 1.16 numerics)."""

from __future__ import annotations

import torch

from .. import _validate
from . import args
from .autograd import ClosedFormLoss, compute_dtype
from .formulas import KTO_LOSS_TYPES, kto_kl, kto_terms


def _check_kl(loss_type, policy_kl_logps, ref_kl_logps, kl, like, dt):
    given = [n for n, v in (("policy_kl_logps", policy_kl_logps), ("ref_kl_logps", ref_kl_logps),
                            ("kl", kl)) if v is not None]
    if loss_type == "apo_zero_unpaired":
        if given:
            raise ValueError(f"{', '.join(given)}: loss_type='apo_zero_unpaired' uses no KL "
                             f"baseline")
        return None
    if kl is not None:
        if policy_kl_logps is not None or ref_kl_logps is not None:
            raise ValueError("pass kl, or policy_kl_logps and ref_kl_logps, not both")
        return args.check_delta("kl", kl)
    if policy_kl_logps is None or ref_kl_logps is None:
        raise ValueError("loss_type='kto' needs its KL baseline: policy_kl_logps and "
                         "ref_kl_logps (log-probs of mismatched prompt/completion pairs, e.g. "
                         "each prompt with the next example's completion), or kl")
    args.check_logps(("policy_kl_logps", "ref_kl_logps"), (policy_kl_logps, ref_kl_logps))
    _validate.check_same_device(policy_logps=like, policy_kl_logps=policy_kl_logps)
    return kto_kl(policy_kl_logps.to(dt), ref_kl_logps.to(dt))


def kto_loss(policy_logps, ref_logps, desirable, *, policy_kl_logps=None, ref_kl_logps=None,
             kl=None, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto",
             reduction="mean", validate=None):
    """KTO on unpaired completions, with the numerics of TRL 1.16's ``KTOTrainer``.

    Per example, with the log-ratio ``lr = policy_logps - ref_logps``:

    - ``kto``: ``desirable_weight * (1 - sigmoid(beta (lr - kl)))`` for a desirable completion,
      ``undesirable_weight * (1 - sigmoid(beta (kl - lr)))`` for an undesirable one;
    - ``apo_zero_unpaired``: the same with ``kl = 0``.

    ``kl`` is TRL's baseline: ``mean(policy_kl_logps - ref_kl_logps)`` over the batch's
    mismatched (prompt, completion) pairs, clamped at 0 and not differentiated. Under data
    parallelism TRL averages it over ranks before the clamp: compute
    ``(policy_kl_logps - ref_kl_logps).mean()``, all-reduce it, and pass ``kl=`` the clamped value.

    Args:
        policy_logps, ref_logps: ``(B,)`` sequence log-probs (sums over the completion).
        desirable: ``(B,)`` bool, True for a desirable (chosen) completion.
        policy_kl_logps, ref_kl_logps: ``(B_kl,)`` log-probs of the mismatched pairs (``kto``),
            or ``kl``: the baseline as a number or a one-element tensor.
        beta, desirable_weight, undesirable_weight: TRL's ``KTOConfig`` fields.
        reduction: ``"mean"`` over all ``B`` examples (TRL), ``"sum"`` or ``"none"`` (per
            example, in input order; TRL concatenates desirable then undesirable ones).
        validate: accepted for a uniform signature (no value checks are needed).

    Returns:
        ``(loss, metrics)``: ``kl`` and, under TRL's names, ``rewards/chosen`` /
        ``rewards/rejected`` (``beta * lr`` over the desirable / undesirable examples),
        ``rewards/margins`` and ``logps/chosen`` / ``logps/rejected``: means (NaN for a group
        with no example in the batch), or ``(B,)`` with NaN outside the group for
        ``reduction="none"`` (reduce them with ``nanmean`` or sums and counts across ranks).
    """
    kind = args.loss_types(loss_type, KTO_LOSS_TYPES, many=False)[0]
    beta = _validate.check_positive_finite("beta", beta)
    wd = _validate.check_finite("desirable_weight", desirable_weight)
    wu = _validate.check_finite("undesirable_weight", undesirable_weight)
    reduction = args.check_reduction(reduction)
    _validate.check_optional_bool("validate", validate)
    args.check_logps(("policy_logps", "ref_logps"), (policy_logps, ref_logps))
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        got = desirable.dtype if isinstance(desirable, torch.Tensor) else type(desirable).__name__
        raise TypeError(f"desirable must be a bool tensor (True = desirable completion), got "
                        f"{got}")
    if tuple(desirable.shape) != tuple(policy_logps.shape):
        raise ValueError(f"desirable must have shape {tuple(policy_logps.shape)} (one flag per "
                         f"example), got {tuple(desirable.shape)}")
    _validate.check_same_device(policy_logps=policy_logps, desirable=desirable)
    dt = compute_dtype(policy_logps, ref_logps)
    kl_value = _check_kl(kind, policy_kl_logps, ref_kl_logps, kl, policy_logps, dt)
    kl_t = torch.zeros((), dtype=dt, device=policy_logps.device) if kl_value is None else (
        torch.as_tensor(kl_value).to(device=policy_logps.device, dtype=dt))

    def formula(pol, ref):
        loss, dlr = kto_terms(pol - ref, desirable, kl_t, beta, wd, wu)
        return loss, lambda g: (g * dlr, -g * dlr)

    loss = ClosedFormLoss.apply(formula, reduction, policy_logps, ref_logps)
    with torch.no_grad():
        pol = policy_logps.detach().to(dt)
        rewards = beta * (pol - ref_logps.detach().to(dt))
        nan = torch.full_like(rewards, float("nan"))
        per = {"rewards/chosen": torch.where(desirable, rewards, nan),
               "rewards/rejected": torch.where(desirable, nan, rewards),
               "logps/chosen": torch.where(desirable, pol, nan),
               "logps/rejected": torch.where(desirable, nan, pol)}
        if reduction == "none":
            metrics = per
        else:
            metrics = {k: v.nanmean() for k, v in per.items()}
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics["kl"] = kl_t
    return loss, metrics


__all__ = ["kto_loss"]
