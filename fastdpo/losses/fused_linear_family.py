"""``linear_cpo_loss``, ``linear_orpo_loss``, ``linear_kto_loss``: the reference-free and unpaired
losses straight from the policy's hidden states and LM head, gradients formed in forward.

The same one-pass loop as :func:`fastdpo.linear_dpo_loss` (:func:`fastdpo.autograd.linear_loss.
run_pairs`), parameterised by the per-pair (per-example) derivative of each loss, a closed form
of the chunk's own sequence log-probs (:mod:`fastdpo.losses.formulas`):

* the per-token averages ``ipo`` / ``simpo`` / ORPO use divide by the label counts, known before
  the loop, so ``d loss / d sum = d loss / d average / length``;
* the NLL term ``-sum(logps) / (token count)`` over the batch is linear in the token log-probs:
  its gradient per token is a constant known before the loop (ORPO's NLL over other tokens,
  ``nll_labels``, rides along as ``PairRows.extra`` on the same rows);
* KTO's KL baseline is a batch statistic without gradient: taken first (given, or a no-graph
  pass over the mismatched batch), then each example's derivative is a closed form.

The loss value and the metrics come from the public loss (:func:`fastdpo.cpo_loss` etc.) applied
to the pass's sequence log-probs, so they are those of the composition by construction.
Cost: 3 matmuls over the labelled rows with a trainable head, 2 with a frozen one; a reference
or KL batch given as hidden states adds 1 each (no graph).
"""

from __future__ import annotations

import torch

from .. import _validate, ops
from ..autograd.linear_loss import LinearPairLoss, run_pairs
from ..autograd.linear_native import streams_locally
from . import args
from .autograd import compute_dtype
from .formulas import (CPO_AVERAGED_TYPES, CPO_LOSS_TYPES, CPOConfig, cpo_terms, kto_terms,
                       orpo_terms)
from .fused_batch import check_fixed_reference, prepare, reference_logps
from .kto import kto_loss
from .reference_free import cpo_loss, orpo_loss

_HEAD_DOC = """ignore_index, shift, temperature, logit_scale, softcap, token_weights, backend,
            validate, chunk_rows, batch_invariant, workspace: as :func:`fastdpo.linear_dpo_loss`
            (no ``average``: the losses take sums, and divide by the label counts where they
            average). ``token_weights`` weight each token in its sequence's sum; the lengths
            stay the label counts, as :class:`fastdpo.CPOLoss` etc. count them. A pair over
            ``chunk_rows`` is streamed as there (one matmul more, but the first one on the native
            CPU head), except ORPO's with
            ``nll_labels`` (its NLL rows are a second term of the pass: held whole)."""


def _fused(name, fb, weight, bias, unit_grads, value, extra_grad=0.0):
    """Run the one-pass loop with ``unit_grads`` and return ``value(result)`` (the public loss on
    the pass's detached log-probs: ``(loss, metrics)``) with the gradients attached."""
    hidden = fb.hidden
    need_h, need_w, need_b = (torch.is_grad_enabled() and t is not None and t.requires_grad
                              for t in (hidden, weight, bias))
    out = {}

    def compute():
        w_, b_ = weight.detach(), None if bias is None else bias.detach()
        with torch.no_grad():
            grads_of, first = unit_grads, None
            if (fb.slab and (need_h or need_w or need_b) and fb.rows.extra is None
                    and not streams_locally(fb.head, fb.rows, w_, b_, fb.tile, need_w, need_b)):
                # a pair over the budget (chunk_rows): a first log-prob pass, then slabs with
                # the known per-pair gradients, as linear_dpo_loss streams
                first = run_pairs(fb.head, fb.rows, w_, b_, fb.chunks, None, False, False, False,
                                  tile=fb.tile, slab=fb.slab)
                known = unit_grads(0, fb.rows.pairs, *first.logps)

                def known_slice(j0, j1, *_):
                    return tuple(g[j0:j1] for g in known)
                grads_of = known_slice
            res = run_pairs(fb.head, fb.rows, w_, b_, fb.chunks, grads_of, need_h, need_w,
                            need_b, hidden_shape=hidden.shape, tile=fb.tile,
                            extra_grad=extra_grad, slab=fb.slab, known_grads=first is not None,
                            first=first)
            out["loss"], out["metrics"] = value(res)
        return out["loss"], res.logps, (res.d_hidden, res.d_weight, res.d_bias, None, None)

    loss = LinearPairLoss.apply(hidden, weight, bias, None, None, compute, name)[0]
    return loss, out["metrics"]


def _prepare(name, hidden, weight, labels, bias, parts, head, extra_labels=None, **names):
    return prepare(name, hidden, weight, labels, bias, parts=parts, average=False,
                   extra_labels=extra_labels, **head, **names)


def _chosen_only(labels, ignore_index):
    """``labels`` with the rejected half ignored (the NLL covers the chosen sequences)."""
    B = labels.shape[0] // 2
    return torch.cat([labels[:B], torch.full_like(labels[B:], ignore_index)])


def _batch_scale(reduction, B):
    """``(r, s)``: ``d loss / d per-pair loss`` and the NLL's multiplicity in the loss."""
    return (1.0 / B, 1.0) if reduction == "mean" else (1.0, float(B))


def linear_cpo_loss(hidden, weight, labels, *, bias=None, beta=0.1, loss_type="sigmoid",
                    simpo_gamma=0.5, alpha=0.0, label_smoothing=0.0, cpo_alpha=1.0,
                    reduction="mean", ignore_index=-100, shift=True, temperature=1.0,
                    logit_scale=1.0, softcap=None, token_weights=None, backend="auto",
                    validate=None, chunk_rows=None, batch_invariant=False,
                    workspace=None):
    """CPO / SimPO / AlphaPO of a ``[chosen; rejected]`` batch from the policy's hidden states.

    Equals ``cpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, ...)`` with ``(pc; pr) =
    linear_sequence_logps(hidden, weight, labels, ...)`` and ``nc``, ``nr`` the label counts
    (what :class:`fastdpo.CPOLoss` computes), with the gradients of ``hidden`` / ``weight`` /
    ``bias`` formed in this call; the backward only scales them.

    Args:
        hidden, weight, bias, labels: as :func:`fastdpo.linear_dpo_loss` (``(2B, T, H)``,
            chosen sequences first).
        beta, loss_type, simpo_gamma, alpha, label_smoothing, cpo_alpha: as
            :func:`fastdpo.cpo_loss` (the NLL term covers the chosen completions).
        reduction: ``"mean"`` or ``"sum"`` over pairs (``"none"`` is refused).
        {head}

    Returns:
        ``(loss, metrics)`` as :func:`fastdpo.cpo_loss`.
    """
    opts = dict(beta=beta, loss_type=loss_type, simpo_gamma=simpo_gamma, alpha=alpha,
                label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)
    one, z = torch.ones(1), torch.zeros(1)  # a one-pair dry run checks the options
    cpo_loss(z, z, chosen_lengths=one, rejected_lengths=one, **opts)
    head = dict(ignore_index=ignore_index, shift=shift, temperature=temperature,
                logit_scale=logit_scale, softcap=softcap, reduction=reduction,
                token_weights=token_weights, backend=backend, validate=validate,
                chunk_rows=chunk_rows, batch_invariant=batch_invariant,
                workspace=workspace)
    fb = _prepare("linear_cpo_loss", hidden, weight, labels, bias, 2, head)
    kind = args.loss_types(loss_type, CPO_LOSS_TYPES, many=False)[0]
    cfg = CPOConfig(beta=float(beta), loss_type=kind, simpo_gamma=float(simpo_gamma),
                    alpha=float(alpha), label_smoothing=float(label_smoothing))
    B = fb.rows.pairs
    nc, nr = fb.lengths[:B], fb.lengths[B:]
    sc, sr = ((1.0 / nc.clamp(min=1), 1.0 / nr.clamp(min=1)) if kind in CPO_AVERAGED_TYPES
              else (torch.ones_like(nc), torch.ones_like(nr)))
    r, s = _batch_scale(reduction, B)
    nll_g = -float(cpo_alpha) * s / nc.sum().clamp(min=1)  # d (cpo_alpha * nll) / d pc_j

    def unit_grads(j0, j1, pc, pr):
        c, d = sc[j0:j1], sr[j0:j1]
        t = cpo_terms(pc * c, pr * d, cfg)
        return r * t.d_chosen * c + nll_g, r * t.d_rejected * d

    def value(res):
        pc, pr = res.logps
        return cpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, reduction=reduction,
                        validate=validate, **opts)

    return _fused("linear_cpo_loss", fb, weight, bias, unit_grads, value)


def linear_orpo_loss(hidden, weight, labels, *, bias=None, beta=0.1, nll_weight=1.0,
                     nll_labels=None, reduction="mean", ignore_index=-100, shift=True,
                     temperature=1.0, logit_scale=1.0, softcap=None, token_weights=None,
                     backend="auto", validate=None, chunk_rows=None, batch_invariant=False,
                     workspace=None):
    """ORPO of a ``[chosen; rejected]`` batch from the policy's hidden states.

    Equals ``orpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, nll_logps=..., ...)`` of
    ``linear_sequence_logps`` (as :class:`fastdpo.ORPOLoss` computes it), gradients formed here.

    Args:
        hidden, weight, bias, labels: as :func:`linear_cpo_loss`.
        beta, nll_weight: as :func:`fastdpo.orpo_loss`.
        nll_labels: ``(2B, T)`` like ``labels``: the tokens of the chosen NLL (TRL's ORPO takes
            prompt and completion: the input ids with padding as ``ignore_index``). It must
            equal ``labels`` wherever those are scored (checked under ``validate``); its extra
            rows (prompt tokens) join the same pass, weighted by ``token_weights`` like the
            others. Rows of rejected sequences are not read. Default: the chosen completions.
        reduction: ``"mean"`` or ``"sum"`` over pairs.
        {head}

    Returns:
        ``(loss, metrics)`` as :func:`fastdpo.orpo_loss`.
    """
    one, z = torch.ones(1), torch.zeros(1)
    extra = dict(nll_logps=z - 1, nll_lengths=one) if nll_labels is not None else {}
    orpo_loss(z - 1, z - 1, chosen_lengths=one, rejected_lengths=one, beta=beta,
              nll_weight=nll_weight, **extra)
    head = dict(ignore_index=ignore_index, shift=shift, temperature=temperature,
                logit_scale=logit_scale, softcap=softcap, reduction=reduction,
                token_weights=token_weights, backend=backend, validate=validate,
                chunk_rows=chunk_rows, batch_invariant=batch_invariant,
                workspace=workspace)
    extra_labels = None
    if nll_labels is not None:
        _validate.check_index("labels", labels)
        if not isinstance(nll_labels, torch.Tensor) or nll_labels.shape != labels.shape:
            raise ValueError(f"nll_labels must be a tensor shaped like labels "
                             f"{tuple(labels.shape)}")
        _validate.check_index("nll_labels", nll_labels)
        _validate.check_same_device(labels=labels, nll_labels=nll_labels)
        args.require_values(
            validate, labels,
            lambda: ((labels == ignore_index) | (labels == nll_labels)).all(),
            "nll_labels must equal labels wherever labels are not ignore_index")
        extra_labels = _chosen_only(nll_labels, ignore_index)
    fb = _prepare("linear_orpo_loss", hidden, weight, labels, bias, 2, head, extra_labels,
                  extra_name="nll_labels")
    B = fb.rows.pairs
    nc, nr = fb.lengths[:B], fb.lengths[B:]
    sc, sr = 1.0 / nc.clamp(min=1), 1.0 / nr.clamp(min=1)
    r, s = _batch_scale(reduction, B)
    n_nll = (nc if extra_labels is None else fb.extra_lengths[:B]).sum().clamp(min=1)
    nll_g = -float(nll_weight) * s / n_nll
    beta = float(beta)

    def unit_grads(j0, j1, pc, pr):
        c, d = sc[j0:j1], sr[j0:j1]
        t = orpo_terms(pc * c, pr * d, beta)
        gc = r * t.d_chosen * c
        return (gc + nll_g if extra_labels is None else gc), r * t.d_rejected * d

    def value(res):
        pc, pr = res.logps
        nll = {} if extra_labels is None else dict(nll_logps=res.extra[0],
                                                   nll_lengths=fb.extra_lengths[:B])
        return orpo_loss(pc, pr, chosen_lengths=nc, rejected_lengths=nr, beta=beta,
                         nll_weight=nll_weight, reduction=reduction, validate=validate, **nll)

    return _fused("linear_orpo_loss", fb, weight, bias, unit_grads, value,
                  extra_grad=nll_g if extra_labels is not None else 0.0)


def _kl_logps(kl_hidden, kl_labels, weight, bias, ref_kl_hidden, ref_weight, ref_bias, head):
    """The KL batch's policy (and reference) sequence log-probs, no graph: a pass each."""
    if kl_labels is None:
        raise ValueError("kl_hidden needs kl_labels (the mismatched batch's labels, (B_kl, T))")
    kh = dict(head, token_weights=None)  # TRL's KL log-probs are plain sums
    with torch.no_grad():
        fb = _prepare("linear_kto_loss", kl_hidden.detach(), weight.detach(), kl_labels,
                      None if bias is None else bias.detach(), 1, kh, hidden_name="kl_hidden",
                      labels_name="kl_labels")
        pol = run_pairs(fb.head, fb.rows, weight.detach(),
                        None if bias is None else bias.detach(), fb.chunks, None, False, False,
                        False, tile=fb.tile).logps[0]
        ref = None
        if ref_kl_hidden is not None:
            ref = reference_logps(fb, ref_kl_hidden, ref_weight, ref_bias, kl_labels,
                                  head["shift"])[0]
    return pol, ref


def linear_kto_loss(hidden, weight, labels, desirable, *, bias=None, ref_logps=None,
                    ref_hidden=None, ref_weight=None, ref_bias=None, policy_kl_logps=None,
                    ref_kl_logps=None, kl=None, kl_hidden=None, kl_labels=None,
                    ref_kl_hidden=None, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
                    loss_type="kto", reduction="mean", ignore_index=-100, shift=True,
                    temperature=1.0, logit_scale=1.0, softcap=None, token_weights=None,
                    backend="auto", validate=None, chunk_rows=None, batch_invariant=False,
                    workspace=None):
    """KTO (or unpaired APO-zero) of ``B`` unpaired completions from the policy's hidden states.

    Equals ``kto_loss(linear_sequence_logps(hidden, weight, labels, ...), ref, desirable, ...)``,
    gradients formed here: the KL baseline is taken before the loop, then each example's
    derivative is a closed form.

    Args:
        hidden: ``(B, T, H)``; weight, bias: the LM head; labels: ``(B, T)``.
        desirable: ``(B,)`` bool, True for a desirable completion.
        ref_logps: the reference's ``(B,)`` sequence log-probs; or ref_hidden, ref_weight,
            ref_bias: the reference model's hidden states and head on the same batch.
        policy_kl_logps, ref_kl_logps, kl: the KL baseline as :func:`fastdpo.kto_loss`; or
            kl_hidden + kl_labels: the policy's hidden states on the mismatched batch (scored
            through ``weight`` / ``bias`` without a graph), with ``ref_kl_logps`` or
            ``ref_kl_hidden`` (through ``ref_weight`` / ``ref_bias``); plain sums, no token
            weights, as TRL's.
        beta, desirable_weight, undesirable_weight, loss_type: as :func:`fastdpo.kto_loss`.
        reduction: ``"mean"`` or ``"sum"`` over examples.
        {head}

    Returns:
        ``(loss, metrics)`` as :func:`fastdpo.kto_loss`.
    """
    opts = dict(beta=beta, desirable_weight=desirable_weight,
                undesirable_weight=undesirable_weight, loss_type=loss_type)
    one_d = isinstance(desirable, torch.Tensor) and desirable.dim() == 1
    z = torch.zeros(desirable.shape if one_d else (1,),
                    device=hidden.device if isinstance(hidden, torch.Tensor) else None)
    kto_loss(z, z, desirable, kl=0.0 if loss_type == "kto" else None, **opts)  # the options
    head = dict(ignore_index=ignore_index, shift=shift, temperature=temperature,
                logit_scale=logit_scale, softcap=softcap, reduction=reduction,
                token_weights=token_weights, backend=backend, validate=validate,
                chunk_rows=chunk_rows, batch_invariant=batch_invariant,
                workspace=workspace)
    fb = _prepare("linear_kto_loss", hidden, weight, labels, bias, 1, head)
    B = fb.rows.pairs
    if tuple(desirable.shape) != (B,):
        raise ValueError(f"desirable must have shape ({B},) (one flag per completion), got "
                         f"{tuple(desirable.shape)}")
    if (ref_logps is not None) + (ref_hidden is not None) != 1:
        raise ValueError("pass exactly one of ref_logps or ref_hidden (+ ref_weight)")
    if ref_hidden is not None:
        ref = reference_logps(fb, ref_hidden, ref_weight, ref_bias, labels, shift)[0]
    else:
        if ref_kl_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight / ref_bias belong to ref_hidden or ref_kl_hidden")
        args.check_logps(("ref_logps",), (ref_logps,))
        check_fixed_reference("ref_logps", ref_logps)
        if tuple(ref_logps.shape) != (B,):
            raise ValueError(f"ref_logps must have shape ({B},), got {tuple(ref_logps.shape)}")
        ref = ref_logps.detach()
    if kl_hidden is not None:
        if policy_kl_logps is not None or kl is not None:
            raise ValueError("pass kl_hidden (+ kl_labels), policy_kl_logps or kl, not several")
        if (ref_kl_logps is not None) + (ref_kl_hidden is not None) != 1:
            raise ValueError("kl_hidden needs the reference's KL log-probs: ref_kl_logps or "
                             "ref_kl_hidden (+ ref_weight), exactly one")
        policy_kl_logps, ref_kl = _kl_logps(kl_hidden, kl_labels, weight, bias, ref_kl_hidden,
                                            ref_weight, ref_bias, head)
        ref_kl_logps = ref_kl if ref_kl is not None else ref_kl_logps
    elif kl_labels is not None or ref_kl_hidden is not None:
        raise ValueError("kl_labels / ref_kl_hidden need kl_hidden (the policy's hidden states "
                         "on the mismatched batch)")
    acc = ops.acc_dtype(fb.hidden.dtype)
    # the KL baseline (checked and clamped by kto_loss itself)
    kl_t = kto_loss(torch.zeros(B, dtype=acc, device=hidden.device), ref, desirable,
                    policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps, kl=kl,
                    **opts)[1]["kl"]
    kl_arg = None if args.loss_types(loss_type, ("kto", "apo_zero_unpaired"),
                                     many=False)[0] != "kto" else kl_t
    dt = compute_dtype(kl_t, ref)
    ref_ = ref.to(dt)
    r, _ = _batch_scale(reduction, B)
    wd, wu, beta = float(desirable_weight), float(undesirable_weight), float(beta)

    def unit_grads(j0, j1, pol):
        _, dlr = kto_terms(pol.to(dt) - ref_[j0:j1], desirable[j0:j1], kl_t, beta, wd, wu)
        return (r * dlr,)

    def value(res):
        return kto_loss(res.logps[0], ref, desirable, kl=kl_arg, reduction=reduction,
                        validate=validate, **opts)

    return _fused("linear_kto_loss", fb, weight, bias, unit_grads, value)


for _fn in (linear_cpo_loss, linear_orpo_loss, linear_kto_loss):
    _fn.__doc__ = _fn.__doc__.replace("{head}", _HEAD_DOC)

__all__ = ["linear_cpo_loss", "linear_orpo_loss", "linear_kto_loss"]
