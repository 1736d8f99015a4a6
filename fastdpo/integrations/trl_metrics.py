"""TRL's logged metrics for the fastdpo trainers: the policy's head pass record, the no-grad
token statistics pass (mean logit, top-1, entropy) and the DPO metrics of a step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends, ops
from ..rows import transform_logits_

# fp32 bytes of one logits tile in the (optional) no-grad pass for TRL's token metrics
_METRIC_TILE_BYTES = 32 << 20


@dataclass
class HeadPass:
    """What the policy's head pass gives the metrics (and the MoE aux loss)."""

    logps: torch.Tensor | None           # (B, T-1), 0 outside the completion (None: fused loss)
    entropy: torch.Tensor | None         # (B, T-1) detached
    mean_logits: torch.Tensor | None     # (B, T-1) detached
    is_top1: torch.Tensor | None         # (B, T-1) bool
    aux_loss: torch.Tensor | None        # MoE router loss of the forward, when it computed one


def log_dpo_metrics(tr, mode, inputs, pol, mask, chosen_logps, rejected_logps,
                    ref_chosen_logps, ref_rejected_logps, target_probs):
    """Append TRL's DPO metrics of one step to ``tr._metrics[mode]`` (TRL's names and
    definitions; ``pol`` the policy's :class:`HeadPass`, ``mask`` the shifted completion mask)."""
    acc = tr.accelerator
    metrics = tr._metrics[mode]

    def gathered_sum(x):
        return acc.gather_for_metrics(x).sum()

    def ratio(num, den):
        num, den = gathered_sum(num).item(), gathered_sum(den).item()
        return num / den if den > 0 else 0.0

    if pol.entropy is not None:
        metrics["entropy"].append(ratio((pol.entropy * mask).sum(), mask.sum()))
        for side, ent, m in zip(("chosen", "rejected"), pol.entropy.chunk(2, dim=0),
                                mask.chunk(2, dim=0)):
            metrics[f"entropy/{side}"].append(ratio((ent * m).sum(), m.sum()))
    if mode == "train":
        n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        tr._total_train_tokens += n // tr._tp_size
    metrics["num_tokens"] = [tr._total_train_tokens]
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    if pol.mean_logits is not None:
        mean_c, mean_r = pol.mean_logits.chunk(2, dim=0)
        metrics["logits/chosen"].append(ratio((mean_c * chosen_mask).sum(), chosen_mask.sum()))
        metrics["logits/rejected"].append(ratio((mean_r * rejected_mask).sum(),
                                                rejected_mask.sum()))
        top1_c, _ = pol.is_top1.chunk(2, dim=0)
        metrics["mean_token_accuracy"].append(
            ratio((top1_c & chosen_mask.bool()).sum(), chosen_mask.sum()))
    chosen_rewards = tr.beta * (chosen_logps.detach() - ref_chosen_logps)
    rejected_rewards = tr.beta * (rejected_logps.detach() - ref_rejected_logps)
    metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
    metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
    metrics["rewards/accuracies"].append(
        acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
    metrics["rewards/margins"].append(
        acc.gather(chosen_rewards - rejected_rewards).mean().item())
    metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
    metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())
    if target_probs is not None:
        metrics["targets/probs"].append(acc.gather(target_probs.detach()).mean().item())


@torch.no_grad()
def logit_stats(rows, weight, labels, bias, softcap, logit_scale, *, entropy=False):
    """Per row: the mean logit over the vocabulary, whether the label is the (first) argmax and,
    with ``entropy``, the softmax entropy (else None), in row blocks whose fp32 logits stay under
    ``_METRIC_TILE_BYTES``."""
    N, V = rows.shape[0], weight.shape[0]
    mean = torch.empty(N, dtype=torch.float32, device=rows.device)
    top1 = torch.empty(N, dtype=torch.bool, device=rows.device)
    ent = torch.empty(N, dtype=torch.float32, device=rows.device) if entropy else None
    step = max(1, _METRIC_TILE_BYTES // (4 * V))
    for i in range(0, N, step):
        z = (rows[i:i + step].to(weight.dtype) @ weight.t()).float()
        if bias is not None:
            z += bias.float()
        z = transform_logits_(z, logit_scale, softcap or 0.0)
        mean[i:i + step] = z.mean(-1)
        top1[i:i + step] = z.argmax(-1) == labels[i:i + step]
        if entropy:  # log Z - E_p[z], from the max-shifted logits
            z -= z.amax(-1, keepdim=True)
            p = z.softmax(-1)
            ent[i:i + step] = torch.logsumexp(z, -1) - (p * z).sum(-1)
    return mean, top1, ent


@torch.no_grad()
def mean_logits(rows, weight, bias, softcap, logit_scale):
    """Each row's mean logit over the vocabulary. Without soft-capping the logits are linear in
    the head, so the mean is one matrix-vector product with the head's mean row; with it, the
    tiles of :func:`logit_stats`."""
    if softcap:
        zeros = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        return logit_stats(rows, weight, zeros, bias, softcap, logit_scale)[0]
    mean = rows.float() @ weight.mean(0, dtype=torch.float32)  # no fp32 copy of the head
    if bias is not None:
        mean += bias.float().mean()
    return mean * float(logit_scale)


@torch.no_grad()
def token_stats(rows, weight, labels, bias, softcap, logit_scale, *, entropy=False,
                backend="auto"):
    """``(mean logit, is_top1, entropy or None)`` per row, as :func:`logit_stats`, from one
    no-grad pass of the fused head (its matmul and row statistics in cache; no logits tensor)
    and :func:`mean_logits`. Top-1: the label's logit is the row's max exactly when the row op's
    ``logp = (x_label - max) - log_sum`` is ``-log_sum`` (a logit within half an ulp of
    ``log_sum`` below the max counts as a tie). Soft-capped heads take :func:`logit_stats`."""
    if softcap:
        return logit_stats(rows, weight, labels, bias, softcap, logit_scale, entropy=entropy)
    rows = _autocast_rows(rows)
    be = backends.resolve(backend, rows.device, rows.dtype)
    logp, _, log_sum, ent = ops.get_op(be, "linear_logps_fwd")(
        rows, weight, bias, labels, -100, 1.0, float(logit_scale), 0.0, 0, weight.shape[0],
        bool(entropy), False)
    return _from_row_stats(rows, weight, bias, logit_scale, logp, log_sum,
                           ent if entropy else None)


def pass_token_stats(stats, rows, weight, bias, logit_scale, mask):
    """``(mean logit, is_top1, entropy)`` of the ``mask`` positions as :func:`token_stats`,
    but from the loss pass's own row statistics (``stats``: a
    :class:`fastdpo.losses.fused_linear.TokenRowStats`, its positions ``[:, :-1]`` scoring
    ``mask``'s labels) instead of a head pass of their own: only :func:`mean_logits` is left,
    a matrix-vector product. Not for soft-capped heads (their mean logit needs the tiles)."""
    logp, log_sum, ent = (t[:, :-1][mask] for t in stats)
    return _from_row_stats(_autocast_rows(rows), weight, bias, logit_scale, logp, log_sum, ent)


def _from_row_stats(rows, weight, bias, logit_scale, logp, log_sum, ent):
    """``(mean logit, is_top1, ent)`` from a row op's statistics (the top-1 rule of
    :func:`token_stats`)."""
    return mean_logits(rows, weight, bias, 0.0, logit_scale), (logp + log_sum) == 0, ent


def _autocast_rows(rows):
    """``rows`` in the autocast dtype when autocast is on (the head's matmul runs in it)."""
    if torch.is_autocast_enabled(rows.device.type):
        return rows.to(torch.get_autocast_dtype(rows.device.type))
    return rows
