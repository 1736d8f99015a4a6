"""The part every loss module shares: per-sequence log-probs (and token counts, entropies) of a
batch, from logits or from hidden states + LM head, without the ``(N, T, V)`` softmax."""

from __future__ import annotations

import torch
from torch import nn

from .. import _validate
from ..autograd.workspace import check_workspace
from ..logps import token_logps
from ..sequences import mask_sequence_starts, reduce_sequences


class SequenceScorer(nn.Module):
    """Options of the log-prob pass; :meth:`score` runs it.

    Args:
        ignore_index: label of prompt / padding tokens.
        shift: causal-LM shift (logits at ``t`` score the label at ``t + 1``).
        temperature: divide the logits by it before the softmax.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        inplace_backward: the policy logits' storage receives their gradient (the logits are
            destroyed by backward). Ignored on the fused-linear path, which never holds logits.
        logit_scale, softcap: LM-head options of the fused-linear path only.
        process_group: vocabulary-parallel group: the logits (or LM-head weight) hold this
            rank's vocabulary shard (see :func:`fastdpo.sequence_logps`).
        validate: value checks (labels, target ranges); default on for CPU, off for CUDA.
        workspace: a :class:`fastdpo.Workspace` for the fused pair losses' chunk buffers (the
            ``hidden=, weight=`` path), kept between steps (see :func:`fastdpo.linear_dpo_loss`).
    """

    def __init__(self, *, ignore_index=-100, shift=True, temperature=1.0, backend="auto",
                 inplace_backward=False, logit_scale=1.0, softcap=None, process_group=None,
                 validate=None, workspace=None):
        super().__init__()
        check_workspace(workspace)
        self.workspace = workspace
        self.temperature = _validate.check_options(
            ignore_index=ignore_index, temperature=temperature, backend=backend,
            validate=validate, shift=shift, inplace_backward=inplace_backward)
        _validate.check_finite("logit_scale", logit_scale)
        if softcap is not None:
            _validate.check_positive_finite("softcap", softcap)
        self.ignore_index, self.shift, self.backend = ignore_index, shift, backend
        self.inplace_backward, self.validate = inplace_backward, validate
        self.logit_scale, self.softcap = logit_scale, softcap
        self.process_group = process_group

    def score(self, labels, logits=None, hidden=None, weight=None, bias=None, cu_seqlens=None, *,
              policy=True, entropy=False):
        """Per-token log-probs ``(.., T-1)`` with ``shift`` (and entropies with ``entropy``) of
        ``labels`` under ``logits`` or ``hidden @ weight.T (+ bias)``; reduce them with
        :meth:`reduce`. Packed batches: the first label of each ``cu_seqlens`` sequence is
        dropped with ``shift`` (its logits belong to the previous sequence)."""
        who = "" if policy else "ref_"
        if (logits is None) == (hidden is None):
            raise ValueError(f"pass either {who}logits or {who}hidden (+ {who}weight), not both")
        if labels is None:
            raise ValueError("labels are required")
        if cu_seqlens is not None:
            _validate.check_cu_seqlens(cu_seqlens, labels,
                                       _validate.checked_mode(self.validate, labels.device))
            if self.shift:
                labels = mask_sequence_starts(labels, cu_seqlens, self.ignore_index)
        if logits is not None:
            if weight is not None or bias is not None:
                raise ValueError(f"{who}weight/{who}bias belong to the {who}hidden path")
            if self.logit_scale != 1.0 or self.softcap is not None:
                raise ValueError("logit_scale and softcap apply to the fused-linear (hidden + "
                                 "weight) path only")
            return token_logps(logits, labels, ignore_index=self.ignore_index, shift=self.shift,
                               temperature=self.temperature, return_entropy=entropy,
                               inplace_backward=self.inplace_backward and policy,
                               backend=self.backend, validate=self.validate,
                               process_group=self.process_group)
        if weight is None:
            raise ValueError(f"{who}hidden needs {who}weight (the LM head, (V, H))")
        from ..linear import linear_token_logps  # the fused-linear path loads on first use

        return linear_token_logps(hidden, weight, labels, bias=bias,
                                  ignore_index=self.ignore_index, temperature=self.temperature,
                                  logit_scale=self.logit_scale, softcap=self.softcap,
                                  shift=self.shift, return_entropy=entropy,
                                  backend=self.backend, validate=self.validate,
                                  process_group=self.process_group)

    def reduce(self, tok, labels, cu_seqlens=None):
        """Sum of per-token values over each sequence's scored (non-ignored) labels."""
        if cu_seqlens is not None and self.shift:
            labels = mask_sequence_starts(labels, cu_seqlens, self.ignore_index)
        return reduce_sequences(tok, labels, ignore_index=self.ignore_index, token_weights=None,
                                average=False, shift=self.shift, cu_seqlens=cu_seqlens,
                                validate=self.validate)

    def counts(self, labels, cu_seqlens=None):
        """Scored tokens per sequence (the lengths TRL divides by)."""
        scored = labels[..., 1:] if self.shift else labels
        return self.reduce(torch.ones(scored.shape, dtype=torch.float32, device=labels.device),
                           labels, cu_seqlens)

    def sequences(self, labels, logits=None, hidden=None, weight=None, bias=None,
                  cu_seqlens=None, *, policy=True):
        """Summed log-probs per sequence (no graph for ``policy=False``)."""
        with torch.set_grad_enabled(policy and torch.is_grad_enabled()):
            tok = self.score(labels, logits, hidden, weight, bias, cu_seqlens, policy=policy)
            return self.reduce(tok, labels, cu_seqlens)

    def reference(self, labels, ref_logps=None, ref_logits=None, ref_hidden=None,
                  ref_weight=None, ref_bias=None, cu_seqlens=None):
        """The reference's summed log-probs, detached: given (``ref_logps``, one tensor or a
        ``(chosen, rejected)`` pair), or computed without a graph from ``ref_logits`` or
        ``ref_hidden`` + ``ref_weight`` on the same ``labels``."""
        n_ref = sum(x is not None for x in (ref_logps, ref_logits, ref_hidden))
        if n_ref != 1:
            raise ValueError("pass exactly one of ref_logps, ref_logits or ref_hidden (+ "
                             "ref_weight)")
        if ref_logps is not None:
            if not isinstance(ref_logps, torch.Tensor):
                ref_logps = torch.cat(list(ref_logps))
            return ref_logps.detach()
        return self.sequences(labels, ref_logits, ref_hidden, ref_weight, ref_bias, cu_seqlens,
                              policy=False)

    @staticmethod
    def split(x, name, parts=2):
        """``[chosen; rejected]`` halves of a ``(2B,)`` tensor."""
        if x.dim() != 1 or x.shape[0] % parts:
            raise ValueError(f"{name} must hold 2B sequences [chosen; rejected], got shape "
                             f"{tuple(x.shape)}")
        return x.chunk(parts)

    def scorer_repr(self) -> str:
        return f"shift={self.shift}, backend={self.backend!r}"
