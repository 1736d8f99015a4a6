"""``DPOLoss``: from the policy's logits (or hidden states + LM head) to the DPO loss, one call."""

from __future__ import annotations

import torch
from torch import nn

from .. import _validate
from ..logps import mask_sequence_starts, reduce_sequences, sequence_logps
from .dpo import dpo_loss, loss_config, update_running_mean_


class DPOLoss(nn.Module):
    """DPO-family loss of a concatenated ``[chosen; rejected]`` batch.

    The policy's sequence log-probabilities come from :func:`fastdpo.sequence_logps` (or the
    fused-linear ``fastdpo.linear.linear_sequence_logps`` given ``hidden`` + ``weight``), so the
    ``(2B, T, V)`` softmax is never materialised; the reference's, when given as logits or hidden
    states, are computed under ``torch.no_grad()`` and nothing is saved for them. Loss options are
    those of :func:`fastdpo.dpo_loss`.

    Args:
        beta, loss_type, label_smoothing, loss_weights, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef, reduction: as in :func:`fastdpo.dpo_loss`. ``ipo``,
            ``sigmoid_norm`` and ``sft`` get the completion lengths (the number of scored, i.e.
            non-ignored, labels per sequence) from ``labels``, so they divide summed log-ratios by
            the length exactly as TRL does; sequence log-probs stay sums.
        ignore_index: label of prompt / padding tokens.
        shift: causal-LM shift (logits at ``t`` score the label at ``t + 1``).
        temperature: divide the logits by it before the softmax.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        inplace_backward: the policy logits' storage receives their gradient (the logits are
            destroyed by backward). Ignored on the fused-linear path, which never holds logits.
        logit_scale, softcap: LM-head options of the fused-linear path only.
        bco_running_mean: for ``bco_pair``, shift the rewards by a running mean of the batches'
            mean implicit reward (older TRL's BCO), kept in this module's buffers ``bco_mean`` and
            ``bco_count`` (so in its ``state_dict``); updated in training mode only.
        process_group: vocabulary-parallel group: the logits (or LM-head weight) hold this rank's
            vocabulary shard (see :func:`fastdpo.sequence_logps`).
        validate: value checks (labels, target ranges); default on for CPU, off for CUDA.
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, *, loss_weights=None,
                 discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                 reduction="mean", ignore_index=-100, shift=True, temperature=1.0,
                 backend="auto", inplace_backward=False, logit_scale=1.0, softcap=None,
                 bco_running_mean=False, process_group=None, validate=None):
        super().__init__()
        self.loss_kwargs = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                loss_weights=loss_weights, discopop_tau=discopop_tau,
                                f_divergence_type=f_divergence_type,
                                f_alpha_divergence_coef=f_alpha_divergence_coef,
                                reduction=reduction, validate=validate)
        # Fail at construction on a bad configuration.
        types = loss_config(**{k: v for k, v in self.loss_kwargs.items() if k != "validate"}
                            ).loss_types
        _validate.check_optional_bool("validate", validate)
        _validate.check_temperature(temperature)
        self.ignore_index, self.shift, self.temperature = ignore_index, shift, temperature
        self.backend, self.inplace_backward, self.validate = backend, inplace_backward, validate
        self.logit_scale, self.softcap = logit_scale, softcap
        self.process_group = process_group
        if bco_running_mean and "bco_pair" not in types:
            raise ValueError("bco_running_mean applies to loss_type='bco_pair' only")
        self.bco_running_mean = bool(bco_running_mean)
        if self.bco_running_mean:
            self.register_buffer("bco_mean", torch.zeros(()))
            self.register_buffer("bco_count", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.loss_kwargs.items() if v is not None)
        return f"{kw}, shift={self.shift}, backend={self.backend!r}"

    # -- log-probabilities -------------------------------------------------------------------
    def _logps(self, labels, logits, hidden, weight, bias, cu_seqlens, *, policy: bool):
        who = "" if policy else "ref_"
        if (logits is None) == (hidden is None):
            raise ValueError(f"pass either {who}logits or {who}hidden (+ {who}weight), not both")
        if logits is not None:
            if weight is not None or bias is not None:
                raise ValueError(f"{who}weight/{who}bias belong to the {who}hidden path")
            if self.logit_scale != 1.0 or self.softcap is not None:
                raise ValueError("logit_scale and softcap apply to the fused-linear (hidden + "
                                 "weight) path only")
            return sequence_logps(logits, labels, ignore_index=self.ignore_index, shift=self.shift,
                                  temperature=self.temperature, cu_seqlens=cu_seqlens,
                                  inplace_backward=self.inplace_backward and policy,
                                  backend=self.backend, validate=self.validate,
                                  process_group=self.process_group)
        if weight is None:
            raise ValueError(f"{who}hidden needs {who}weight (the LM head, (V, H))")
        from ..linear import linear_sequence_logps  # the fused-linear path loads on first use

        return linear_sequence_logps(hidden, weight, labels, bias=bias,
                                     ignore_index=self.ignore_index, temperature=self.temperature,
                                     logit_scale=self.logit_scale, softcap=self.softcap,
                                     shift=self.shift, cu_seqlens=cu_seqlens, backend=self.backend,
                                     validate=self.validate, process_group=self.process_group)

    def _lengths(self, labels, cu_seqlens):
        """Scored tokens per sequence: the counts TRL divides by for ipo / sigmoid_norm / sft."""
        if cu_seqlens is not None and self.shift:
            labels = mask_sequence_starts(labels, cu_seqlens, self.ignore_index)
        scored = labels[..., 1:] if self.shift else labels
        ones = torch.ones(scored.shape, dtype=torch.float32, device=labels.device)
        return reduce_sequences(ones, labels, ignore_index=self.ignore_index, token_weights=None,
                                average=False, shift=self.shift, cu_seqlens=cu_seqlens,
                                validate=self.validate)

    @staticmethod
    def _split(x, name):
        if x.dim() != 1 or x.shape[0] % 2:
            raise ValueError(f"{name} must hold 2B sequences [chosen; rejected], got shape "
                             f"{tuple(x.shape)}")
        return x.chunk(2)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, logits=None, labels=None, *, ref_logps=None, ref_logits=None, hidden=None,
                weight=None, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                target_probs=None, reward_margins=None, cu_seqlens=None):
        """Loss and TRL-style metrics of one ``[chosen; rejected]`` batch.

        Args:
            logits: ``(2B, T, V)`` policy logits, the first ``B`` rows chosen, the last ``B``
                rejected (or ``(1, N, V)`` / ``(N, V)`` packed with ``cu_seqlens`` of ``2B``
                sequences). Or ``hidden`` ``(2B, T, H)`` + ``weight`` ``(V, H)`` (+ ``bias``).
            labels: ``(2B, T)`` token ids, ``ignore_index`` on prompt and padding tokens.
            ref_logps: the reference's sequence log-probs, ``(ref_chosen, ref_rejected)`` or one
                ``(2B,)`` tensor. Or ``ref_logits`` / ``ref_hidden`` + ``ref_weight`` (+
                ``ref_bias``) for the reference model's outputs on the same batch.
            target_probs, reward_margins: ``(B,)`` targets for ``soft`` / ``distill``.
            cu_seqlens: int32 sequence offsets for a packed batch.

        Returns:
            ``(loss, metrics)`` as :func:`fastdpo.dpo_loss`.
        """
        if labels is None:
            raise ValueError("labels are required")
        logps = self._logps(labels, logits, hidden, weight, bias, cu_seqlens, policy=True)
        pc, pr = self._split(logps, "the policy log-probs")
        n_ref = sum(x is not None for x in (ref_logps, ref_logits, ref_hidden))
        if n_ref != 1:
            raise ValueError("pass exactly one of ref_logps, ref_logits or ref_hidden (+ "
                             "ref_weight)")
        if ref_logps is not None:
            if isinstance(ref_logps, torch.Tensor):
                rc, rr = self._split(ref_logps, "ref_logps")
            else:
                rc, rr = ref_logps
            rc, rr = rc.detach(), rr.detach()
        else:
            with torch.no_grad():
                ref = self._logps(labels, ref_logits, ref_hidden, ref_weight, ref_bias, cu_seqlens,
                                  policy=False)
            rc, rr = self._split(ref, "the reference log-probs")
        nc, nr = self._split(self._lengths(labels, cu_seqlens), "labels")
        bco_delta = self._bco_delta(pc, pr, rc, rr) if self.bco_running_mean else None
        return dpo_loss(pc, pr, rc, rr, target_probs=target_probs, reward_margins=reward_margins,
                        chosen_lengths=nc, rejected_lengths=nr, bco_delta=bco_delta,
                        **self.loss_kwargs)

    @torch.no_grad()
    def _bco_delta(self, pc, pr, rc, rr):
        # Older TRL's BCO: update the running mean with this batch's mean reward, then shift by
        # it. On-device, no host sync; evaluation reads the state without moving it.
        if self.training:
            batch_mean = (self.loss_kwargs["beta"] * torch.cat([pc - rc, pr - rr])).mean()
            update_running_mean_(self.bco_mean, self.bco_count, batch_mean)
        return self.bco_mean.clone()

