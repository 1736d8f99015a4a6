"""Loss modules of the reference-free (CPO / SimPO / AlphaPO, ORPO) and unpaired (KTO) losses:
from logits, or hidden states + LM head, to the loss in one call, never holding the softmax.

Each computes per-token log-probs with :class:`fastdpo.losses.scoring.SequenceScorer`, reduces
them per sequence and calls :func:`fastdpo.cpo_loss`, :func:`fastdpo.orpo_loss` or
:func:`fastdpo.kto_loss`, whose options it takes. Given ``hidden`` + ``weight`` (one device, no
packing, ``reduction`` other than ``"none"``) they call the fused :func:`fastdpo.linear_cpo_loss`
etc. instead, which form the gradient in forward (3 matmuls, 2 with a frozen head, against 4).
"""

from __future__ import annotations

import torch

from . import args
from .fused_linear_family import linear_cpo_loss, linear_kto_loss, linear_orpo_loss
from .kto import kto_loss
from .reference_free import cpo_loss, orpo_loss
from .scoring import SequenceScorer

_SCORER_DOC = """ignore_index, shift, temperature, backend, inplace_backward, logit_scale, softcap,
            process_group, validate, workspace: the log-prob pass, see
            :class:`fastdpo.losses.scoring.SequenceScorer`."""


def _fused(mod, logits, hidden, weight, cu_seqlens, ref_logits=None) -> bool:
    """Whether the policy pass can form its gradient in forward (the ``linear_*_loss`` path):
    hidden states + head, one device, no packing, a scalar loss."""
    return (logits is None and hidden is not None and weight is not None and ref_logits is None
            and cu_seqlens is None and mod.process_group is None
            and mod.loss_kwargs["reduction"] != "none")


def _head(mod):
    return dict(ignore_index=mod.ignore_index, shift=mod.shift, temperature=mod.temperature,
                logit_scale=mod.logit_scale, softcap=mod.softcap, backend=mod.backend,
                validate=mod.validate, workspace=mod.workspace)


def _policy(mod, labels, logits, hidden, weight, bias, cu_seqlens):
    """Summed policy log-probs and scored-token counts per sequence."""
    return (mod.sequences(labels, logits, hidden, weight, bias, cu_seqlens),
            mod.counts(labels, cu_seqlens))


class CPOLoss(SequenceScorer):
    """:func:`fastdpo.cpo_loss` of a ``[chosen; rejected]`` batch: CPO, SimPO
    (``loss_type="simpo", cpo_alpha=0``), AlphaPO (``alpha != 0``). ``ipo``/``simpo`` see
    per-token averages and the NLL term covers the chosen completions, as in TRL's
    ``CPOTrainer``.

    Args:
        beta, loss_type, simpo_gamma, alpha, label_smoothing, cpo_alpha, reduction: as
            :func:`fastdpo.cpo_loss`.
        {scorer}
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", *, simpo_gamma=0.5, alpha=0.0,
                 label_smoothing=0.0, cpo_alpha=1.0, reduction="mean", **scorer):
        super().__init__(**scorer)
        self.loss_kwargs = dict(beta=beta, loss_type=loss_type, simpo_gamma=simpo_gamma,
                                alpha=alpha, label_smoothing=label_smoothing,
                                cpo_alpha=cpo_alpha, reduction=reduction)
        one, z = torch.ones(1), torch.zeros(1)  # a one-pair dry run checks the options
        cpo_loss(z, z, chosen_lengths=one, rejected_lengths=one, **self.loss_kwargs)

    def forward(self, logits=None, labels=None, *, hidden=None, weight=None, bias=None,
                cu_seqlens=None):
        """``logits`` ``(2B, T, V)`` (or ``hidden`` + ``weight``), ``labels`` ``(2B, T)``
        (``ignore_index`` on prompt and padding), chosen rows first; or packed with
        ``cu_seqlens``. Returns ``(loss, metrics)`` as :func:`fastdpo.cpo_loss`."""
        if _fused(self, logits, hidden, weight, cu_seqlens):
            return linear_cpo_loss(hidden, weight, labels, bias=bias, **_head(self),
                                   **self.loss_kwargs)
        logps, counts = _policy(self, labels, logits, hidden, weight, bias, cu_seqlens)
        pc, pr = self.split(logps, "the policy log-probs")
        nc, nr = self.split(counts, "labels")
        return cpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, validate=self.validate,
                        **self.loss_kwargs)


class ORPOLoss(SequenceScorer):
    """:func:`fastdpo.orpo_loss` of a ``[chosen; rejected]`` batch: the odds ratio of per-token
    average log-probs plus ``nll_weight`` times the chosen NLL.

    Args:
        beta, nll_weight, reduction: as :func:`fastdpo.orpo_loss`.
        {scorer}
    """

    def __init__(self, beta=0.1, *, nll_weight=1.0, reduction="mean", **scorer):
        super().__init__(**scorer)
        self.loss_kwargs = dict(beta=beta, nll_weight=nll_weight, reduction=reduction)
        one, z = torch.ones(1), torch.zeros(1)
        orpo_loss(z - 1, z - 1, chosen_lengths=one, rejected_lengths=one, **self.loss_kwargs)

    def forward(self, logits=None, labels=None, *, nll_labels=None, hidden=None, weight=None,
                bias=None, cu_seqlens=None):
        """As :meth:`CPOLoss.forward`. ``nll_labels`` (shaped like ``labels``) sets the tokens of
        the chosen NLL; TRL's ORPO takes prompt and completion (the input ids with padding as
        ``ignore_index``). It must agree with ``labels`` wherever those are scored; the same
        single log-prob pass serves both (rows of rejected sequences are not read for the NLL:
        set them to ``ignore_index`` to skip their prompt tokens). Default: the completions."""
        if _fused(self, logits, hidden, weight, cu_seqlens):
            return linear_orpo_loss(hidden, weight, labels, bias=bias, nll_labels=nll_labels,
                                    **_head(self), **self.loss_kwargs)
        if nll_labels is None:
            logps, counts = _policy(self, labels, logits, hidden, weight, bias, cu_seqlens)
            pc, pr = self.split(logps, "the policy log-probs")
            nc, nr = self.split(counts, "labels")
            return orpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr,
                             validate=self.validate, **self.loss_kwargs)
        if not isinstance(nll_labels, torch.Tensor) or nll_labels.shape != labels.shape:
            raise ValueError(f"nll_labels must be a tensor shaped like labels "
                             f"{tuple(labels.shape)}")
        args.require_values(
            self.validate, labels,
            lambda: ((labels == self.ignore_index) | (labels == nll_labels)).all(),
            "nll_labels must equal labels wherever labels are not ignore_index")
        tok = self.score(nll_labels, logits, hidden, weight, bias, cu_seqlens)
        pc, pr = self.split(self.reduce(tok, labels, cu_seqlens), "the policy log-probs")
        nc, nr = self.split(self.counts(labels, cu_seqlens), "labels")
        nll_logps, _ = self.split(self.reduce(tok, nll_labels, cu_seqlens), "nll_labels")
        nll_lengths, _ = self.split(self.counts(nll_labels, cu_seqlens), "nll_labels")
        return orpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, nll_logps=nll_logps,
                         nll_lengths=nll_lengths, validate=self.validate, **self.loss_kwargs)


class KTOLoss(SequenceScorer):
    """:func:`fastdpo.kto_loss` of a batch of unpaired completions.

    The KL baseline comes from a batch of mismatched (prompt, completion) pairs: pass
    ``policy_kl_logps`` and ``ref_kl_logps`` (compute them without a graph, e.g.
    ``module.sequences(kl_labels, kl_logits, policy=False)``), or ``kl``.

    Args:
        beta, desirable_weight, undesirable_weight, loss_type, reduction: as
            :func:`fastdpo.kto_loss`.
        {scorer}
    """

    def __init__(self, beta=0.1, *, desirable_weight=1.0, undesirable_weight=1.0,
                 loss_type="kto", reduction="mean", **scorer):
        super().__init__(**scorer)
        self.loss_kwargs = dict(beta=beta, desirable_weight=desirable_weight,
                                undesirable_weight=undesirable_weight, loss_type=loss_type,
                                reduction=reduction)
        z = torch.zeros(1)
        kto_loss(z, z, torch.ones(1, dtype=torch.bool),
                 kl=0.0 if loss_type == "kto" else None, **self.loss_kwargs)

    def forward(self, logits=None, labels=None, desirable=None, *, ref_logps=None,
                ref_logits=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                policy_kl_logps=None, ref_kl_logps=None, kl=None, hidden=None, weight=None,
                bias=None, cu_seqlens=None):
        """``logits`` ``(B, T, V)`` (or ``hidden`` + ``weight``) and ``labels`` ``(B, T)`` of B
        completions, ``desirable`` ``(B,)`` bool; the reference as ``ref_logps`` ``(B,)`` or
        ``ref_logits`` / ``ref_hidden`` + ``ref_weight``. Returns :func:`fastdpo.kto_loss`'s
        ``(loss, metrics)``."""
        if _fused(self, logits, hidden, weight, cu_seqlens, ref_logits):
            if ref_logps is not None and not isinstance(ref_logps, torch.Tensor):
                ref_logps = torch.cat(list(ref_logps))
            return linear_kto_loss(hidden, weight, labels, desirable, bias=bias,
                                   ref_logps=ref_logps, ref_hidden=ref_hidden,
                                   ref_weight=ref_weight, ref_bias=ref_bias,
                                   policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps,
                                   kl=kl, **_head(self), **self.loss_kwargs)
        logps = self.sequences(labels, logits, hidden, weight, bias, cu_seqlens)
        ref = self.reference(labels, ref_logps, ref_logits, ref_hidden, ref_weight, ref_bias,
                             cu_seqlens)
        return kto_loss(logps, ref, desirable, policy_kl_logps=policy_kl_logps,
                        ref_kl_logps=ref_kl_logps, kl=kl, validate=self.validate,
                        **self.loss_kwargs)


for _cls in (CPOLoss, ORPOLoss, KTOLoss):
    _cls.__doc__ = _cls.__doc__.replace("{scorer}", _SCORER_DOC)

__all__ = ["CPOLoss", "ORPOLoss", "KTOLoss"]
