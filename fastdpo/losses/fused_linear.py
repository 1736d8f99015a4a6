"""``linear_dpo_loss``: the DPO-family loss straight from the policy's hidden states and LM head,
with the gradients formed during the forward pass.

Equal to ``dpo_loss`` of ``linear_sequence_logps`` of both halves of a ``[chosen; rejected]``
batch, at the floor of the LM head's matmuls: the policy's logits are built once, chunk of pairs
by chunk of pairs, and each chunk's ``d logits`` is formed while they are in memory (the pair
loss's derivative is a closed form of the chunk's own sequence log-probs). See
:mod:`fastdpo.autograd.linear_loss` for the loop.

Cost, counted in ``(rows, H) x (H, V)`` matmuls over the labelled rows only:

* policy: 3 with a trainable head, 2 with a frozen one (``weight.requires_grad=False``), 1 without
  gradients; a reference given as hidden states adds 1 (no graph, nothing kept).
* ``aot`` / ``aot_unpaired`` (they sort the whole batch) and a ``bco_delta`` callable (a batch
  statistic) need every pair's log-probs before any gradient: a first log-prob pass adds 1.
* a pair streamed past the chunk budget: 1 more on its rows, but on the native CPU head the first
  streamed pair of a call costs 3 (:func:`fastdpo.autograd.linear_native.stream_unit`).
* memory: one chunk's fp32 logits (``FASTDPO_LINEAR_MEMORY_FRACTION`` of the full logits, at least
  16 MiB, 128 rows or one pair), plus the gradients themselves, kept from forward to backward.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .. import _validate, ops
from ..autograd.linear_loss import LinearPairLoss, run_pairs
from ..autograd.linear_native import streams_locally
from . import args as loss_args
from .dpo import dpo_loss, loss_config, preference_metrics
from .functional import PairInputs, combined, margin_only
from .fused_batch import logps_of, check_fixed_reference, prepare, reference_logps

# Loss types whose pair gradient depends on other pairs' log-probs (a first pass is needed).
BATCH_TYPES = ("aot", "aot_unpaired")


class TokenRowStats(NamedTuple):
    """The policy pass's statistics of each position, ``(2B, T)`` fp32 (0 where no label is
    scored, and where its token weight is 0: the pass skips those rows): ``logp`` the label's
    log-prob, ``log_sum`` ``log sum exp(x - max)`` of the row
    (so the label is the row's max exactly when ``logp == -log_sum``), ``entropy`` of the
    row's distribution; all under the head's ``temperature``. With ``shift``, position ``t``
    scores ``labels[:, t + 1]``."""
    logp: torch.Tensor
    log_sum: torch.Tensor
    entropy: torch.Tensor


def linear_pair_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, shift=True,
                      temperature=1.0, logit_scale=1.0, softcap=None, token_weights=None,
                      average=False, backend="auto", validate=None, chunk_rows=None,
                      batch_invariant=False):
    """``(chosen, rejected)`` ``(B,)`` sequence log-probs of a ``[chosen; rejected]`` batch, no
    graph: the values :func:`linear_dpo_loss` forms for the policy on the same batch and
    options, bit for bit, trainable head or frozen (its ``logps/*`` metrics; the sequence sums
    are a fixed pairwise tree on every device; on CUDA by design, not yet run on a GPU). Use it
    for reference log-probs that must cancel the policy's exactly when the two models are equal
    (TRL's rewards are then exactly 0 at the first step). Arguments as :func:`linear_dpo_loss`."""
    fb = prepare("linear_pair_logps", hidden, weight, labels, bias, parts=2,
                 ignore_index=ignore_index, shift=shift, temperature=temperature,
                 logit_scale=logit_scale, softcap=softcap, reduction="mean",
                 token_weights=token_weights, average=average, backend=backend,
                 validate=validate, chunk_rows=chunk_rows, batch_invariant=batch_invariant)
    pc, pr = logps_of(fb, fb.hidden, weight, bias, labels, shift)
    return pc, pr


def linear_dpo_loss(hidden, weight, labels, *, bias=None, ref_chosen_logps=None,
                    ref_rejected_logps=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                    beta=0.1, loss_type="sigmoid", label_smoothing=0.0, loss_weights=None,
                    discopop_tau=0.05, f_divergence_type="reverse_kl",
                    f_alpha_divergence_coef=0.5, bco_delta=None, target_probs=None,
                    reward_margins=None, reduction="mean", ignore_index=-100, shift=True,
                    temperature=1.0, logit_scale=1.0, softcap=None, token_weights=None,
                    average=False, backend="auto", validate=None, chunk_rows=None,
                    batch_invariant=False, workspace=None, chosen_lengths=None,
                    rejected_lengths=None, per_pair_metrics=False, token_stats=False):
    """DPO-family loss of a ``[chosen; rejected]`` batch from the policy's hidden states.

    Equals ``dpo_loss(pc, pr, rc, rr, ...)`` with ``(pc; pr) = linear_sequence_logps(hidden,
    weight, labels, ...)``, but forms the gradients of ``hidden`` / ``weight`` / ``bias`` in this
    call, chunk of pairs by chunk of pairs (see the module docstring for the cost). The backward
    only scales them. Differentiable in ``hidden``, ``weight``, ``bias``, ``target_probs`` and
    ``reward_margins``; a tensor that does not require a gradient costs nothing.

    Args:
        hidden: ``(2B, T, H)`` final hidden states, the ``B`` chosen sequences then the ``B``
            rejected ones (as :class:`fastdpo.DPOLoss`).
        weight, bias: the LM head ``(V, H)`` and optional ``(V,)``.
        labels: ``(2B, T)`` token ids, ``ignore_index`` on prompt and padding tokens.
        ref_chosen_logps, ref_rejected_logps: the reference's ``(B,)`` sequence log-probs; or
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states and head on the
            same batch (computed here without a graph).
        beta, loss_type, label_smoothing, loss_weights, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef, target_probs, reward_margins: as :func:`fastdpo.dpo_loss`;
            the completion lengths ``ipo`` / ``sigmoid_norm`` / ``sft`` use are the label counts,
            as :class:`fastdpo.DPOLoss` takes them, unless given:
        chosen_lengths, rejected_lengths: ``(B,)`` completion lengths to use instead (both or
            neither), as :func:`fastdpo.dpo_loss` takes them (TRL counts the unshifted
            completion mask, one more than the labels when the prompt is empty).
        bco_delta: ``bco_pair``'s reward shift: a number or one-element tensor, or a callable
            ``f(pc, pr, rc, rr) -> delta`` evaluated on this batch's detached sequence log-probs
            (e.g. to update a :class:`fastdpo.losses.RewardRunningMean`; costs a first pass).
        reduction: ``"mean"`` (TRL) or ``"sum"`` over pairs (``"none"`` is refused: the weight's
            gradient is summed over pairs in forward).
        shift: causal-LM shift, the hidden state at ``t`` scores the label at ``t + 1`` (default,
            as :class:`fastdpo.DPOLoss`).
        temperature, logit_scale, softcap: the logits are ``softcap * tanh(logit_scale * (h @ W.T
            + b) / softcap) / temperature`` (``softcap=None``: no capping).
        token_weights: ``(2B, T)`` weights of each token's log-prob in its sequence's (like
            labels; not differentiated); ``average`` divides by their sum per sequence.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``: whose row kernels run on
            each chunk of logits.
        validate: check label values and loss targets (default on for CPU tensors).
        chunk_rows: rows per chunk (default from the memory budget); a chunk holds whole pairs.
            Given, it bounds the logits held: a pair with more rows is streamed (a first
            log-prob pass, one matmul more; on the native CPU head pair by pair, the first
            streamed pair at 3 matmuls in slabs of ``chunk_rows``, the others through the
            backward that recomputes the logits in cache). Without it, only a pair over
            ``FASTDPO_LINEAR_PAIR_LIMIT_MB`` is streamed.
        batch_invariant: run every matmul and row kernel on slabs of a fixed number of rows
            (``INVARIANT_TILE_ROWS``, the last one padded), so each pair's log-probs, loss and
            hidden-state gradient rows are bitwise the same whatever other pairs the batch holds
            (the weight's gradient is a sum over the batch). Costs the padding of one slab per
            chunk and smaller matmuls.
        workspace: a :class:`fastdpo.Workspace` to keep the chunk's logits buffer in between
            calls (pass the same one every step): no fresh pages each step (a few % of a CPU
            step, :mod:`fastdpo.autograd.workspace`), for one chunk's logits held until
            ``workspace.release()``.

        per_pair_metrics: the metrics as ``(B,)`` tensors, not batch means (for callers that
            gather across ranks before averaging).
        token_stats: also return the policy pass's own row statistics (:class:`TokenRowStats`),
            so token metrics need no head pass of their own (rows of token weight 0 are
            skipped: their statistics read 0).

    fp16 inputs: the gradients are formed at unit scale in forward and kept in fp16; a loss
    scale (GradScaler) multiplies them in fp32 in backward, so it cannot overflow them, but
    entries under fp16's smallest subnormal (6e-8) are already 0 by then. With fp16 and small
    gradients (small ``beta``), prefer bf16, or ``linear_sequence_logps`` + ``dpo_loss``.

    Returns:
        ``(loss, metrics)`` as :func:`fastdpo.dpo_loss` (TRL's reward and log-prob metrics);
        with ``token_stats``, ``(loss, metrics, TokenRowStats)``.
    """
    fb = prepare("linear_dpo_loss", hidden, weight, labels, bias, parts=2,
                 ignore_index=ignore_index, shift=shift, temperature=temperature,
                 logit_scale=logit_scale, softcap=softcap, reduction=reduction,
                 token_weights=token_weights, average=average, backend=backend,
                 validate=validate, chunk_rows=chunk_rows, batch_invariant=batch_invariant,
                 workspace=workspace)
    given = ref_chosen_logps is not None or ref_rejected_logps is not None
    if given + (ref_hidden is not None) != 1:
        raise ValueError("pass the reference as ref_chosen_logps + ref_rejected_logps, or as "
                         "ref_hidden + ref_weight (not both, not neither)")
    hidden, head, pr_rows, chunks, tile = fb.hidden, fb.head, fb.rows, fb.chunks, fb.tile
    lengths, B, dev = fb.lengths, pr_rows.pairs, hidden.device
    acc = ops.acc_dtype(hidden.dtype)

    # -- the reference's log-probs
    if ref_hidden is not None:
        rc, rr = reference_logps(fb, ref_hidden, ref_weight, ref_bias, labels, shift)
    else:
        if (ref_chosen_logps is None or ref_rejected_logps is None or ref_weight is not None
                or ref_bias is not None):
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps (and no "
                             "ref_weight / ref_bias)")
        for n, t in (("ref_chosen_logps", ref_chosen_logps),
                     ("ref_rejected_logps", ref_rejected_logps)):
            _validate.check_float(n, t)
            check_fixed_reference(n, t)
            if tuple(t.shape) != (B,):
                raise ValueError(f"{n} must have shape ({B},) (one value per pair), got "
                                 f"{tuple(t.shape)}")
        rc, rr = ref_chosen_logps.detach(), ref_rejected_logps.detach()

    # -- the loss configuration (validated by a dry run of dpo_loss on this batch's shapes)
    full = loss_config(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                       loss_weights=loss_weights, discopop_tau=discopop_tau,
                       f_divergence_type=f_divergence_type,
                       f_alpha_divergence_coef=f_alpha_divergence_coef, reduction=reduction)
    types, beta = full.loss_types, full.beta
    delta_fn = bco_delta if callable(bco_delta) else None
    if delta_fn is not None and "bco_pair" not in types:
        raise ValueError("bco_delta is only used by loss_type='bco_pair'")
    nc, nr = _pair_lengths(lengths, B, chosen_lengths, rejected_lengths, acc)
    with torch.no_grad():  # the tensor checks of dpo_loss, on this batch's shapes
        z = torch.zeros(B, dtype=acc, device=dev)
        dpo_loss(z, z, rc, rr, target_probs=target_probs, reward_margins=reward_margins,
                 chosen_lengths=nc, rejected_lengths=nr,
                 bco_delta=None if delta_fn is not None else bco_delta, beta=beta,
                 loss_type=list(types), label_smoothing=full.label_smoothing,
                 loss_weights=list(full.loss_weights), discopop_tau=full.discopop_tau,
                 f_divergence_type=full.f_divergence_type,
                 f_alpha_divergence_coef=full.f_alpha_divergence_coef, reduction=reduction,
                 validate=validate)
    # sft is a sum over the whole batch's chosen tokens: kept out of the per-pair formulas
    sft_w = sum(w for t, w in zip(types, full.loss_weights) if t == "sft")
    kept = [(t, w) for t, w in zip(types, full.loss_weights) if t != "sft"]
    cfg = dataclasses.replace(full, loss_types=tuple(t for t, _ in kept),
                              loss_weights=tuple(w for _, w in kept))
    r = 1.0 / B if reduction == "mean" else 1.0
    sft_n = nc.sum().clamp(min=1)  # TRL's sft: chosen log-prob per chosen token of the batch
    sft_scale = sft_w * (1.0 if reduction == "mean" else float(B))

    def cast(t):
        return None if t is None else t.detach().to(acc)

    rc_, rr_, s_, m_ = cast(rc), cast(rr), cast(target_probs), cast(reward_margins)
    need = [torch.is_grad_enabled() and t is not None and t.requires_grad
            for t in (hidden, weight, bias, target_probs, reward_margins)]
    need_h, need_w, need_b, need_s, need_m = need
    # a pair over the budget needs a first log-prob pass unless the chunk loop streams it
    streams = fb.slab > 0 and not streams_locally(head, pr_rows, weight, bias, tile, need_w,
                                                  need_b)
    batch_mode = (delta_fn is not None or any(t in BATCH_TYPES for t in cfg.loss_types)
                  or streams)

    policy_head = dataclasses.replace(head, token_stats=bool(token_stats))
    tok = {}

    def compute():
        ds = torch.zeros(B, dtype=acc, device=dev) if need_s else None
        dm = torch.zeros(B, dtype=acc, device=dev) if need_m else None
        acc_loss = {"pairs": torch.zeros((), dtype=acc, device=dev),
                    "sft": torch.zeros((), dtype=acc, device=dev)}

        def grads_of(j0, j1, pc_c, pr_c, delta):
            """Loss parts and ``dL/dpc``, ``dL/dpr`` of pairs ``[j0, j1)`` (all types but sft
            through the losses' closed forms; sft is a sum over the batch's chosen tokens)."""
            d = {}
            if cfg.loss_types:
                sl = slice(j0, j1)
                x_in = PairInputs(pc=pc_c, pr=pr_c, rc=rc_[sl], rr=rr_[sl],
                                  s=None if s_ is None else s_[sl],
                                  m=None if m_ is None else m_[sl],
                                  nc=nc[sl], nr=nr[sl], bco_delta=delta)
                per_pair, vjp = combined(x_in, cfg)
                acc_loss["pairs"] += per_pair.sum()
                d = vjp(torch.full((j1 - j0,), r, dtype=acc, device=dev))
            for key, buf in (("s", ds), ("m", dm)):
                if buf is not None and key in d:
                    buf[j0:j1] = d[key]
            zero = torch.zeros(j1 - j0, dtype=acc, device=dev)
            gc, gr = d.get("pc", zero), d.get("pr", zero)
            if sft_w:
                acc_loss["sft"] -= sft_scale * pc_c.sum() / sft_n
                gc = gc - sft_scale / sft_n
            return gc, gr

        delta0 = 0.0 if bco_delta is None or delta_fn is not None else bco_delta
        if torch.is_tensor(delta0):
            delta0 = delta0.detach().reshape(()).to(acc)
        w_, b_ = weight.detach(), None if bias is None else bias.detach()
        with torch.no_grad():
            first = None
            if not batch_mode:
                def pair_grads(j0, j1, pc_c, pr_c):
                    return grads_of(j0, j1, pc_c, pr_c, delta0)
            else:  # first pass: every pair's log-probs, then the whole batch's pair gradients
                first = run_pairs(policy_head, pr_rows, w_, b_, chunks, None, False, False, False,
                                  tile=tile, slab=fb.slab)
                pc0, pr0 = first.logps
                delta = delta0
                if delta_fn is not None:
                    delta = delta_fn(pc0, pr0, rc_, rr_)
                    delta = loss_args.check_delta("bco_delta", delta)
                    delta = delta.to(acc) if torch.is_tensor(delta) else delta
                gc_all, gr_all = grads_of(0, B, pc0, pr0, delta)

                def pair_grads(j0, j1, pc_c, pr_c):
                    return gc_all[j0:j1], gr_all[j0:j1]

            res = run_pairs(policy_head, pr_rows, w_, b_, chunks, pair_grads, need_h, need_w,
                            need_b, hidden_shape=hidden.shape, tile=tile, slab=fb.slab,
                            known_grads=batch_mode, first=first,
                            margin_only=margin_only(cfg) and not sft_w)
            (pc, pr), d_h, d_w, d_b = res.logps, res.d_hidden, res.d_weight, res.d_bias
            tok["stats"] = res.token
            loss = acc_loss["pairs"] * r + acc_loss["sft"]
        grads = (d_h, d_w, d_b, None if ds is None else ds.to(target_probs.dtype),
                 None if dm is None else dm.to(reward_margins.dtype))
        return loss, (pc, pr), grads

    loss, pc, pr = LinearPairLoss.apply(hidden, weight, bias, target_probs, reward_margins,
                                        compute, "linear_dpo_loss")
    metrics = preference_metrics(pc, pr, rc, rr, beta, reduce=not per_pair_metrics)
    if not token_stats:
        return loss, metrics
    return loss, metrics, TokenRowStats(*(t.view(hidden.shape[:-1]) for t in tok["stats"]))


def _pair_lengths(label_counts, B, chosen_lengths, rejected_lengths, acc):
    """``(nc, nr)``: the given completion lengths (checked as :func:`fastdpo.dpo_loss` checks
    them), or the batch's label counts."""
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is None:
        return label_counts[:B], label_counts[B:]
    loss_args.check_lengths(chosen_lengths, rejected_lengths, label_counts[:B])
    return chosen_lengths.detach().to(acc), rejected_lengths.detach().to(acc)


__all__ = ["TokenRowStats", "linear_dpo_loss", "linear_pair_logps"]
