"""Fused LM head + pair loss with the gradient formed in forward: the chunk loop and its Function.

The rows of a ``[chosen; rejected]`` batch are walked one chunk of *pairs* at a time (or of
unpaired completions: ``PairRows.parts = 1``), only the rows with a label (prompt and padding
rows are skipped). Per chunk, with ``R`` rows:

1. ``X = transform(h @ W.T + b)``, ``(R, V)`` fp32 (GEMM 1), into a buffer reused by every chunk;
2. the backend's row op ``logps_fwd`` on ``X``: token log-probs, reduced into the chunk's sequence
   log-probs (weighted sums);
3. the caller's ``pair_grads`` turns them into ``dL/d logp`` per sequence (a closed form on
   ``O(pairs)`` values), to which a term linear in the token log-probs (an NLL over the batch,
   ``PairRows.extra``) adds its gradient, known before the loop;
4. ``logps_bwd`` writes ``d X`` in place, the transform's chain rule follows, then
   ``d_hidden = dX @ W`` (GEMM 2) and ``d_weight += dX.T @ h`` (GEMM 3), each skipped when that
   input needs no gradient.

So the policy pass costs 3 GEMMs (2 with a frozen head, 1 without gradients) and holds one
chunk's logits. On the native CPU backend the passes run in C++ instead
(:mod:`fastdpo.autograd.linear_native`): steps 1-2 and 4 of a chunk are one call each.
A loss whose pair gradient depends on the whole batch runs step 1-2 over all chunks first
(``pair_grads=None``: log-probs only), then the full loop: one GEMM more (on the native backend
the native backward, which recomputes each tile's logits in cache and keeps none).

The backward of :class:`LinearPairLoss` multiplies the stored gradients by the incoming scalar.

:func:`frozen_head_forward` applies the same full-row chunks to per-token log-probs when only
the hidden states need a gradient (:class:`fastdpo.autograd.linear.LinearTokenLogps`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops, rows
from ..torch_backend.linear import labelled_rows, pad_rows
from ..torch_backend.matmul import logits_tile, mm_acc, operand_dtype
from .linear_native import (KeptChunks, has_native_op, native_applies, native_head, native_pass,
                            recompute_pass, slabbed_unit, stream_unit, streamed_first)
from .linear_stream import (PassResult, TokenStats, chunk_selection, loop_setup, sequence_sums,
                            streamed, token_grads, unit_rows)
from .options import refuse_double_backward
from .workspace import FRESH, Workspace

# Extra memory for one chunk's logits, as a fraction of the full (rows, V) logits in the hidden
# states' dtype, but at least MIN_CHUNK_BYTES; and never fewer than MIN_CHUNK_ROWS rows (or one
# pair) per chunk, below which the GEMMs lose too much speed.
CHUNK_FRACTION = float(os.environ.get("FASTDPO_LINEAR_MEMORY_FRACTION", "0.05"))
MIN_CHUNK_BYTES = 16 << 20
MIN_CHUNK_ROWS = 128
# Chunks hold whole pairs (3 matmuls); a pair whose fp32 logits exceed this is streamed in slabs
# of the chunk budget instead (1 matmul more on its rows, but for the first streamed pair of a
# native pass, linear_native.stream_unit). An explicit chunk_rows is a hard bound.
PAIR_LIMIT_BYTES = int(os.environ.get("FASTDPO_LINEAR_PAIR_LIMIT_MB", "1024")) << 20
# Rows of every matmul and row-kernel call under batch invariance (a fixed shape, whatever N).
INVARIANT_TILE_ROWS = 128


@dataclass(frozen=True)
class Head:
    """Row-op options of the fused head, and where its chunk buffers come from."""
    backend: str
    ignore_index: int
    temperature: float
    logit_scale: float
    softcap: float  # 0 = off
    workspace: Optional[Workspace] = None  # None: fresh buffers every call
    token_stats: bool = False  # the policy pass also returns each row's stats (PassResult.token)


@dataclass
class PairRows:
    """The labelled rows of a batch of ``parts * B`` sequences: ``[chosen; rejected]`` pairs
    (``parts=2``) or unpaired completions (``parts=1``); part ``k`` of unit ``j`` is sequence
    ``k * B + j``.

    ``order`` lists the rows with a label, sequence by sequence; sequence ``s`` owns
    ``order[offsets[s]:offsets[s + 1]]``. ``scale`` is each row's weight in its sequence's sum
    (token weight, divided by the sequence's total weight when averaging). ``extra`` (optional)
    is a second weight per row, of a term linear in the token log-probs whose gradient is known
    before the loop (an NLL over the batch): its sums per sequence are returned and its gradient
    ``extra_grad * extra`` is added to each row's.
    """
    h2: torch.Tensor        # (N, H) all rows (a view of the caller's hidden states when possible)
    labels: torch.Tensor    # (N,) the label each row predicts (shift applied)
    scale: torch.Tensor     # (N,) acc dtype
    order: torch.Tensor     # (n_active,) int64
    seq: torch.Tensor       # (n_active,) int64 sequence of each entry of order
    offsets: list           # parts * B + 1 host ints
    pairs: int              # B
    parts: int = 2
    extra: Optional[torch.Tensor] = None  # (N,) acc dtype


def build_rows(h2, labels, weights, pairs: int, seq_len: int, acc, *, parts: int = 2,
               extra=None) -> PairRows:
    """``labels`` / ``weights`` (/ ``extra``) are ``(N,)`` already shifted, 0 on ignored rows.
    One host sync (the rows per sequence, for the chunk plan made on the host)."""
    active = weights != 0
    if extra is not None:
        active = active | (extra != 0)
        extra = extra.to(acc)
    order = torch.nonzero(active).squeeze(1)
    seq = torch.div(order, seq_len, rounding_mode="floor")
    counts = torch.bincount(seq, minlength=parts * pairs).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return PairRows(h2, labels, weights.to(acc), order, seq, offsets, pairs, parts, extra)


def chunk_pairs(pr: PairRows, cap_rows: int):
    """Consecutive unit (pair) ranges ``(j0, j1)`` of at most ``cap_rows`` rows (at least one
    unit each)."""
    out, j0, rows_now = [], 0, 0
    for j in range(pr.pairs):
        n = unit_rows(pr, j, j + 1)
        if j > j0 and rows_now + n > cap_rows:
            out.append((j0, j))
            j0, rows_now = j, 0
        rows_now += n
    if pr.pairs:
        out.append((j0, pr.pairs))
    return out


def row_bytes(V: int, softcap: bool, dz: int = 0) -> int:
    """A chunk's bytes per row: fp32 logits (+ tanh), ``d logits`` in the operand dtype (dz)."""
    return V * (4 * (2 if softcap else 1) + dz)


def plan_rows(n_rows, V: int, itemsize: int, softcap: bool, chunk_rows=None, dz=0) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    budget = max(MIN_CHUNK_BYTES, int(CHUNK_FRACTION * n_rows * V * itemsize))
    return max(MIN_CHUNK_ROWS, budget // row_bytes(V, softcap, dz))


def pair_limit_rows(cap: int, V: int, softcap: bool, chunk_rows=None, dz: int = 0) -> int:
    """Most rows one pair may hold at once before it is streamed (see ``PAIR_LIMIT_BYTES``)."""
    if chunk_rows is not None:
        return cap
    return max(cap, PAIR_LIMIT_BYTES // row_bytes(V, softcap, dz))


# pair_grads(j0, j1, *sums) -> one (j1 - j0,) gradient per part: dL/d(sequence log-prob)
PairGrads = Callable[..., tuple]


def run_pairs(head: Head, pr: PairRows, weight, bias, chunks, pair_grads: Optional[PairGrads],
              need_h: bool, need_w: bool, need_b: bool, hidden_shape=None, tile: int = 0,
              extra_grad=0.0, slab: int = 0, known_grads: bool = False,
              first: Optional[PassResult] = None, margin_only: bool = False) -> PassResult:
    """The chunk loop (module docstring): the sequence log-probs and the gradients (None where
    not needed or no ``pair_grads``). ``pair_grads`` gets each chunk's units ``[j0, j1)`` and
    their sequence log-probs, one tensor per part, and returns ``dL/d logp`` per part.

    ``tile > 0`` (batch invariance): every matmul and row op runs on slabs of exactly ``tile``
    rows (the last one padded with ignored rows), so no shape depends on the batch and a row's
    results are bitwise the same whatever else the batch holds.

    ``slab > 0`` with a forward-only pass or ``known_grads`` (``pair_grads`` does not read this
    pass's sums: they came from a first pass) streams each chunk in slabs of ``slab`` rows, so
    one pair larger than the budget never holds its whole logits
    (:func:`fastdpo.autograd.linear_stream.streamed`). On the native head (no batch
    invariance, no second term) the chunk loop streams such a unit itself, each pair's
    gradients from its own sums, so no first pass is needed
    (:func:`fastdpo.autograd.linear_native.streams_locally`, ``stream_unit``);
    ``margin_only`` (the loss depends on each pair's log-probs through their difference only,
    so ``g_rejected = -g_chosen``) lets the first such unit take 3 matmuls.

    ``first``: the result of that first log-prob pass over the same rows; from the native
    backend (it has the row statistics) a ``known_grads`` pass is the native backward, which
    recomputes the logits tile by tile in cache and holds none
    (:func:`fastdpo.autograd.linear_native.recompute_pass`)."""
    grads = pair_grads is not None and (need_h or need_w or need_b)
    # native passes stream a unit over the budget in their own loop (not a second term's rows)
    local = slab if (slab and not tile and pr.extra is None) else 0
    if native_applies(head, pr, weight, bias, grads, need_w, need_b):
        return native_pass(head, pr, weight, bias, chunks, pair_grads, grads, need_h,
                           hidden_shape, tile > 0, extra_grad, local)
    if (grads and known_grads and first is not None and first.rows is not None
            and native_head(head, pr, weight, bias)):
        return recompute_pass(head, pr, weight, bias, chunks, pair_grads, first, need_h, need_w,
                              need_b, hidden_shape, tile > 0, extra_grad)
    if slab and (pair_grads is None or known_grads) and pr.extra is None:
        return streamed(head, pr, weight, bias, chunks, pair_grads, need_h, need_w, need_b,
                        hidden_shape, tile, slab)
    ws = head.workspace or FRESH
    with ws:  # one call at a time on a workspace's buffers
        return _chunk_loop(head, pr, weight, bias, chunks, pair_grads, grads, need_h, need_w,
                           need_b, hidden_shape, tile, extra_grad, ws, local, margin_only)


def _chunk_loop(head, pr, weight, bias, chunks, pair_grads, grads, need_h, need_w, need_b,
                hidden_shape, tile, extra_grad, ws, slab=0, margin_only=False) -> PassResult:
    """:func:`run_pairs`'s loop over chunks of pairs, its buffers taken from ``ws``."""
    h2, dev, V, acc, opd, w, b, row_fwd, row_bwd, T, ii, softcap = loop_setup(head, pr, weight,
                                                                             bias)
    B, K = pr.pairs, pr.parts
    need_b = need_b and bias is not None
    out = torch.zeros(K * B, dtype=acc, device=dev)
    ext = torch.zeros(K * B, dtype=acc, device=dev) if pr.extra is not None else None
    d_h = d_w = d_b = None
    if grads and need_h:
        d_h = torch.zeros(h2.shape, dtype=h2.dtype, device=dev)
    kept = None  # the native GEMMs and row kernels of each chunk (linear_native.KeptChunks)
    tok = TokenStats(head.token_stats, h2.shape[0], dev)
    if KeptChunks.applies(head, pr, weight, bias, grads):  # a unit over slab: stream_unit
        kept = KeptChunks(head, weight, bias, max([min(unit_rows(pr, *c), slab or 1 << 62)
                                                   for c in chunks] + [0]), tile > 0, ws)
        chunks = streamed_first(pr, chunks, slab)
    first_unit = slabbed_unit(pr, chunks, slab) if kept else None
    if grads and need_w:  # the first matmul writes it (kept: every chunk adds into it)
        d_w = (torch.zeros if kept else torch.empty)(weight.shape, dtype=acc, device=dev)
    w_written = kept is not None
    if grads and need_b:
        d_b = torch.zeros(V, dtype=acc, device=dev)
    empty = torch.empty(0, dtype=acc, device=dev)

    def padded(n):
        return n if not tile else -(-n // tile) * tile

    max_rows = 0 if kept else max([padded(unit_rows(pr, j0, j1)) for j0, j1 in chunks] + [0])
    buf = ws.take("logits", max_rows * V, acc, dev)
    tbuf = ws.take("tanh", max_rows * V if (grads and softcap) else 0, acc, dev)
    for j0, j1 in chunks:
        P = j1 - j0
        sel, seq, lengths = chunk_selection(pr, j0, j1)
        R = sel.numel()
        Rp = padded(R)
        slabs = [(s0, min(Rp, s0 + (tile or Rp))) for s0 in range(0, Rp, tile or max(Rp, 1))]
        sums = torch.zeros(K * P, dtype=acc, device=dev)
        if R and kept and slab and R > slab and pair_grads is not None:
            slabbed = (j0, j1) == first_unit  # its forward in slabs (forward_groups)
            sums, dh = stream_unit(kept, pr, sel, seq, lengths, pr.scale.index_select(0, sel),
                                   slab if slabbed else 0,
                                   lambda *s, a=j0, e=j1: pair_grads(a, e, *s), need_h, d_w,
                                   d_b, defer=slabbed and margin_only and h2.dtype == acc,
                                   tok=tok)
            for k in range(K):
                out[k * B + j0:k * B + j1] = sums[k * P:(k + 1) * P]
            if dh is not None:
                d_h.index_copy_(0, sel, dh)
            continue
        if R and kept:
            h, lab = pr.h2.index_select(0, sel), pr.labels.index_select(0, sel)
            scale = pr.scale.index_select(0, sel)
            lp, rmax, lsum, ent = kept.forward(h, lab, head.token_stats)
            tok.put(sel, lp, lsum, ent)
        elif R:
            h = pad_rows(pr.h2.index_select(0, sel).to(opd), Rp, 0)
            lab = pad_rows(pr.labels.index_select(0, sel), Rp, ii).view(1, Rp)
            scale = pr.scale.index_select(0, sel)
            x = buf[:Rp * V].view(Rp, V)
            t = tbuf[:Rp * V].view(Rp, V) if (grads and softcap) else None
            stats = []
            for s0, s1 in slabs:  # fixed-shape slabs under batch invariance, else one
                logits_tile(h[s0:s1], w, b, head.logit_scale, softcap, x[s0:s1],
                            None if t is None else t[s0:s1])
                stats.append(row_fwd(x[s0:s1].view(1, s1 - s0, V), lab[:, s0:s1], ii, T, 0, V,
                                     head.token_stats)[:4])
            lp, rmax, lsum, ent = (torch.cat(c, 1) if len(c) > 1 else c[0] for c in zip(*stats))
            lp = lp.view(Rp)[:R]
            tok.put(sel, lp, lsum, ent)
        if R:
            extra = None if ext is None else pr.extra.index_select(0, sel)
            sums, esums = sequence_sums(seq, lengths, lp.to(acc), scale, extra)
            for k in range(K if ext is not None else 0):
                ext[k * B + j0:k * B + j1] = esums[k * P:(k + 1) * P]
        for k in range(K):
            out[k * B + j0:k * B + j1] = sums[k * P:(k + 1) * P]
        if pair_grads is None:
            continue
        g = pair_grads(j0, j1, *(sums[k * P:(k + 1) * P] for k in range(K)))
        if not grads or not R:
            continue
        g_row = token_grads(torch.cat(list(g)).to(acc), seq, scale, extra, extra_grad)
        if kept:
            dh = kept.backward(h, lab, g_row, rmax, lsum, need_h,
                               d_w if d_w is not None else empty,
                               d_b if d_b is not None else empty)
            if need_h:
                d_h.index_copy_(0, sel, dh)
            continue
        g_row = pad_rows(g_row, Rp, 0).view(1, Rp)
        for s0, s1 in slabs:
            xs = x[s0:s1].view(1, s1 - s0, V)
            row_bwd(g_row[:, s0:s1], None, xs, lab[:, s0:s1], rmax[:, s0:s1], lsum[:, s0:s1],
                    None, ii, T, 0, V, xs)
        dz = rows.transform_grad_(x, t, head.logit_scale, softcap)
        dz = dz if dz.dtype == opd else dz.to(opd)
        if need_h:
            dh = [mm_acc(dz[s0:s1], w) for s0, s1 in slabs]
            dh = torch.cat(dh) if len(dh) > 1 else dh[0]
            d_h.index_copy_(0, sel, dh[:R].to(d_h.dtype))
        if need_w:
            mm_acc(dz.t(), h, out=d_w, accumulate=w_written)
            w_written = True
        if need_b:
            d_b += x.sum(0, dtype=acc)
    if d_h is not None and hidden_shape is not None:
        d_h = d_h.view(hidden_shape)
    if d_w is not None and not w_written:
        d_w.zero_()
    if d_w is not None and d_w.dtype != weight.dtype:
        d_w = d_w.to(weight.dtype)
    if d_b is not None and d_b.dtype != bias.dtype:
        d_b = d_b.to(bias.dtype)
    logps = tuple(out[k * B:(k + 1) * B].clone() if K > 1 else out for k in range(K))
    extras = None if ext is None else tuple(ext[k * B:(k + 1) * B] for k in range(K))
    return PassResult(logps, extras, d_h, d_w, d_b, token=tok.t)


# ------------------------------------------------ frozen head of the per-token log-probs


def frozen_head_forward(row_backend, hidden, weight, bias, labels, ignore_index, temperature,
                        logit_scale, softcap, *, chunk_rows=None, batch_invariant=False,
                        with_entropy=False):
    """Forward of a head whose weight (and bias) need no gradient, with each token's gradient
    direction formed in the same pass: ``u = d logp / d hidden = a'(.) W^T (onehot - p) / T``.

    Chunks of labelled rows hold their full vocabulary row of logits (``(R, V)`` fp32), so the row
    op gives the final statistics at once and ``logps_bwd`` (with ``grad_logp = 1``) the
    ``d logits``; one more matmul turns them into ``u``. Two matmuls in all, over the labelled
    rows only; the backward is ``grad_logp * u``. Returns ``(logp, row_max, log_sum, u, ent)``,
    ``u`` ``(N, H)`` fp32 (0 on ignored rows), ``ent`` the entropy (no gradient; empty unless
    ``with_entropy``). ``batch_invariant``: chunks of exactly
    ``MIN_CHUNK_ROWS`` rows, the last one padded with ignored rows.

    The native backend on CPU runs it in C++ instead (``native_linear_frozen_fwd``): per token tile,
    one sweep of L2-sized vocabulary blocks, two GEMMs per block in cache and one parallel region
    (``chunk_rows`` does not apply; batch invariance holds with its own fixed tiles). Its
    statistics are the native forward's, bit for bit: the same tiles and per-block sums.
    """
    if (row_backend == "native" and hidden.device.type == "cpu"
            and hidden.dtype in ops.DTYPES["native"]
            and has_native_op("native_linear_frozen_fwd")):
        return ops.get_op("native", "linear_frozen_fwd")(
            hidden, weight, bias, labels, ignore_index, float(temperature), float(logit_scale),
            float(softcap) if softcap else 0.0, bool(batch_invariant), bool(with_entropy))
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = ops.acc_dtype(hidden.dtype)
    opd = operand_dtype(hidden.dtype, dev)
    row_fwd, row_bwd = ops.get_op(row_backend, "logps_fwd"), ops.get_op(row_backend, "logps_bwd")
    logp = torch.zeros(N, dtype=acc, device=dev)
    row_max, log_sum = torch.zeros_like(logp), torch.zeros_like(logp)
    u = torch.zeros((N, H), dtype=acc, device=dev)
    ent = torch.zeros(N if with_entropy else 0, dtype=acc, device=dev)
    # CPU: only the labelled rows (the count is free there); elsewhere every row, no host sync
    # (an ignored row's statistics and u are 0 from the row ops)
    sel_all = labelled_rows(labels, ignore_index)
    n_act = N if sel_all is None else sel_all.numel()
    if batch_invariant:
        chunk_rows = MIN_CHUNK_ROWS
    elif chunk_rows is None:
        budget = max(MIN_CHUNK_BYTES, int(CHUNK_FRACTION * N * V * hidden.element_size()))
        chunk_rows = max(MIN_CHUNK_ROWS, budget // (V * 4 * (2 if softcap else 1)))
    R_max = chunk_rows if batch_invariant else max(1, min(chunk_rows, n_act))
    buf = torch.empty(R_max * V, dtype=acc, device=dev)
    tbuf = torch.empty(R_max * V if softcap else 0, dtype=acc, device=dev)
    w = weight if weight.dtype == opd else weight.to(opd)
    b = None if bias is None else bias.to(acc)
    ones = torch.ones((1, R_max), dtype=acc, device=dev)
    T = float(temperature)
    with torch.autocast(dev.type, enabled=False):  # fp32 matmuls, as inside the ops
        for r0 in range(0, n_act, R_max):
            if sel_all is None:
                sel = slice(r0, min(N, r0 + R_max))
                n = sel.stop - r0
            else:
                sel = sel_all[r0:r0 + R_max]
                n = sel.numel()
            R = R_max if batch_invariant else n
            x = buf[:R * V].view(R, V)
            t = tbuf[:R * V].view(R, V) if softcap else None
            lab = pad_rows(_rows_of(labels, sel), R, ignore_index).view(1, R)
            h = pad_rows(_rows_of(hidden, sel).to(opd), R, 0)
            logits_tile(h, w, b, logit_scale, softcap, x, t)
            lp, m, ls, e = row_fwd(x.view(1, R, V), lab, ignore_index, T, 0, V, with_entropy)
            row_bwd(ones[:, :R], None, x.view(1, R, V), lab, m, ls, None, ignore_index, T, 0, V,
                    x.view(1, R, V))
            dz = rows.transform_grad_(x, t, logit_scale, softcap)
            _put_rows(u, sel, mm_acc(dz if dz.dtype == opd else dz.to(opd), w)[:n])
            _put_rows(logp, sel, lp.view(R)[:n])
            _put_rows(row_max, sel, m.view(R)[:n])
            _put_rows(log_sum, sel, ls.view(R)[:n])
            if with_entropy:
                _put_rows(ent, sel, e.view(R)[:n])
    return logp, row_max, log_sum, u, ent


def _rows_of(t, sel):
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


def _put_rows(out, sel, t):
    if isinstance(sel, slice):
        out[sel] = t
    else:
        out.index_copy_(0, sel, t)


class LinearPairLoss(torch.autograd.Function):
    """``(loss, *logps)`` of a fused pass whose gradients ``compute()`` already formed.

    ``compute()`` returns ``(loss, logps, grads)``: ``logps`` a tuple of sequence log-prob
    tensors (not differentiable), ``grads`` the gradients of ``(hidden, weight, bias,
    target_probs, reward_margins)`` (None where not needed); the backward scales them by the
    incoming gradient of ``loss``. ``name`` is the public function, for the errors.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_probs, reward_margins, compute,
                name="linear_dpo_loss"):
        loss, logps, grads = compute()
        ctx.grads, ctx.name = grads, name
        ctx.mark_non_differentiable(*logps)
        return (loss, *logps)

    @staticmethod
    def backward(ctx, grad, *_):
        # not once_differentiable: it runs backward without grad mode, hiding create_graph
        refuse_double_backward(ctx.name)
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(f"{ctx.name}: backward ran twice through the same graph; its "
                               "gradients were formed in forward and are released after the "
                               "first backward (do not use retain_graph with it)")
        ctx.grads = None
        # a unit gradient (loss.backward()) needs no pass over the stored gradients; the check
        # is free on CPU only (elsewhere it would synchronise the device)
        unit = grad is not None and grad.device.type == "cpu" and bool(grad == 1)
        out = []
        for i, g in enumerate(grads):
            if g is None or grad is None or not ctx.needs_input_grad[i]:
                out.append(None)
            elif unit:
                out.append(g)
            elif g.dtype == torch.float16:  # a loss scale (2**16) is over fp16's range
                out.append(g.copy_(g.float() * grad.float()))
            else:  # in place: the stored gradient is not used again
                out.append(g.mul_(grad.to(g.dtype)))
        return (*out, None, None)
