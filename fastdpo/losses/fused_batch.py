"""The checked inputs of a fused-head loss pass (:class:`FusedBatch`, :func:`prepare`): shapes,
dtypes, devices and options of hidden states, head and labels, each row's weight in its
sequence, the chunks of whole pairs, and the reference's log-probs on the same rows."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _validate, backends, ops
from ..autograd.linear import flat_rows
from ..autograd.linear_loss import (INVARIANT_TILE_ROWS, Head, PairRows, build_rows,
                                   chunk_pairs, pair_limit_rows, plan_rows, run_pairs, unit_rows)
from ..autograd.workspace import check_workspace
from ..torch_backend.matmul import dz_bytes
from ..sequences import average_weights, token_weights_of


def check_head(hidden, weight, labels, bias, name="", paired=True, hidden_name=None,
               labels_name="labels"):
    """Shapes, dtypes and devices of a fused pass's inputs; ``name`` prefixes the head's
    arguments (``ref_``), ``hidden_name`` / ``labels_name`` name a batch of another role."""
    hn = hidden_name or f"{name}hidden"
    _validate.check_float(hn, hidden)
    _validate.check_float(f"{name}weight", weight)
    if bias is not None:
        _validate.check_float(f"{name}bias", bias)
    _validate.check_same_device(**{hn: hidden, f"{name}weight": weight, f"{name}bias": bias,
                                   labels_name: labels})
    if paired and (hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[0] % 2):
        raise ValueError(f"{hn} must be (2B, T, H) with the B chosen sequences first, "
                         f"then the B rejected ones, got shape {tuple(hidden.shape)}")
    if not paired and (hidden.dim() != 3 or hidden.shape[0] == 0):
        raise ValueError(f"{hn} must be (B, T, H), one row per completion, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{name}weight must be (V, H) with H = {hidden.shape[-1]} (the last "
                         f"dimension of {hn}) and V > 0, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{labels_name} must have shape {tuple(hidden.shape[:2])} to match "
                         f"{hn} {tuple(hidden.shape)}, got {tuple(labels.shape)}")


def _check_options(temperature, logit_scale, softcap, reduction, shift, labels, name):
    _validate.check_temperature(temperature)
    _validate.check_logit_transform(logit_scale, softcap)
    if reduction not in ("mean", "sum"):
        loss = name.replace("linear_", "")
        raise ValueError(f"reduction must be 'mean' or 'sum' for {name} (its gradient is formed "
                         f"in forward for a scalar loss), got {reduction!r}; for per-pair "
                         f"losses use linear_sequence_logps + {loss}")
    if shift and labels.shape[1] < 1:
        raise ValueError("shift=True needs at least one position")


def _row_weights(labels, token_weights, ignore_index, shift, average, acc):
    """Each row's weight in its sequence's log-prob (flat) and the label counts per sequence."""
    active = labels != ignore_index
    if shift:
        pad = torch.zeros_like(active[:, :1])
        active = torch.cat([active[:, 1:], pad], 1)
    tw = token_weights
    if tw is not None:
        _validate.check_token_weights(tw, labels)
        if shift:
            tw = torch.cat([tw[:, 1:], torch.zeros_like(tw[:, :1])], 1)
    w = token_weights_of(active, tw, acc)
    lengths = active.sum(1).to(acc)
    if average:
        w = average_weights(w)
    # rows of weight 0 add nothing to any sum or gradient: skipped like ignored rows
    return w.reshape(-1), lengths


@dataclasses.dataclass
class FusedBatch:
    """One fused pass's checked inputs: the head options, the rows and their chunks."""
    hidden: torch.Tensor    # the policy's hidden states (in the autocast dtype under autocast)
    head: Head
    rows: PairRows
    chunks: list
    tile: int               # slab rows under batch invariance, else 0
    lab: torch.Tensor       # (N,) each row's label (shift applied)
    w_rows: torch.Tensor    # (N,) each row's weight in its sequence's log-prob
    lengths: torch.Tensor   # (parts * B,) label counts
    extra_lengths: Optional[torch.Tensor]  # (parts * B,) counts of extra_labels
    V: int
    slab: int = 0           # > 0: a pair exceeds the chunk budget; stream slabs of this many rows


def prepare(name, hidden, weight, labels, bias, *, parts, ignore_index, shift, temperature,
            logit_scale, softcap, reduction, token_weights, average, backend, validate,
            chunk_rows, batch_invariant, extra_labels=None, workspace=None,
            hidden_name="hidden", labels_name="labels",
            extra_name="extra_labels") -> FusedBatch:
    """Checks and rows of a fused pass over ``parts * B`` sequences. ``extra_labels`` (shaped
    like ``labels``, equal to them wherever both are scored) marks the tokens of a term linear in
    the token log-probs (``PairRows.extra``, token weights applied); a row scored by either takes
    the label it has. ``*_name``: the public names of those arguments, for the errors."""
    _validate.check_index(labels_name, labels)  # before check_head reads its shape
    check_head(hidden, weight, labels, bias, paired=parts == 2, hidden_name=hidden_name,
               labels_name=labels_name)
    _validate.check_options(ignore_index=ignore_index, temperature=temperature, backend=backend,
                            validate=validate, shift=shift, batch_invariant=batch_invariant,
                            average=average)
    if chunk_rows is not None:
        _validate.check_int("chunk_rows", chunk_rows, minimum=1)
    check_workspace(workspace)
    _check_options(temperature, logit_scale, softcap, reduction, shift, labels, name)
    dev = hidden.device
    if torch.is_autocast_enabled(dev.type):  # compute in the autocast dtype, like F.linear
        hidden = hidden.to(torch.get_autocast_dtype(dev.type))
    acc = ops.acc_dtype(hidden.dtype)
    V = weight.shape[0]
    checked = _validate.checked_mode(validate, dev)
    if checked:
        _validate.check_label_values(labels, ignore_index, V, labels_name)
    head = _head(backend, hidden, ignore_index, temperature, logit_scale, softcap, workspace)
    w_rows, lengths = _row_weights(labels, token_weights, ignore_index, shift, average, acc)
    h2, lab = flat_rows(hidden, labels, shift, ignore_index)
    extra = extra_lengths = None
    if extra_labels is not None:
        if checked:
            _validate.check_label_values(extra_labels, ignore_index, V, extra_name)
        extra, extra_lengths = _row_weights(extra_labels, token_weights, ignore_index, shift,
                                            False, acc)
        _, elab = flat_rows(hidden, extra_labels, shift, ignore_index)
        lab = torch.where(lab != ignore_index, lab, elab)
    B = hidden.shape[0] // parts
    rows = build_rows(h2, lab, w_rows, B, labels.shape[1], acc, parts=parts, extra=extra)
    dz = dz_bytes(hidden.dtype, hidden.device)
    cap = plan_rows(h2.shape[0], V, hidden.element_size(), bool(softcap), chunk_rows, dz)
    tile = INVARIANT_TILE_ROWS if batch_invariant else 0
    chunks = chunk_pairs(rows, cap)
    # a chunk holds whole pairs: one pair over the budget is streamed instead (a first log-prob
    # pass, then slabs of rows with the known pair gradients: 1 matmul more on those rows; the
    # native head streams pair by pair, the first pair at no matmul more: linear_native)
    limit = pair_limit_rows(cap, V, bool(softcap), chunk_rows, dz)
    big = any(unit_rows(rows, j0, j1) > limit for j0, j1 in chunks if j1 - j0 == 1)
    return FusedBatch(hidden, head, rows, chunks, tile, lab, w_rows, lengths, extra_lengths, V,
                      slab=cap if big else 0)


def check_fixed_reference(name, t):
    """The fused losses form their gradients in forward for the policy only: a reference
    log-prob that needs a gradient would silently get none (``dpo_loss`` differentiates it)."""
    if torch.is_grad_enabled() and t.requires_grad:
        raise ValueError(f"{name} requires grad, but the fused losses treat the reference as "
                         f"fixed: pass {name}.detach(), or use the loss on log-probs "
                         f"(fastdpo.dpo_loss / kto_loss) to differentiate it")


def reference_logps(fb: FusedBatch, ref_hidden, ref_weight, ref_bias, labels, shift):
    """The reference model's sequence log-probs on the same batch (no graph, nothing kept):
    one tensor per part."""
    if ref_weight is None:
        raise ValueError("ref_hidden needs ref_weight (the reference LM head, (V, H))")
    check_head(ref_hidden, ref_weight, labels, ref_bias, "ref_", paired=fb.rows.parts == 2)
    if ref_weight.shape[0] != fb.V:
        raise ValueError(f"ref_weight has {ref_weight.shape[0]} vocabulary rows, weight {fb.V}")
    return logps_of(fb, ref_hidden, ref_weight, ref_bias, labels, shift)


def logps_of(fb: FusedBatch, hidden, weight, bias, labels, shift):
    """Sequence log-probs of ``hidden`` under ``weight`` on ``fb``'s rows and chunks, no graph:
    the same kernels and sums as ``fb``'s own pass, so equal models give equal bits (the sums
    are a fixed pairwise tree on every device; on CUDA by design, not yet run on a GPU)."""
    pr = fb.rows
    acc = pr.scale.dtype
    with torch.no_grad():
        rh = hidden.detach()
        rh = rh.to(fb.hidden.dtype) if rh.dtype != fb.hidden.dtype else rh
        r2, _ = flat_rows(rh, labels, shift, fb.head.ignore_index)
        # the same rows as the policy's: its plan (and its host sync) serves again, unless a
        # second term added rows of its own
        rows = (dataclasses.replace(pr, h2=r2) if pr.extra is None else
                build_rows(r2, fb.lab, fb.w_rows, pr.pairs, labels.shape[1], acc,
                           parts=pr.parts))
        return run_pairs(fb.head, rows, weight.detach(),
                         None if bias is None else bias.detach(), fb.chunks, None, False,
                         False, False, tile=fb.tile, slab=fb.slab).logps


def _head(backend, hidden, ignore_index, temperature, logit_scale, softcap, workspace=None):
    dev = hidden.device
    be = backends.resolve(backend, dev, hidden.dtype)
    return Head(be, ignore_index, float(temperature), float(logit_scale),
                float(softcap) if softcap else 0.0, workspace)
