""":func:`fastdpo.autograd.linear_loss.run_pairs` through the native C++ head on CPU.

A pass that needs no ``d_weight`` (a reference model, a first log-prob pass) runs
``linear_logps_fwd``, a frozen-head policy pass ``linear_frozen_fwd`` (each token's
``d logp / d hidden`` formed in the same sweep): one parallel region over cache-sized tiles, with
no ``(rows, V)`` buffer. The per-token results are reduced into sequence log-probs and, chunk by
chunk in the same order, handed to ``pair_grads``, so the caller sees the same calls as from the
Python loop.

A trainable head keeps the chunk loop (a chunk's pair gradients need its log-probs first), but
each chunk is two C++ calls (:class:`KeptChunks`): ``linear_keep_fwd`` writes the chunk's logits
into a buffer reused by every chunk and returns the row statistics; ``linear_keep_bwd`` turns them
into ``d logits`` in place and forms ``d_hidden`` and ``d_weight`` from them. Each call is one
parallel region over the same tiles (3 GEMMs, no recompute). A pair over the chunk budget is
streamed inside that loop (:func:`stream_unit`): the first in kept slabs at 3 GEMMs, the others
through the native forward and the native backward that recomputes the logits in cache (4).
"""

from __future__ import annotations

import torch

from .. import ops
from .linear_stream import (PassResult, active_labels, chunk_selection, sequence_sums,
                            token_grads, unit_rows)


def native_head(head, pr, weight, bias) -> bool:
    """Whether the native ops take this pass's inputs (the native backend on CPU, a dtype it
    takes, weight and bias in the hidden states' dtype)."""
    h2 = pr.h2
    if head.backend != "native" or h2.device.type != "cpu":
        return False
    if h2.dtype not in ops.DTYPES["native"] or weight.dtype != h2.dtype:
        return False
    return bias is None or bias.dtype == h2.dtype


def native_applies(head, pr, weight, bias, grads: bool, need_w: bool, need_b: bool) -> bool:
    """Whether :func:`native_pass` runs this pass: native inputs and no ``d_weight`` /
    ``d_bias`` wanted."""
    if not native_head(head, pr, weight, bias):
        return False
    if grads and (need_w or (need_b and bias is not None)):
        return False
    return not grads or has_native_op("native_linear_frozen_fwd")


def has_native_op(op: str) -> bool:
    """Whether the loaded extension has ``op`` (one built before it keeps the Python loop)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdpo::{op}", "CPU")


class KeptChunks:
    """The chunk loop's GEMMs and row kernels for a trainable head, in C++: per chunk
    :meth:`forward` (logits kept in one buffer sized for the largest chunk) then
    :meth:`backward` (``d_hidden`` of the chunk's rows, ``d_weight`` / ``d_bias`` added into
    fp32 accumulators)."""

    @staticmethod
    def applies(head, pr, weight, bias, grads: bool) -> bool:
        return (grads and native_head(head, pr, weight, bias)
                and has_native_op("native_linear_keep_bwd"))

    def __init__(self, head, weight, bias, max_rows: int, batch_invariant: bool, ws):
        from ..native import _C

        V, H = weight.shape
        self.head, self.weight, self.bias, self.inv = head, weight, bias, batch_invariant
        self.keep = ws.take("keep", _C.linear_keep_numel(max_rows, V, H, batch_invariant),
                            torch.float32, "cpu")
        self.args = (head.ignore_index, float(head.temperature), float(head.logit_scale),
                     float(head.softcap))

    def forward(self, h, lab, entropy: bool = False):
        """``(logp, row_max, log_sum, entropy)`` of rows ``h`` with labels ``lab`` (all
        ``(R,)`` fp32; the entropy empty unless asked)."""
        return ops.get_op("native", "linear_keep_fwd")(h, self.weight, self.bias, lab,
                                                       *self.args, self.inv, self.keep, entropy)

    def backward(self, h, lab, g_row, row_max, log_sum, need_h: bool, d_w, d_b):
        """``d_hidden`` of the rows (empty unless ``need_h``); ``d_w`` / ``d_b`` (fp32, or empty
        tensors) accumulate."""
        return ops.get_op("native", "linear_keep_bwd")(
            self.keep, g_row, h, self.weight, self.bias, lab, row_max, log_sum, *self.args,
            self.inv, need_h, d_w, d_b)

    def stats(self, h, lab, entropy: bool = False):
        """:meth:`forward` through the native forward: tiles in cache, nothing kept (for
        :meth:`recompute`)."""
        return ops.get_op("native", "linear_logps_fwd")(h, self.weight, self.bias, lab,
                                                        *self.args, 0, self.weight.shape[0],
                                                        entropy, self.inv)

    def recompute(self, h, lab, g_row, row_max, log_sum, need_h: bool, d_w, d_b):
        """:meth:`backward` without the kept logits: each tile's are recomputed in cache."""
        return ops.get_op("native", "linear_keep_bwd")(
            self.keep.new_empty(0), g_row, h, self.weight, self.bias, lab, row_max, log_sum,
            *self.args, self.inv, need_h, d_w, d_b)


def native_pass(head, pr, weight, bias, chunks, pair_grads, grads: bool, need_h: bool,
                hidden_shape, batch_invariant: bool, extra_grad=0.0, slab: int = 0) -> PassResult:
    """The pass of ``run_pairs`` (same results and ``pair_grads`` calls) through the native ops;
    ``grads`` means a frozen head (``d_hidden`` only)."""
    h2, B, K = pr.h2, pr.pairs, pr.parts
    acc = pr.scale.dtype
    ii = head.ignore_index
    opts = (ii, float(head.temperature), float(head.logit_scale), float(head.softcap))

    ent = head.token_stats

    def call(h, lab):
        """``(logp, row_max, log_sum, unit or None, entropy)``."""
        if grads:
            return ops.get_op("native", "linear_frozen_fwd")(h, weight, bias, lab, *opts,
                                                             batch_invariant, ent)
        lp, m, ls, e = ops.get_op("native", "linear_logps_fwd")(
            h, weight, bias, lab, *opts, 0, weight.shape[0], ent, batch_invariant)
        return lp, m, ls, None, e

    if not slab or batch_invariant:
        lp, row_max, log_sum, unit, e = call(h2, active_labels(pr, ii))
    else:  # the row groups of the policy's kept chunks, so equal models give equal bits
        lp, row_max, log_sum = (torch.zeros(h2.shape[0]) for _ in range(3))
        unit = torch.zeros(h2.shape[0], h2.shape[1]) if grads else None
        e = torch.zeros(h2.shape[0] if ent else 0)
        for rows in forward_groups(pr, chunks, slab):
            out = call(h2.index_select(0, rows), pr.labels.index_select(0, rows))
            for t, o in zip((lp, row_max, log_sum, unit, e if ent else None), out):
                if t is not None:
                    t.index_copy_(0, rows, o)
    token = (lp, log_sum, e) if ent else None
    lp = lp.to(acc).index_select(0, pr.order)
    scale = pr.scale.index_select(0, pr.order)
    extra = None if pr.extra is None else pr.extra.index_select(0, pr.order)
    lengths = [e - a for a, e in zip(pr.offsets, pr.offsets[1:])]  # rows of each sequence
    out, ext = sequence_sums(pr.seq, lengths, lp, scale, extra)
    d_h = None
    if pair_grads is not None:
        g_row = row_grads(pr, chunks, pair_grads, out, scale, extra, extra_grad)
        if grads and need_h:
            d_h = torch.zeros(h2.shape, dtype=h2.dtype, device=h2.device)
            rows_u = unit.index_select(0, pr.order) * g_row.to(unit.dtype).unsqueeze(1)
            d_h.index_copy_(0, pr.order, rows_u.to(h2.dtype))
            if hidden_shape is not None:
                d_h = d_h.view(hidden_shape)
    logps = tuple(out[k * B:(k + 1) * B].clone() if K > 1 else out for k in range(K))
    extras = None if ext is None else tuple(ext[k * B:(k + 1) * B] for k in range(K))
    return PassResult(logps, extras, d_h, None, None, rows=(row_max, log_sum), token=token)


def row_grads(pr, chunks, pair_grads, sums, scale, extra=None, extra_grad=0.0):
    """Each active row's ``dL/d logp`` (in ``pr.order``): ``pair_grads`` chunk by chunk on the
    sequence sums ``sums`` (``(parts * B,)``), times the row's weight, plus the extra term's."""
    B, K = pr.pairs, pr.parts
    g_seq = torch.zeros(K * B, dtype=sums.dtype, device=sums.device)
    for j0, j1 in chunks:
        g = pair_grads(j0, j1, *(sums[k * B + j0:k * B + j1] for k in range(K)))
        for k in range(K):
            g_seq[k * B + j0:k * B + j1] = g[k]
    return token_grads(g_seq, pr.seq, scale, extra, extra_grad)


def recompute_pass(head, pr, weight, bias, chunks, pair_grads, first: PassResult, need_h: bool,
                   need_w: bool, need_b: bool, hidden_shape, batch_invariant: bool,
                   extra_grad=0.0) -> PassResult:
    """The second pass of a loss whose pair gradients came from a first (native) log-prob pass:
    the native backward (``linear_logps_bwd``) recomputes each tile's logits in cache from
    ``first``'s row statistics, so no chunk's logits are ever held (1 matmul more than keeping
    them, which the first pass already cost)."""
    h2, V = pr.h2, weight.shape[0]
    acc = pr.scale.dtype
    sums = torch.cat(first.logps).to(acc)
    scale = pr.scale.index_select(0, pr.order)
    extra = None if pr.extra is None else pr.extra.index_select(0, pr.order)
    g_row = row_grads(pr, chunks, pair_grads, sums, scale, extra, extra_grad)
    grad_logp = torch.zeros(h2.shape[0], dtype=torch.float32, device=h2.device)
    grad_logp[pr.order] = g_row.to(torch.float32)
    lab = active_labels(pr, head.ignore_index)
    need_b = need_b and bias is not None
    row_max, log_sum = first.rows
    d_h, d_w, d_b = ops.get_op("native", "linear_logps_bwd")(
        grad_logp, None, h2, weight, bias, lab, row_max, log_sum, None, head.ignore_index,
        float(head.temperature), float(head.logit_scale), float(head.softcap), 0, V, need_h,
        need_w, need_b, batch_invariant)
    if need_h and hidden_shape is not None:
        d_h = d_h.view(hidden_shape)
    return PassResult(first.logps, first.extra, d_h if need_h else None,
                      d_w if need_w else None, d_b if need_b else None, token=first.token)


def streams_locally(head, pr, weight, bias, tile: int, need_w: bool, need_b: bool) -> bool:
    """Whether :func:`fastdpo.autograd.linear_loss.run_pairs` streams a pair over the chunk
    budget inside its own chunk loop, each pair's gradients from its own log-probs, so the
    caller needs no first log-prob pass over the batch: a native pass without ``d_weight``
    (it holds no logits), or the kept chunks (:func:`stream_unit`) outside batch invariance."""
    if not native_head(head, pr, weight, bias) or pr.extra is not None:
        return False
    if not (need_w or (need_b and bias is not None)):
        return has_native_op("native_linear_frozen_fwd")
    return tile == 0 and has_native_op("native_linear_keep_bwd")


def slabbed_unit(pr, chunks, slab: int):
    """The chunk ``(j0, j1)`` of the first unit of more than ``slab`` rows, or None (``slab`` 0,
    or no such unit): a pass runs its forward in slabs of ``slab`` rows and takes it first (it
    forms ``d_weight`` while that is still zero, :func:`stream_unit`)."""
    if slab:
        for c in chunks:
            if c[1] - c[0] == 1 and unit_rows(pr, *c) > slab:
                return c
    return None


def streamed_first(pr, chunks, slab: int) -> list:
    """``chunks`` with :func:`slabbed_unit`'s chunk moved to the front."""
    first = slabbed_unit(pr, chunks, slab)
    return chunks if first is None else [first] + [c for c in chunks if c != first]


def forward_groups(pr, chunks, slab: int):
    """The row groups (indices into ``pr.h2``) of the native forward calls of a pass with
    streamed units: :func:`slabbed_unit` in slabs of ``slab`` rows, every other chunk whole. The
    kept chunks and the forward-only passes both call per group, so a row's log-prob does not
    depend on which pass computed it (a matmul's bits can depend on its row count)."""
    first = slabbed_unit(pr, chunks, slab)
    for c in streamed_first(pr, chunks, slab):
        sel = chunk_selection(pr, *c)[0]
        if c == first:
            yield from sel.split(slab)
        elif sel.numel():
            yield sel


def stream_unit(kept: KeptChunks, pr, sel, seq, lengths, scale, slab: int, grads_of,
                need_h: bool, d_w, d_b, defer: bool, tok=None):
    """One unit (pair) whose rows ``sel`` (part by part; ``seq``: each one's part; ``lengths``:
    rows per part) exceed the chunk budget; ``grads_of(*sums)`` gives its ``dL/d logp`` per
    part. Returns ``(sums, d_hidden rows or None)``. ``slab > 0``: its forward runs in slabs of
    that many rows (the first streamed unit, :func:`forward_groups`), else whole. ``tok``: a
    :class:`~fastdpo.autograd.linear_stream.TokenStats` to put the rows' statistics in.

    ``defer`` (``d_w`` / ``d_b`` still all zero; ``slab > 0``; for losses of the margin alone,
    whose pair gradient has ``g_k = -g_0``): one sweep of kept slabs with the unit row gradient
    ``sigma * scale`` (``sigma`` +1 on part 0, -1 on the others), which gives each row's
    ``d_hidden`` up to its part's factor and ``d_w = sum_k sigma_k A_k`` (``A_k``: part ``k``'s
    ``J^T h``), so ``g_0 * d_w`` is the gradient: 3 matmuls on the unit, not 4. Should ``g``
    not have that form after all, ``d_w`` is formed afresh by the recomputing backward at the
    true row gradients (2 matmuls more; correcting the sum instead would cancel digits).
    Otherwise the native forward, then the native backward recomputing the logits in cache,
    adding into ``d_w`` / ``d_b`` (4 matmuls; no logits held)."""
    K, n = pr.parts, sel.numel()
    empty = torch.empty(0, dtype=torch.float32)
    dw_ = d_w if d_w is not None else empty
    db_ = d_b if d_b is not None else empty
    h, lab = pr.h2.index_select(0, sel), pr.labels.index_select(0, sel)
    spans = [(s0, min(n, s0 + slab)) for s0 in range(0, n, slab)] if slab else [(0, n)]
    lp, m, ls = (torch.empty(n) for _ in range(3))
    on = tok is not None and tok.t is not None
    ent = torch.empty(n if on else 0)

    def sums_of(lp):
        return sequence_sums(seq, lengths, lp.to(scale.dtype), scale, None)[0]

    def part_grads(sums):
        return torch.cat(list(grads_of(*sums.split(1)))).to(scale.dtype)

    if not defer:
        for s0, s1 in spans:
            lp[s0:s1], m[s0:s1], ls[s0:s1], e = kept.stats(h[s0:s1], lab[s0:s1], on)
            ent[s0:s1] = e
        if on:
            tok.put(sel, lp, ls, ent)
        sums = sums_of(lp)
        g_row = token_grads(part_grads(sums), seq, scale).float()
        dh = kept.recompute(h, lab, g_row, m, ls, need_h, dw_, db_)
        return sums, (dh if need_h else None)
    sigma = torch.where(torch.arange(K) == 0, 1.0, -1.0).to(scale.dtype)
    unit = (sigma.index_select(0, seq) * scale).float()
    dh = [] if need_h else None
    for s0, s1 in spans:  # one slab's logits held at a time
        lp[s0:s1], m[s0:s1], ls[s0:s1], e = kept.forward(h[s0:s1], lab[s0:s1], on)
        ent[s0:s1] = e
        d = kept.backward(h[s0:s1], lab[s0:s1], unit[s0:s1], m[s0:s1], ls[s0:s1], need_h, dw_,
                          db_)
        if need_h:
            dh.append(d)
    if on:
        tok.put(sel, lp, ls, ent)
    sums = sums_of(lp)
    g = part_grads(sums)
    if need_h:  # each part's factor: g_k / sigma_k
        dh = torch.cat(dh).mul_((g * sigma).index_select(0, seq).unsqueeze(1).to(h.dtype))
    if bool((g[1:] == -g[0]).all()):  # d_w = g_0 * sum_k sigma_k A_k exactly
        for t in (d_w, d_b):
            if t is not None:
                t.mul_(g[0].to(t.dtype))
    else:  # adding (g_k + g_0) A_k back would cancel A_k's magnitude: form it afresh
        for t in (d_w, d_b):
            if t is not None:
                t.zero_()
        kept.recompute(h, lab, token_grads(g, seq, scale).float(), m, ls, False, dw_, db_)
    return sums, dh
