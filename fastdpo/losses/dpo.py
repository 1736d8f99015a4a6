"""Public ``dpo_loss``: the DPO-family losses of TRL's ``DPOTrainer``, soft-label and distill DPO.

The pair losses are functions of sequence log-probabilities only, so this module never sees logits;
:class:`fastdpo.DPOLoss` computes the log-probabilities and calls :func:`dpo_loss`.
"""

from __future__ import annotations

import torch

from .. import _validate
from . import args
from .autograd import compute_dtype, preference_loss
from .functional import (F_DIVERGENCE_TYPES, F_DIVERGENCES, LABEL_SMOOTHING_TYPES,
                         LOSS_TYPES, NORM_TYPES, LossConfig)

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


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


def _validate_tensors(pc, pr, rc, rr, types, target_probs, reward_margins, chosen_lengths,
                      rejected_lengths, bco_delta, validate):
    args.check_logps(("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                      "ref_rejected_logps"), (pc, pr, rc, rr))
    targets = (  # the per-pair targets of 'soft' and 'distill' and their value checks
        ("soft", "target_probs", target_probs, "the preference probability of chosen over "
         "rejected", lambda t: ((t >= 0) & (t <= 1)).all(), "lie in [0, 1] (and not be NaN)"),
        ("distill", "reward_margins", reward_margins, "the reward model's r(chosen) - "
         "r(rejected)", lambda t: torch.isfinite(t).all(), "be finite"))
    for kind, name, t, what, ok, rule in targets:
        if kind not in types:
            if t is not None:
                raise ValueError(f"{name} is only used by loss_type={kind!r}")
            continue
        if t is None:
            raise ValueError(f"loss_type={kind!r} needs {name} ({what} per pair, e.g. from "
                             f"fastdpo.preference_probs)")
        args.check_pair_tensor(name, t, pc)
        args.require_values(validate, pc, lambda: ok(t), f"{name} must {rule}")
    args.check_lengths(chosen_lengths, rejected_lengths, pc)
    if "sft" in types and chosen_lengths is None:
        raise ValueError("loss_type='sft' needs chosen_lengths (completion token counts): it is "
                         "the mean chosen log-prob per token")
    one_length = (chosen_lengths is None) != (rejected_lengths is None)
    if one_length and any(t in NORM_TYPES for t in types):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if bco_delta is not None and "bco_pair" not in types:
        raise ValueError("bco_delta is only used by loss_type='bco_pair'")


def loss_config(*, beta, loss_type, label_smoothing, loss_weights, discopop_tau,
                f_divergence_type, f_alpha_divergence_coef, reduction) -> LossConfig:
    """The checked scalar options of :func:`dpo_loss` (for callers that reuse its formulas)."""
    beta = _validate.check_positive_finite("beta", beta)
    types = args.loss_types(loss_type, LOSS_TYPES)
    weights = args.loss_weights(loss_weights, len(types))
    label_smoothing = _validate.check_finite("label_smoothing", label_smoothing)
    _check_label_smoothing(label_smoothing, types)
    discopop_tau = _validate.check_positive_finite("discopop_tau", discopop_tau)
    f_alpha = _validate.check_finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
    _validate.check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_TYPES]
        if bad:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is only supported for "
                             f"{', '.join(F_DIVERGENCE_TYPES)}; got {bad}")
    return LossConfig(beta=beta, loss_types=types, loss_weights=weights,
                      label_smoothing=label_smoothing, discopop_tau=discopop_tau,
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha,
                      reduction=args.check_reduction(reduction))


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
    cfg = loss_config(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                      loss_weights=loss_weights, discopop_tau=discopop_tau,
                      f_divergence_type=f_divergence_type,
                      f_alpha_divergence_coef=f_alpha_divergence_coef, reduction=reduction)
    validate = _validate.check_optional_bool("validate", validate)
    _validate_tensors(pc, pr, rc, rr, cfg.loss_types, target_probs, reward_margins,
                      chosen_lengths, rejected_lengths, bco_delta, validate)
    delta = 0.0 if bco_delta is None else args.check_delta("bco_delta", bco_delta)
    loss = preference_loss(pc, pr, rc, rr, target_probs, reward_margins, chosen_lengths,
                           rejected_lengths, delta, cfg)
    return loss, preference_metrics(pc, pr, rc, rr, cfg.beta, reduce=reduction != "none")


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


@torch.no_grad()
def update_running_mean_(mean: torch.Tensor, count: torch.Tensor, values: torch.Tensor) -> None:
    """Fold ``values`` into the running ``mean`` of ``count`` values, in place and on device (no
    host sync): ``mean += (sum(values) - n mean) / (count + n)``."""
    vals = values.detach().reshape(-1).to(mean.dtype)
    count.add_(vals.numel())
    mean.add_((vals.sum() - vals.numel() * mean) / count.clamp(min=1).to(mean.dtype))


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
    :class:`fastdpo.DPOLoss` (``bco_running_mean=True``) keeps the same state in its buffers.
    """

    def __init__(self):
        self.value = torch.zeros(())
        self._count = torch.zeros((), dtype=torch.int64)

    @property
    def count(self) -> int:
        return int(self._count)

    @torch.no_grad()
    def update(self, *rewards: torch.Tensor) -> torch.Tensor:
        vals = torch.cat([r.detach().reshape(-1).float() for r in rewards])
        self.value, self._count = self.value.to(vals.device), self._count.to(vals.device)
        update_running_mean_(self.value, self._count, vals)
        return self.value

    def state_dict(self):
        return {"value": self.value.clone(), "count": self.count}

    def load_state_dict(self, state):
        self.value = state["value"].clone()
        self._count = torch.tensor(int(state["count"]), dtype=torch.int64,
                                   device=self.value.device)


__all__ = ["dpo_loss", "preference_metrics", "RewardRunningMean", "LOSS_TYPES",
           "update_running_mean_", "loss_config"]
