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


def sequence_sums(seq, lengths, lp, scale, extra):
    """``(sums, extra_sums)`` of token log-probs ``lp`` into sequences: rows grouped by sequence
    in order (``seq``: each row's; ``lengths``: host ints, rows each), weighted by ``scale`` and,
    when given, by ``extra`` (else ``extra_sums`` is None). With ``extra`` a row of one term only
    adds exactly 0 to the other's sums, even a NaN. In float64, rounded once: a running fp32 sum
    of a long sequence's log-probs drifts by up to ``n`` ulps, over eager's pairwise sum."""
    wide = torch.float64
    lp64 = lp.to(wide)
    if extra is None:
        return segment_sums(lp64 * scale.to(wide), seq, lengths).to(lp.dtype), None
    terms = (torch.where(w != 0, lp64 * w.to(wide), 0.0) for w in (scale, extra))
    return tuple(segment_sums(t, seq, lengths).to(lp.dtype) for t in terms)


def segment_sums(v, seq, lengths):
    """Sums of consecutive segments of ``v`` (``seq``: each element's segment, ascending;
    ``lengths``: host ints), each a pairwise tree over the segment's own positions (level ``k``
    adds positions ``2i`` and ``2i + 1`` of level ``k - 1``), padded with -0.0, which adds
    nothing exactly. So a segment's bits depend on its values alone: not on the other
    segments, the device, or the order hardware adds in (a CUDA ``index_add_`` has none: it is
    not deterministic). The indices are formed on ``v``'s device: no host synchronisation."""
    S, n = len(lengths), v.numel()
    width = 1 << max(max(lengths, default=1) - 1, 0).bit_length()
    dense = v.new_full((S * width,), -0.0)
    if n:
        seq = seq.to(torch.int64)
        start = torch.searchsorted(seq, torch.arange(S, device=v.device))
        dense[seq * width + torch.arange(n, device=v.device) - start[seq]] = v.reshape(-1)
    d = dense.view(S, width)
    while d.shape[1] > 1:
        d = d[:, 0::2] + d[:, 1::2]
    return d.view(S) + 0.0  # an empty segment (all -0.0) sums to 0.0


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
    """``(sel, seq, lengths)`` of units ``[j0, j1)``: their rows (indices into ``pr.h2``) part by
    part, each row's sequence within the chunk (part ``k`` of unit ``j`` is
    ``k * (j1 - j0) + j - j0``), and each sequence's row count (host ints, in that order)."""
    B, off, P = pr.pairs, pr.offsets, j1 - j0
    spans = [(off[k * B + j0], off[k * B + j1]) for k in range(pr.parts)]
    sel = torch.cat([pr.order[a:e] for a, e in spans])
    seq = torch.cat([pr.seq[a:e] - k * B - j0 + k * P for k, (a, e) in enumerate(spans)])
    lengths = [off[k * B + j + 1] - off[k * B + j] for k in range(pr.parts) for j in range(j0, j1)]
    return sel, seq, lengths


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
        sel, seq, lengths = chunk_selection(pr, j0, j1)
        terms = torch.empty(sel.numel(), dtype=torch.float64, device=dev)  # as sequence_sums
        g_seq = None
        if grads:  # known: independent of this pass's sums
            unused = torch.zeros(P, dtype=torch.float64, device=dev)
            g_seq = torch.cat(list(pair_grads(j0, j1, *[unused] * K))).to(acc)
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
            terms[s0:s0 + n] = lp.view(n_pad)[:n].double() * scale.double()
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
        sums = segment_sums(terms, seq, lengths)
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
