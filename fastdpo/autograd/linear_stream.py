"""The chunk loop of :func:`fastdpo.autograd.linear_loss.run_pairs` in slabs of rows, for pairs
larger than the chunk budget: the pair gradients are known first (a log-prob pass), so each
slab's logits, ``d logits`` and matmuls are done at once and the buffer holds one slab."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import ops, rows
from ..torch_backend.linear import pad_rows
from ..torch_backend.matmul import logits_tile, mm_acc, operand_dtype


class PassResult(NamedTuple):
    logps: tuple            # one (B,) tensor of sequence log-probs per part
    extra: Optional[tuple]  # the same sums under ``PairRows.extra`` (None without)
    d_hidden: Optional[torch.Tensor]
    d_weight: Optional[torch.Tensor]
    d_bias: Optional[torch.Tensor]
    rows: Optional[tuple] = None  # (row_max, log_sum) of all N rows, from a native forward pass
    token: Optional[tuple] = None  # (logp, log_sum, entropy) of all N rows (Head.token_stats)


class TokenStats:
    """Each visited row's ``(logp, log_sum, entropy)`` as the pass's row op gave them, in
    ``h2``'s row space (0 on rows not visited), for metrics without a pass of their own; inert
    unless ``on``."""

    def __init__(self, on: bool, n: int, device):
        self.t = tuple(torch.zeros(n, device=device) for _ in range(3)) if on else None

    def put(self, rows, logp, log_sum, entropy):
        if self.t is None:
            return
        n = rows.numel()
        for t, x in zip(self.t, (logp, log_sum, entropy)):
            t.index_copy_(0, rows, x.reshape(-1)[:n].to(t.dtype))


def loop_setup(head, pr, weight, bias):
    """What both chunk loops take from their arguments: ``(h2, device, V, acc dtype, operand
    dtype, weight and bias as the matmuls take them, row_fwd, row_bwd, T, ignore_index,
    softcap)``. CPU low-precision weights are cast once (fp32 GEMMs); elsewhere used as is."""
    h2 = pr.h2
    acc = ops.acc_dtype(h2.dtype)
    opd = operand_dtype(h2.dtype, h2.device)
    w = weight if weight.dtype == opd else weight.to(opd)
    b = None if bias is None else bias.to(acc)
    return (h2, h2.device, weight.shape[0], acc, opd, w, b,
            ops.get_op(head.backend, "logps_fwd"), ops.get_op(head.backend, "logps_bwd"),
            float(head.temperature), head.ignore_index, head.softcap if head.softcap else 0.0)


def sequence_sums(seq, lp, scale, extra, n):
    """``(sums, extra_sums)`` of token log-probs ``lp`` into ``n`` sequences (``seq``: each
    token's), weighted by ``scale`` and, when given, by ``extra`` (else ``extra_sums`` is None).
    With ``extra`` a row of one term only adds exactly 0 to the other's sums, even a NaN.
    Accumulated in float64 (then rounded once): a running fp32 sum of a long sequence's
    log-probs drifts by up to ``n`` ulps, over eager's pairwise sum."""
    wide = torch.float64 if lp.dtype != torch.float64 else lp.dtype
    lp64 = lp.to(wide)
    sums = torch.zeros(n, dtype=wide, device=lp.device)
    if extra is None:
        return sums.index_add_(0, seq, lp64 * scale.to(wide)).to(lp.dtype), None
    sums.index_add_(0, seq, torch.where(scale != 0, lp64 * scale.to(wide), 0.0))
    esums = torch.zeros_like(sums).index_add_(
        0, seq, torch.where(extra != 0, lp64 * extra.to(wide), 0.0))
    return sums.to(lp.dtype), esums.to(lp.dtype)


def token_grads(g_seq, seq, scale, extra=None, extra_grad=0.0):
    """Each token's ``dL/d logp``: its sequence's ``g_seq`` times its weight ``scale``, plus
    ``extra_grad`` times its ``extra`` weight when the extra term is there."""
    g = g_seq.index_select(0, seq) * scale
    return g if extra is None else g + extra_grad * extra


def active_labels(pr, ignore_index):
    """``pr``'s labels with ``ignore_index`` on every row the loop would not visit."""
    lab = torch.full_like(pr.labels, ignore_index)
    lab[pr.order] = pr.labels[pr.order]
    return lab


def unit_rows(pr, j0: int, j1: int) -> int:
    """Active rows of units ``[j0, j1)``, every part."""
    B, off = pr.pairs, pr.offsets
    return sum(off[k * B + j1] - off[k * B + j0] for k in range(pr.parts))


def chunk_selection(pr, j0, j1):
    """``(sel, seq)`` of units ``[j0, j1)``: their rows (indices into ``pr.h2``) part by part, and
    each row's sequence within the chunk (part ``k`` of unit ``j`` is ``k * (j1 - j0) + j - j0``)."""
    B, off, P = pr.pairs, pr.offsets, j1 - j0
    spans = [(off[k * B + j0], off[k * B + j1]) for k in range(pr.parts)]
    sel = torch.cat([pr.order[a:e] for a, e in spans])
    seq = torch.cat([pr.seq[a:e] - k * B - j0 + k * P for k, (a, e) in enumerate(spans)])
    return sel, seq


def streamed(head, pr, weight, bias, chunks, pair_grads, need_h, need_w, need_b, hidden_shape,
             tile, slab):
    """``run_pairs`` in slabs of rows: each slab's logits, log-probs and (the pair gradients being
    known) its ``d logits`` and matmuls at once; the buffer holds one slab."""
    h2, dev, V, acc, opd, w, b, row_fwd, row_bwd, T, ii, softcap = loop_setup(head, pr, weight,
                                                                             bias)
    B, K = pr.pairs, pr.parts
    grads = pair_grads is not None and (need_h or need_w or need_b)
    need_b = need_b and bias is not None
    S = tile if tile else max(1, slab)  # under batch invariance every slab is one fixed tile
    out = torch.zeros(K * B, dtype=acc, device=dev)
    d_h = torch.zeros(h2.shape, dtype=h2.dtype, device=dev) if grads and need_h else None
    d_w = torch.zeros(weight.shape, dtype=acc, device=dev) if grads and need_w else None
    d_b = torch.zeros(V, dtype=acc, device=dev) if grads and need_b else None
    buf = torch.empty(S * V, dtype=acc, device=dev)
    tbuf = torch.empty(S * V if (grads and softcap) else 0, dtype=acc, device=dev)
    tok = TokenStats(head.token_stats, h2.shape[0], dev)
    for j0, j1 in chunks:
        P = j1 - j0
        sel, seq = chunk_selection(pr, j0, j1)
        sums = torch.zeros(K * P, dtype=torch.float64, device=dev)  # as sequence_sums
        g_seq = None
        if grads:  # known: independent of this pass's sums
            g_seq = torch.cat(list(pair_grads(j0, j1, *sums.split(P)))).to(acc)
        for s0 in range(0, sel.numel(), S):
            rs, sq = sel[s0:s0 + S], seq[s0:s0 + S]
            n = rs.numel()
            n_pad = S if tile else n
            h = pad_rows(h2.index_select(0, rs).to(opd), n_pad, 0)
            lab = pad_rows(pr.labels.index_select(0, rs), n_pad, ii).view(1, n_pad)
            scale = pr.scale.index_select(0, rs)
            x = buf[:n_pad * V].view(n_pad, V)
            t = tbuf[:n_pad * V].view(n_pad, V) if (grads and softcap) else None
            logits_tile(h, w, b, head.logit_scale, softcap, x, t)
            lp, rmax, lsum, ent = row_fwd(x.view(1, n_pad, V), lab, ii, T, 0, V,
                                          head.token_stats)[:4]
            tok.put(rs, lp, lsum, ent)
            sums.index_add_(0, sq, lp.view(n_pad)[:n].double() * scale.double())
            if not grads:
                continue
            g_row = pad_rows(token_grads(g_seq, sq, scale), n_pad, 0).view(1, n_pad)
            xs = x.view(1, n_pad, V)
            row_bwd(g_row, None, xs, lab, rmax, lsum, None, ii, T, 0, V, xs)
            dz = rows.transform_grad_(x, t, head.logit_scale, softcap)
            dz = dz if dz.dtype == opd else dz.to(opd)
            if need_h:
                d_h.index_copy_(0, rs, mm_acc(dz, w)[:n].to(d_h.dtype))
            if need_w:
                mm_acc(dz.t(), h, out=d_w, accumulate=True)
            if need_b:
                d_b += x.sum(0, dtype=acc)
        for k in range(K):
            out[k * B + j0:k * B + j1] = sums[k * P:(k + 1) * P]
    if d_h is not None and hidden_shape is not None:
        d_h = d_h.view(hidden_shape)
    if d_w is not None and d_w.dtype != weight.dtype:
        d_w = d_w.to(weight.dtype)
    if d_b is not None and d_b.dtype != bias.dtype:
        d_b = d_b.to(bias.dtype)
    logps = tuple(out[k * B:(k + 1) * B].clone() if K > 1 else out for k in range(K))
    return PassResult(logps, None, d_h, d_w, d_b, token=tok.t)
