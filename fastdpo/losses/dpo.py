"""Public ``dpo_loss``: the DPO-family losses of TRL's ``DPOTrainer``, soft-label and distill DPO.

The pair losses are functions of sequence log-probabilities only, so this module never sees logits;
:class:`fastdpo.DPOLoss` computes the log-probabilities and calls :func:`dpo_loss`.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .. import _validate as V
from .autograd import PreferenceLoss, compute_dtype
from .functional import (F_DIVERGENCE_TYPES, F_DIVERGENCES, LABEL_SMOOTHING_TYPES,
                         LOSS_TYPES, NORM_TYPES, LossConfig)

REDUCTIONS = ("mean", "sum", "none")
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _check_number(name: str, v, *, positive: bool = False) -> float:
    if not _is_number(v):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def _loss_types(loss_type) -> tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    return types


def _check_label_smoothing(eps: float, types: tuple[str, ...]) -> None:
    used = [t for t in types if t in LABEL_SMOOTHING_TYPES]
    if eps != 0.0 and not used:
        raise ValueError(
            f"label_smoothing={eps} has no effect on loss_type {list(types)}; it is used by "
            f"{', '.join(LABEL_SMOOTHING_TYPES)} (for conservative DPO use loss_type='soft' with "
            f"target_probs = 1 - epsilon)")
    if "robust" in used and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for 'robust' (the flip "
                         f"probability), got {eps}")
    if "exo_pair" in used and not 0.0 < eps < 1.0:
        raise ValueError(f"label_smoothing must lie in (0, 1) for 'exo_pair' (the EXO paper "
                         f"recommends 1e-3), got {eps}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {eps}")


def _check_pair_tensor(name: str, t, like: torch.Tensor, *, integer_ok: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or (integer_ok and not t.is_complex() and t.dtype != torch.bool)):
        kind = "a floating or integer" if integer_ok else "a floating"
        raise TypeError(f"{name} must be {kind} tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one value per pair), "
                         f"got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the log-probs are on {like.device}")


def _validate(pc, pr, rc, rr, types, weights, label_smoothing, target_probs, reward_margins,
              chosen_lengths, rejected_lengths, reduction, f_divergence_type, bco_delta,
              validate):
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
             "ref_rejected_logps")
    for n, t in zip(names, (pc, pr, rc, rr)):
        V.check_float(n, t)
    if pc.dim() != 1 or pc.shape[0] == 0:
        raise ValueError(f"policy_chosen_logps must be a non-empty 1-D tensor (B,), got shape "
                         f"{tuple(pc.shape)}")
    for n, t in zip(names[1:], (pr, rc, rr)):
        if tuple(t.shape) != tuple(pc.shape):
            raise ValueError(f"{n} must have the shape of policy_chosen_logps {tuple(pc.shape)}, "
                             f"got {tuple(t.shape)}")
    V.check_same_device(**dict(zip(names, (pc, pr, rc, rr))))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weights is not None and len(weights) != len(types):
        raise ValueError(f"loss_weights must have one weight per loss type: got {len(weights)} "
                         f"for {len(types)} loss types")
    _check_label_smoothing(label_smoothing, types)
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got "
                         f"{f_divergence_type!r}")
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_TYPES]
        if bad:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is only supported for "
                             f"{', '.join(F_DIVERGENCE_TYPES)}; got {bad}")
    checked = V.checked_mode(validate, pc.device)
    if "soft" in types:
        if target_probs is None:
            raise ValueError("loss_type='soft' needs target_probs (the preference probability "
                             "of chosen over rejected per pair, e.g. from "
                             "fastdpo.preference_probs)")
        _check_pair_tensor("target_probs", target_probs, pc)
        if checked and not bool(((target_probs >= 0) & (target_probs <= 1)).all()):
            raise ValueError("target_probs must lie in [0, 1] (and not be NaN)")
    elif target_probs is not None:
        raise ValueError("target_probs is only used by loss_type='soft'")
    if "distill" in types:
        if reward_margins is None:
            raise ValueError("loss_type='distill' needs reward_margins (the reward model's "
                             "r(chosen) - r(rejected) per pair, e.g. from "
                             "fastdpo.preference_probs)")
        _check_pair_tensor("reward_margins", reward_margins, pc)
        if checked and not bool(torch.isfinite(reward_margins).all()):
            raise ValueError("reward_margins must be finite")
    elif reward_margins is not None:
        raise ValueError("reward_margins is only used by loss_type='distill'")
    for n, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            _check_pair_tensor(n, t, pc, integer_ok=True)
    if "sft" in types and chosen_lengths is None:
        raise ValueError("loss_type='sft' needs chosen_lengths (completion token counts): it is "
                         "the mean chosen log-prob per token")
    one_length = (chosen_lengths is None) != (rejected_lengths is None)
    if one_length and any(t in NORM_TYPES for t in types):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if bco_delta is not None:
        if "bco_pair" not in types:
            raise ValueError("bco_delta is only used by loss_type='bco_pair'")
        if isinstance(bco_delta, torch.Tensor):
            if bco_delta.numel() != 1 or not bco_delta.is_floating_point():
                raise ValueError("bco_delta must be a number or a one-element floating tensor")
        else:
            _check_number("bco_delta", bco_delta)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, target_probs=None,
             reward_margins=None, chosen_lengths=None, rejected_lengths=None, reduction="mean",
             loss_weights=None, discopop_tau=0.05, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, bco_delta=None, validate=None):
    """DPO-family preference loss of sequence log-probabilities, with a closed-form backward.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(B,)``
            sequence log-probabilities (sums over completion tokens, as TRL computes them).
        beta: the KL coefficient (IPO's tau for ``ipo``).
        loss_type: one of ``LOSS_TYPES`` or a list of them, combined as
            ``sum_k loss_weights[k] * loss_k`` like TRL's multi-loss (MPO) setting:

            - TRL 1.16 ``DPOTrainer``'s, with its numerics: ``sigmoid``, ``hinge``, ``ipo``,
              ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``,
              ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``,
              ``sigmoid_norm``. ``ipo`` and ``sigmoid_norm`` divide each log-ratio by its
              completion length (``chosen_lengths``/``rejected_lengths``, clamped to >= 1) as TRL
              does; without lengths the log-probs are used as given (pass per-token averages
              then). ``sft`` is ``-sum(policy_chosen_logps) / sum(chosen_lengths)`` on every pair.
              ``aot``/``aot_unpaired`` sort across the batch: with ``reduction="none"`` entry ``i``
              is the loss of rank ``i``, not of pair ``i``.
            - ``soft``: soft-label DPO, ``-s log sigmoid(D) - (1 - s) log sigmoid(-D)`` with
              ``D = beta * ((pc - rc) - (pr - rr))`` and ``s = target_probs``; ``dloss/dD =
              sigmoid(D) - s``. ``s = 1`` is ``sigmoid`` exactly, ``s = 1 - eps`` conservative DPO.
            - ``distill``: ``(D - reward_margins)^2``, the implicit reward margin regressed on the
              reward model's margin (the partition function cancels in the difference).
        label_smoothing: ``robust`` (flip rate, in [0, 0.5)), ``exo_pair`` (epsilon, in (0, 1)),
            ``aot``/``aot_unpaired`` (in [0, 1]). Any other loss type rejects a non-zero value
            (TRL 1.16 silently ignores it there).
        target_probs: ``(B,)`` in [0, 1], for ``soft``. Differentiable (``dloss/ds = -D``).
        reward_margins: ``(B,)`` for ``distill``. Differentiable.
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (int or float).
        reduction: ``"mean"`` (TRL), ``"sum"`` or ``"none"`` (per pair).
        loss_weights: one weight per loss type (default 1 each).
        discopop_tau: DiscoPOP's temperature (TRL default 0.05).
        f_divergence_type, f_alpha_divergence_coef: TRL's f-DPO scores (``reverse_kl`` default;
            ``forward_kl``, ``js_divergence``, ``alpha_divergence``) for the loss types TRL allows.
        bco_delta: reward shift of ``bco_pair``: ``-log sigmoid(beta c - delta) - log sigmoid(-(beta
            r - delta))``. ``None``/0 is TRL 1.16 (stateless); older TRL used a running mean of the
            rewards, which :class:`RewardRunningMean` keeps as explicit state. Not differentiated.
        validate: check value ranges (``target_probs`` in [0, 1], finite margins). Default: on for
            CPU tensors, off for CUDA (it would synchronise the host).

    Returns:
        ``(loss, metrics)``: ``loss`` is fp32 (fp64 if an input is fp64), scalar unless
        ``reduction="none"``. ``metrics`` holds detached tensors under TRL's names:
        ``rewards/chosen`` (``beta * (pc - rc)``), ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies`` (chosen reward > rejected reward), ``logps/chosen``,
        ``logps/rejected``: batch means like TRL logs them, or per-pair ``(B,)`` with
        ``reduction="none"`` (for callers that gather across ranks before averaging).
    """
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    beta = _check_number("beta", beta, positive=True)
    types = _loss_types(loss_type)
    weights = None if loss_weights is None else tuple(loss_weights)
    label_smoothing = _check_number("label_smoothing", label_smoothing)
    discopop_tau = _check_number("discopop_tau", discopop_tau, positive=True)
    f_alpha = _check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    _validate(pc, pr, rc, rr, types, weights, label_smoothing, target_probs, reward_margins,
              chosen_lengths, rejected_lengths, reduction, f_divergence_type, bco_delta, validate)
    weights = tuple(_check_number("loss_weights[i]", w) for w in (weights or (1.0,) * len(types)))
    cfg = LossConfig(beta=beta, loss_types=types, loss_weights=weights,
                     label_smoothing=label_smoothing, discopop_tau=discopop_tau,
                     f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha,
                     reduction=reduction)
    delta = 0.0 if bco_delta is None else bco_delta
    if torch.is_tensor(delta):
        delta = delta.detach().reshape(())
    loss = PreferenceLoss.apply(pc, pr, rc, rr, target_probs, reward_margins, chosen_lengths,
                                rejected_lengths, delta, cfg)
    return loss, preference_metrics(pc, pr, rc, rr, beta, reduce=reduction != "none")


@torch.no_grad()
def preference_metrics(pc, pr, rc, rr, beta: float, *, reduce: bool = True):
    """TRL's reward / log-prob metrics of a batch of pairs (detached)."""
    dt = compute_dtype(pc, pr, rc, rr)
    pc, pr, rc, rr = (t.detach().to(dt) for t in (pc, pr, rc, rr))
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    out = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).to(dt),
        "rewards/margins": chosen - rejected,
        "logps/chosen": pc,
        "logps/rejected": pr,
    }
    return {k: v.mean() for k, v in out.items()} if reduce else out


class RewardRunningMean:
    """Explicit state for older TRL's ``bco_pair``: a running mean of the implicit rewards.

    TRL 1.16's ``bco_pair`` is stateless (``bco_delta = 0``). Earlier TRL shifted both rewards by
    a running mean of the batch's mean reward; reproduce that with::

        state = RewardRunningMean()  # one per run; checkpoint with state_dict()
        with torch.no_grad():  # this batch's mean reward first, then the loss with the new mean
            state.update((beta * torch.cat([pc - rc, pr - rr])).mean())
        loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair",
                                 bco_delta=state.value)

    Each update counts its values (one for a batch mean, as older TRL passed).
    """

    def __init__(self):
        self.value = torch.zeros(())
        self.count = 0

    @torch.no_grad()
    def update(self, *rewards: torch.Tensor) -> torch.Tensor:
        vals = torch.cat([r.detach().reshape(-1).float() for r in rewards])
        n = vals.numel()
        if n:
            total = self.count + n
            self.value = (self.value.to(vals.device) * (self.count / total)
                          + vals.sum() / total)
            self.count = total
        return self.value

    def state_dict(self):
        return {"value": self.value.clone(), "count": self.count}

    def load_state_dict(self, state):
        self.value, self.count = state["value"].clone(), int(state["count"])


__all__ = ["dpo_loss", "preference_metrics", "RewardRunningMean", "LOSS_TYPES"]
