"""``DPOLoss``: from the policy's logits (or hidden states + LM head) to the DPO loss, one call."""

from __future__ import annotations

import torch

from .. import _validate
from .dpo import dpo_loss, loss_config, update_running_mean_
from .fused_linear import linear_dpo_loss
from .scoring import SequenceScorer


class DPOLoss(SequenceScorer):
    """DPO-family loss of a concatenated ``[chosen; rejected]`` batch.

    The policy's sequence log-probabilities come from :func:`fastdpo.token_logps` (or the
    fused-linear :func:`fastdpo.linear_token_logps` given ``hidden`` + ``weight``), so the
    ``(2B, T, V)`` softmax is never materialised; the reference's, when given as logits or hidden
    states, are computed without a graph and nothing is saved for them. Loss options are those
    of :func:`fastdpo.dpo_loss`.

    Args:
        beta, loss_type, label_smoothing, loss_weights, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef, reduction: as in :func:`fastdpo.dpo_loss`. ``ipo``,
            ``sigmoid_norm`` and ``sft`` get the completion lengths (the number of scored, i.e.
            non-ignored, labels per sequence) from ``labels``, so they divide summed log-ratios by
            the length exactly as TRL does.
        reference_free: no reference model: its log-probs are 0, so the implicit reward is
            ``beta * log pi(y|x)`` (CPO / SimPO style; see also :class:`fastdpo.CPOLoss`).
        average_log_prob: the pair losses see per-token average log-probs (sum over the scored
            tokens divided by their count, clamped to >= 1) instead of sums, for policy and
            reference (metrics too). ``sft`` and the NLL term still use the sums.
        nll_weight: add ``nll_weight * nll``, ``nll = -sum(chosen log-probs) / (chosen scored
            tokens)`` over the batch (TRL's ``sft`` loss type, Liger's ``compute_nll_loss``), on
            every pair; logged as ``nll_loss``.
        bco_running_mean: for ``bco_pair``, shift the rewards by a running mean of the batches'
            mean implicit reward (older TRL's BCO), kept in this module's buffers ``bco_mean`` and
            ``bco_count`` (so in its ``state_dict``); updated in training mode only.
        ignore_index, shift, temperature, backend, inplace_backward, logit_scale, softcap,
            process_group, validate, workspace: the log-prob pass, see
            :class:`fastdpo.losses.scoring.SequenceScorer`.
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, *, loss_weights=None,
                 discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                 reduction="mean", reference_free=False, average_log_prob=False, nll_weight=0.0,
                 ignore_index=-100, shift=True, temperature=1.0, backend="auto",
                 inplace_backward=False, logit_scale=1.0, softcap=None, bco_running_mean=False,
                 process_group=None, validate=None, workspace=None):
        super().__init__(ignore_index=ignore_index, shift=shift, temperature=temperature,
                         backend=backend, inplace_backward=inplace_backward,
                         logit_scale=logit_scale, softcap=softcap, process_group=process_group,
                         validate=validate, workspace=workspace)
        opts = dict(beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
                    f_divergence_type=f_divergence_type,
                    f_alpha_divergence_coef=f_alpha_divergence_coef, reduction=reduction)
        # Fail at construction on a bad configuration.
        cfg = loss_config(loss_type=loss_type, loss_weights=loss_weights, **opts)
        self.reference_free = _validate.check_bool("reference_free", reference_free)
        self.average_log_prob = _validate.check_bool("average_log_prob", average_log_prob)
        nll_weight = _validate.check_finite("nll_weight", nll_weight)
        self._log_nll = nll_weight != 0.0  # TRL's 'sft' loss type logs no nll_loss
        # The pair losses and the NLL (sft) run as two calls: sft always takes summed log-probs.
        pairs = [(t, w) for t, w in zip(cfg.loss_types, cfg.loss_weights) if t != "sft"]
        self.nll_weight = nll_weight + sum(w for t, w in zip(cfg.loss_types, cfg.loss_weights)
                                           if t == "sft")
        self.pair_kwargs = None if not pairs else dict(
            loss_type=[t for t, _ in pairs], loss_weights=[w for _, w in pairs], **opts)
        self.loss_kwargs = dict(loss_type=loss_type, loss_weights=loss_weights, **opts)
        self.beta = cfg.beta
        if bco_running_mean and "bco_pair" not in cfg.loss_types:
            raise ValueError("bco_running_mean applies to loss_type='bco_pair' only")
        self.bco_running_mean = _validate.check_bool("bco_running_mean", bco_running_mean)
        if self.bco_running_mean:
            self.register_buffer("bco_mean", torch.zeros(()))
            self.register_buffer("bco_count", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.loss_kwargs.items() if v is not None)
        flags = "".join(f", {k}=True" for k in ("reference_free", "average_log_prob")
                        if getattr(self, k))
        nll = f", nll_weight={self.nll_weight}" if self.nll_weight else ""
        return f"{kw}{flags}{nll}, {self.scorer_repr()}"

    def forward(self, logits=None, labels=None, *, ref_logps=None, ref_logits=None, hidden=None,
                weight=None, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                target_probs=None, reward_margins=None, cu_seqlens=None):
        """Loss and TRL-style metrics of one ``[chosen; rejected]`` batch.

        Args:
            logits: ``(2B, T, V)`` policy logits, the first ``B`` rows chosen, the last ``B``
                rejected (or ``(1, N, V)`` / ``(N, V)`` packed with ``cu_seqlens`` of ``2B``
                sequences). Or ``hidden`` ``(2B, T, H)`` + ``weight`` ``(V, H)`` (+ ``bias``).
            labels: ``(2B, T)`` token ids, ``ignore_index`` on prompt and padding tokens.
            ref_logps: the reference's sequence log-probs (sums), ``(ref_chosen, ref_rejected)``
                or one ``(2B,)`` tensor. Or ``ref_logits`` / ``ref_hidden`` + ``ref_weight`` (+
                ``ref_bias``) for the reference model's outputs on the same batch. None of them
                with ``reference_free``.
            target_probs, reward_margins: ``(B,)`` targets for ``soft`` / ``distill``.
            cu_seqlens: int32 sequence offsets for a packed batch.

        Returns:
            ``(loss, metrics)`` as :func:`fastdpo.dpo_loss`, plus ``nll_loss`` with an NLL term.
        """
        if self._fused_step(logits, hidden, weight, ref_logits, cu_seqlens):
            return self._linear_forward(labels, hidden, weight, bias, ref_logps, ref_hidden,
                                        ref_weight, ref_bias, target_probs, reward_margins)
        logps = self.sequences(labels, logits, hidden, weight, bias, cu_seqlens)
        pc, pr = self.split(logps, "the policy log-probs")
        rc, rr = self._reference(labels, ref_logps, ref_logits, ref_hidden, ref_weight, ref_bias,
                                 cu_seqlens, pc)
        nc, nr = self.split(self.counts(labels, cu_seqlens), "labels")
        seqs = (pc, pr, rc, rr)
        if self.average_log_prob:
            seqs = tuple(x / n.clamp(min=1) for x, n in zip(seqs, (nc, nr, nc, nr)))
        loss, metrics = 0.0, None
        if self.pair_kwargs is not None:
            bco_delta = self._bco_delta(*seqs) if self.bco_running_mean else None
            lengths = (None, None) if self.average_log_prob else (nc, nr)
            loss, metrics = dpo_loss(*seqs, target_probs=target_probs,
                                     reward_margins=reward_margins, chosen_lengths=lengths[0],
                                     rejected_lengths=lengths[1], bco_delta=bco_delta,
                                     validate=self.validate, **self.pair_kwargs)
        elif target_probs is not None or reward_margins is not None:
            raise ValueError("target_probs / reward_margins are used by loss_type 'soft' / "
                             "'distill' only")
        if self.nll_weight:
            nll, nll_metrics = dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type="sft",
                                        chosen_lengths=nc, rejected_lengths=nr,
                                        reduction=self.loss_kwargs["reduction"],
                                        validate=self.validate)
            loss = loss + self.nll_weight * nll
            metrics = metrics if metrics is not None else nll_metrics
            if self._log_nll:
                metrics["nll_loss"] = nll.detach() if nll.dim() == 0 else nll.detach()[0]
        return loss, metrics

    def _fused_step(self, logits, hidden, weight, ref_logits, cu_seqlens) -> bool:
        """Whether the policy pass can form its gradient in forward (:func:`linear_dpo_loss`:
        3 matmuls instead of 4, one chunk of logits): hidden states + head, one device, and the
        options that function takes."""
        return (logits is None and hidden is not None and weight is not None
                and ref_logits is None and cu_seqlens is None and self.process_group is None
                and self.loss_kwargs["reduction"] != "none" and not self.average_log_prob
                and not self.bco_running_mean and not self._log_nll)

    def _linear_forward(self, labels, hidden, weight, bias, ref_logps, ref_hidden, ref_weight,
                        ref_bias, target_probs, reward_margins):
        ref = {}
        if self.reference_free:
            if any(x is not None for x in (ref_logps, ref_hidden, ref_weight, ref_bias)):
                raise ValueError("reference_free=True takes no ref_logps / ref_logits / "
                                 "ref_hidden")
            zero = hidden.new_zeros(labels.shape[0] // 2, dtype=torch.float32)
            ref = dict(ref_chosen_logps=zero, ref_rejected_logps=zero)
        elif ref_logps is not None:
            if ref_hidden is not None:
                raise ValueError("pass exactly one of ref_logps, ref_logits or ref_hidden (+ "
                                 "ref_weight)")
            rc, rr = (self.split(ref_logps.detach(), "ref_logps")
                      if isinstance(ref_logps, torch.Tensor) else ref_logps)
            ref = dict(ref_chosen_logps=rc.detach(), ref_rejected_logps=rr.detach())
        elif ref_hidden is not None:
            ref = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
        else:
            raise ValueError("pass exactly one of ref_logps, ref_logits or ref_hidden (+ "
                             "ref_weight), or construct with reference_free=True")
        return linear_dpo_loss(hidden, weight, labels, bias=bias, target_probs=target_probs,
                               reward_margins=reward_margins, ignore_index=self.ignore_index,
                               shift=self.shift, temperature=self.temperature,
                               logit_scale=self.logit_scale, softcap=self.softcap,
                               backend=self.backend, validate=self.validate,
                               workspace=self.workspace, **ref, **self.loss_kwargs)

    def _reference(self, labels, ref_logps, ref_logits, ref_hidden, ref_weight, ref_bias,
                   cu_seqlens, pc):
        if self.reference_free:
            if any(x is not None for x in (ref_logps, ref_logits, ref_hidden, ref_weight,
                                           ref_bias)):
                raise ValueError("reference_free=True takes no ref_logps / ref_logits / "
                                 "ref_hidden")
            zero = torch.zeros_like(pc.detach())
            return zero, zero
        if all(x is None for x in (ref_logps, ref_logits, ref_hidden)):
            raise ValueError("pass exactly one of ref_logps, ref_logits or ref_hidden (+ "
                             "ref_weight), or construct with reference_free=True")
        ref = self.reference(labels, ref_logps, ref_logits, ref_hidden, ref_weight, ref_bias,
                             cu_seqlens)
        return self.split(ref, "ref_logps" if ref_logps is not None else "the reference log-probs")

    @torch.no_grad()
    def _bco_delta(self, pc, pr, rc, rr):
        # Older TRL's BCO: update the running mean with this batch's mean reward, then shift by
        # it. On-device, no host sync; evaluation reads the state without moving it.
        if self.training:
            batch_mean = (self.beta * torch.cat([pc - rc, pr - rr])).mean()
            update_running_mean_(self.bco_mean, self.bco_count, batch_mean)
        return self.bco_mean.clone()
