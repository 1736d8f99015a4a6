"""Fused LM head over chunks: log-probs from hidden states and the LM-head weight.

Implements ``linear_logps_fwd`` / ``linear_logps_bwd`` (see :mod:`fastdpo.ops`) for the ``torch``
backend and the ``native`` backend's CUDA tensors with one chunk loop, parameterised by the row
kernel run on each chunk of logits (``torch_logps_*`` or the C++ ``native_logps_*``); the native
CPU head is the same loop in C++ (``csrc/cpu/linear_cpu.cpp``). The Triton backend reuses the backward
loop with its own fused tile kernel. No ``(N, V)`` buffer ever exists:

* forward: vocabulary chunks outside, token chunks inside; each ``(Nc, Vc)`` tile of logits is
  built by one matmul, reduced by the row kernel with ``vocab_start`` set to the tile's first
  column (so a label in another tile counts 0), and merged into per-token running statistics
  (online log-sum-exp). Only O(N) survives the loop.
* backward: the same tiles are rebuilt and turned into ``d logits`` in place by the row kernel
  (given the global row statistics and entropy), then multiplied into ``d_hidden`` /
  ``d_weight`` / ``d_bias``.
  ``d_weight`` of a vocabulary chunk is accumulated in fp32 over all tokens and written once,
  ``d_hidden`` of a token block in fp32 over all vocabulary chunks.

Fully ignored rows are left out before the loops (CPU). ``batch_invariant`` fixes the plan and
pads every token tile to full, so no shape depends on the batch (:func:`invariant_plan`).

Chunk sizes come from a memory budget of ``BUDGET_FRACTION`` of what the ``(N, V)`` logits would
take in the hidden states' dtype (at least ``MIN_BUDGET``): a third for the fp32 ``d_hidden``
accumulator of a token block (bf16/fp16 inputs; when all tokens do not fit, ``d_hidden`` is
computed block by block in a first sweep and ``d_weight`` / ``d_bias`` in a second one, so each
gradient is still rounded once), a third for the fp32 weight chunk and its gradient accumulator,
a third for the logits tile and the row kernel's temporaries.

The logit transform (Gemma-2 style soft-capping): ``z = c * tanh(s * (h @ w.T + b) / c) / T`` with
``s = logit_scale``, ``c = softcap`` (0 = off), ``T = temperature``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .. import backends, ops, rows
from . import logps as _torch_rows  # noqa: F401  (registers the torch row kernels run here)
from .matmul import acc_dtype, dz_bytes, logits_tile, mm_acc, operand_dtype

# Extra memory allowed, as a fraction of the (N, V) logits. More (FASTDPO_LINEAR_MEMORY_FRACTION,
# e.g. 0.1) lets bf16 d_hidden accumulate in one sweep: at H = 4096, V = 128k its fp32
# accumulator alone is 6.25% of the bf16 logits, so 5% costs a second sweep (one more matmul).
BUDGET_FRACTION = float(os.environ.get("FASTDPO_LINEAR_MEMORY_FRACTION", "0.05"))
MIN_BUDGET = 16 << 20
# On a GPU each tile costs ~5-35 kernel launches (matmul, row kernel, the tile merge), ~5 us of
# host time each, while its matmul takes 2 * rows * cols * H / ~790 TFLOP/s (H100/H200 bf16): a
# 128-column tile of 330 rows at H = 4096 is 0.4 us of GPU work against ~150 us of launches, so
# the 16 MiB floor would leave the GPU idle (4008 tiles for N = 1024, V = 128256). 512 MiB
# (0.4% of an H200, 0.6% of an 80 GB H100) gives whole-vocabulary-row tiles of ~1000 rows there
# (~0.65 ms of matmul per tile) and, for a trainable head's backward at N = 4096, ~5000-column
# tiles (~0.2 ms each): GPU work above the launches' host time, so they overlap.
MIN_BUDGET_CUDA = 512 << 20
# fp32 copies of one logits tile alive at once in the torch row kernel (tile, tanh buffer, the
# kernel's own exp / product temporaries); the native and Triton tile kernels need fewer.
TILE_COPIES = 5
# Fewest token rows worth a tile of whole vocabulary rows (smaller matmuls lose speed).
FULL_ROWS_MIN = 64


def tile_bytes_of(row_backend: str, softcap, dz: int = 0) -> int:
    """Bytes per logits-tile element: the C++ row kernels work in place (the tile, plus the tanh
    kept for the chain rule under soft-capping); the torch one makes copies. ``dz``: the
    backward's ``d logits`` in the operand dtype (:func:`~.matmul.dz_bytes`)."""
    return dz + (4 * TILE_COPIES if row_backend == "torch" else 4 * (2 if softcap else 1))


@dataclass(frozen=True)
class Plan:
    block_rows: int   # tokens whose d_hidden is accumulated in fp32 at once (Ns)
    tile_rows: int    # tokens per tile (Nc)
    tile_cols: int    # vocabulary entries per tile (Vc)


def plan(N: int, V: int, H: int, itemsize: int, *, tile_bytes: int = 4 * TILE_COPIES,
         hidden_acc: bool = True, budget: int | None = None, weight_direct: bool = False,
         device: str = "cpu") -> Plan:
    """Chunk sizes keeping the extra memory near ``budget`` bytes (see the module docstring).

    ``tile_bytes``: bytes of temporaries per logits-tile element; ``hidden_acc``: whether
    ``d_hidden`` needs a separate fp32 accumulator (it does not when the hidden states are fp32).
    ``weight_direct``: the weight is used as is and its gradient (if any) accumulated in place,
    so no weight chunk is copied: then whole vocabulary rows per tile when at least
    ``FULL_ROWS_MIN`` rows fit, which makes one matmul and one row-kernel call per token chunk
    (a few long parallel regions, no merging of tiles) instead of one per tile.
    ``device``: the device type; CUDA's budget floor is ``MIN_BUDGET_CUDA``.
    """
    if budget is None:
        floor = MIN_BUDGET_CUDA if device == "cuda" else MIN_BUDGET
        budget = max(floor, int(BUDGET_FRACTION * N * V * itemsize))
    part = budget // 3
    H = max(H, 1)
    block_rows = max(1, min(N, part // (4 * H))) if hidden_acc else max(N, 1)
    if weight_direct:
        full = (budget - (part if hidden_acc else 0)) // (V * tile_bytes + 4 * H)
        if full >= min(FULL_ROWS_MIN, max(N, 1)):
            return Plan(block_rows, max(1, min(full, block_rows, max(N, 1))), V)
    cols = part // (8 * H)  # fp32 weight chunk + fp32 d_weight accumulator
    cols = V if cols >= V else max(64, cols // 64 * 64)
    cols = min(cols, V)
    rows = part // (cols * tile_bytes + 4 * H)  # tile temporaries + fp32 hidden chunk
    rows = max(1, min(rows, block_rows, max(N, 1)))
    return Plan(block_rows, rows, cols)


# Batch invariance: the plan of this many tokens whatever N, and every token tile padded to full
# (ignored rows), so no matmul or row-kernel shape depends on the batch: a row's results are
# bitwise the same in any batch (the weight's gradient, a sum over the batch, is not a row's).
INVARIANT_PLAN_ROWS = 4096


def invariant_plan(V: int, H: int, itemsize: int, **kw) -> Plan:
    """The one plan of every batch size. Its rows are fixed and every tile is padded to full,
    so it takes the CPU floor on every device: the CUDA floor would pad each call to more rows
    (tiles of 4096 rows instead of 950 in a bf16 backward at V = 128256, H = 4096, 4 bytes a
    tile element)."""
    return plan(INVARIANT_PLAN_ROWS, V, H, itemsize, **kw)


def pad_rows(t, n: int, value):
    """``t`` with rows appended up to ``n`` (filled with ``value``)."""
    if t.shape[0] == n:
        return t
    out = t.new_full((n,) + tuple(t.shape[1:]), value)
    out[:t.shape[0]] = t
    return out


# ----------------------------------------------------------------------------- forward loop


def forward_loop(row_backend, hidden, weight, bias, labels, ignore_index, temperature,
                 logit_scale, softcap, vocab_start, vocab_total, with_entropy, *, plan_=None,
                 batch_invariant=False):
    N, H = hidden.shape
    V = weight.shape[0]
    if batch_invariant:  # a fixed plan, every tile full: see invariant_plan
        p = invariant_plan(V, H, hidden.element_size(), hidden_acc=False)
        n_pad = -(-N // p.tile_rows) * p.tile_rows
        out = forward_loop(row_backend, pad_rows(hidden, n_pad, 0), weight, bias,
                           pad_rows(labels, n_pad, ignore_index), ignore_index, temperature,
                           logit_scale, softcap, vocab_start, vocab_total, with_entropy, plan_=p)
        return tuple(t[:N] if t.numel() else t for t in out)
    dev = hidden.device
    acc = acc_dtype(hidden.dtype)
    opd = operand_dtype(hidden.dtype, dev)
    p = plan_ or plan(N, V, H, hidden.element_size(), hidden_acc=False,
                      tile_bytes=tile_bytes_of(row_backend, 0.0),
                      weight_direct=weight.dtype == opd, device=dev.type)
    row_fwd = ops.get_op(row_backend, "logps_fwd")
    # running row statistics over the tiles seen so far (the contract's values for no column)
    logp = torch.zeros(N, dtype=acc, device=dev)
    m = torch.full((N,), -math.inf, dtype=acc, device=dev)
    log_s = torch.full((N,), -math.inf, dtype=acc, device=dev)
    ent = torch.zeros(N, dtype=acc, device=dev) if with_entropy else None
    held = torch.zeros(N, dtype=torch.bool, device=dev)  # label found in an earlier tile
    lab = rows.classify_labels(labels, ignore_index, vocab_start, vocab_total, V)
    col = labels.long() - vocab_start
    buf = torch.empty(p.tile_rows * p.tile_cols, dtype=acc, device=dev)
    lab2 = labels.view(1, N)
    for v0 in range(0, V, p.tile_cols):
        v1 = min(V, v0 + p.tile_cols)
        w = weight[v0:v1].to(opd)
        b = None if bias is None else bias[v0:v1]
        for n0 in range(0, N, p.tile_rows):
            n1 = min(N, n0 + p.tile_rows)
            x = buf[: (n1 - n0) * (v1 - v0)].view(1, n1 - n0, v1 - v0)
            logits_tile(hidden[n0:n1].to(opd), w, b, logit_scale, softcap, x[0])
            tile = row_fwd(x, lab2[:, n0:n1], ignore_index, float(temperature), vocab_start + v0,
                           vocab_total, with_entropy)
            sl = slice(n0, n1)
            if p.tile_cols == V:  # whole rows: the row kernel's statistics are final
                logp[sl], m[sl], log_s[sl] = (t[0] for t in tile[:3])
                if with_entropy:
                    ent[sl] = tile[3][0]
                continue
            here = lab.local[n0:n1] & (col[n0:n1] >= v0) & (col[n0:n1] < v1)
            parts = [torch.stack([run[sl], new[0]]) for run, new in
                     zip((logp, m, log_s), tile[:3])]
            e2 = torch.stack([ent[sl], tile[3][0]]) if with_entropy else None
            out = rows.combine(*parts, e2, torch.stack([held[sl], here]), lab.active[n0:n1],
                               float(temperature))
            logp[sl], m[sl], log_s[sl] = out[:3]
            if with_entropy:
                ent[sl] = out[3]
            held[sl] |= here
    if not with_entropy:
        ent = hidden.new_empty((0,), dtype=acc)
    # an invalid label is NaN (the row contract); the running log-prob started at 0, not NaN
    logp = torch.where(lab.active & ~lab.valid, math.nan, logp)
    zero = ~lab.active
    return (logp.masked_fill(zero, 0.0), m.masked_fill(zero, 0.0), log_s.masked_fill(zero, 0.0),
            ent if not with_entropy else ent.masked_fill(zero, 0.0))


# ---------------------------------------------------------------------------- backward loop


class RowKernelTiles:
    """Gradient tiles from a row kernel (``torch`` or ``native``): build the tile of logits,
    run ``<row_backend>_logps_bwd`` on it in place, apply the chain rule of the transform."""

    whole_rows = True  # takes tiles of whole vocabulary rows (see plan)

    def __init__(self, row_backend: str, softcap=0.0, dz: int = 0):
        self.row_bwd = ops.get_op(row_backend, "logps_bwd")
        self.tile_bytes = tile_bytes_of(row_backend, softcap, dz)
        self.buf = self.tbuf = None

    def grad_tile(self, h, w, b, labels, grad_logp, grad_entropy, row_max, log_sum, ent,
                  ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total, opd):
        n, v = h.shape[0], w.shape[0]
        acc = acc_dtype(h.dtype)
        if self.buf is None:
            self.buf = torch.empty(self._cap, dtype=acc, device=h.device)
            self.tbuf = torch.empty(self._cap if softcap else 0, dtype=acc, device=h.device)
        x = self.buf[: n * v].view(1, n, v)
        t = self.tbuf[: n * v].view(n, v) if softcap else None
        logits_tile(h, w, b, logit_scale, softcap, x[0], t)
        ge = None if grad_entropy is None else grad_entropy.view(1, n)
        self.row_bwd(grad_logp.view(1, n), ge,
                     x, labels.view(1, n), row_max.view(1, n), log_sum.view(1, n),
                     None if ent is None else ent.view(1, n),
                     ignore_index, float(temperature), vocab_start, vocab_total, x)
        dz = rows.transform_grad_(x[0], t, logit_scale, softcap)
        return dz if dz.dtype == opd else dz.to(opd)

    def reserve(self, elements: int):
        self._cap = elements


def backward_loop(tiles, grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum,
                  entropy, ignore_index, temperature, logit_scale, softcap, vocab_start,
                  vocab_total, need_hidden_grad, need_weight_grad, need_bias_grad, *, plan_=None,
                  batch_invariant=False):
    """Gradients of the fused head; ``tiles.grad_tile`` turns a chunk into ``d logits``.

    One sweep over the tiles when the fp32 ``d_hidden`` accumulator of all tokens fits the budget
    (or is not needed); otherwise two, so that every gradient is still rounded once: token blocks
    outside for ``d_hidden``, then all tokens inside each vocabulary chunk for ``d_weight`` /
    ``d_bias`` (the tiles are rebuilt twice: one more logits matmul instead of memory).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    need_bias_grad = need_bias_grad and bias is not None
    empty = hidden.new_empty((0,))
    dense = torch.contiguous_format
    d_h = torch.zeros_like(hidden, memory_format=dense) if need_hidden_grad else empty
    d_w = torch.zeros_like(weight, memory_format=dense) if need_weight_grad else empty
    d_b = torch.zeros_like(bias) if need_bias_grad else empty
    if not (need_hidden_grad or need_weight_grad or need_bias_grad) or N == 0:
        return d_h, d_w, d_b
    hidden_acc = need_hidden_grad and d_h.dtype != acc
    if batch_invariant:  # a fixed plan, every tile full: see invariant_plan
        p = invariant_plan(V, H, hidden.element_size(), tile_bytes=tiles.tile_bytes,
                           hidden_acc=hidden_acc)
        n_pad = -(-N // p.tile_rows) * p.tile_rows
        padded = [None if t is None or t.numel() == 0 else pad_rows(t, n_pad, 0)
                  for t in (grad_logp, grad_entropy, hidden, row_max, log_sum, entropy)]
        g, ge, h, m, ls, ent = padded
        d_h2, d_w, d_b = backward_loop(tiles, g, ge, h, weight, bias,
                                       pad_rows(labels, n_pad, ignore_index), m, ls, ent,
                                       ignore_index, temperature, logit_scale, softcap,
                                       vocab_start, vocab_total, need_hidden_grad,
                                       need_weight_grad, need_bias_grad, plan_=p)
        return (d_h2[:N] if need_hidden_grad else d_h2), d_w, d_b
    opd = operand_dtype(hidden.dtype, hidden.device)
    direct = (getattr(tiles, "whole_rows", False) and weight.dtype == opd
              and not ((need_weight_grad and d_w.dtype != acc)
                       or (need_bias_grad and d_b.dtype != acc)))
    p = plan_ or plan(N, V, H, hidden.element_size(), tile_bytes=tiles.tile_bytes,
                      hidden_acc=hidden_acc, weight_direct=direct, device=hidden.device.type)
    tiles.reserve(p.tile_rows * p.tile_cols)
    row_data = (labels, grad_logp.to(acc),
                None if grad_entropy is None else grad_entropy.to(acc), row_max, log_sum, entropy)
    consts = (ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total)
    if p.block_rows >= N or not (need_weight_grad or need_bias_grad) or not need_hidden_grad:
        _sweep(tiles, p, N, hidden, weight, bias, row_data, consts, d_h, d_w, d_b, hidden_acc)
    else:
        _sweep(tiles, p, p.block_rows, hidden, weight, bias, row_data, consts, d_h, empty, empty,
               hidden_acc)
        _sweep(tiles, p, N, hidden, weight, bias, row_data, consts, empty, d_w, d_b, False)
    return d_h, d_w, d_b


def _sweep(tiles, p, block_rows, hidden, weight, bias, row_data, consts, d_h, d_w, d_b,
           hidden_acc):
    """Token blocks of ``block_rows`` outside, vocabulary chunks, token tiles inside; fills the
    non-empty ones of ``d_h`` / ``d_w`` / ``d_b``. ``d_w`` / ``d_b`` need a single block."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = acc_dtype(hidden.dtype)
    opd = operand_dtype(hidden.dtype, dev)
    labels, grad_logp, grad_entropy, row_max, log_sum, entropy = row_data
    need_h, need_w, need_b = d_h.numel() > 0, d_w.numel() > 0, d_b.numel() > 0
    w_direct = need_w and d_w.dtype == acc
    for s0 in range(0, N, block_rows):
        s1 = min(N, s0 + block_rows)
        dh_acc = None
        if need_h:
            dh_acc = (torch.zeros((s1 - s0, H), dtype=acc, device=dev) if hidden_acc
                      else d_h[s0:s1])
        for v0 in range(0, V, p.tile_cols):
            v1 = min(V, v0 + p.tile_cols)
            w = weight[v0:v1].to(opd)
            b = None if bias is None else bias[v0:v1]
            dw_acc = None
            if need_w:
                dw_acc = (d_w[v0:v1] if w_direct
                          else torch.zeros((v1 - v0, H), dtype=acc, device=dev))
            db_acc = torch.zeros(v1 - v0, dtype=acc, device=dev) if need_b else None
            for n0 in range(s0, s1, p.tile_rows):
                n1 = min(s1, n0 + p.tile_rows)
                h = hidden[n0:n1].to(opd)
                dz = tiles.grad_tile(h, w, b, labels[n0:n1], grad_logp[n0:n1],
                                     None if grad_entropy is None else grad_entropy[n0:n1],
                                     row_max[n0:n1], log_sum[n0:n1],
                                     None if entropy is None else entropy[n0:n1],
                                     *consts[:4], consts[4] + v0, consts[5], opd)
                if need_h:
                    mm_acc(dz, w, out=dh_acc[n0 - s0:n1 - s0], accumulate=True)
                if need_w:
                    mm_acc(dz.t(), h, out=dw_acc, accumulate=True)
                if need_b:
                    db_acc += dz.sum(0, dtype=acc)
            if need_w and not w_direct:
                d_w[v0:v1].copy_(dw_acc)
            if need_b:
                d_b[v0:v1].copy_(db_acc)
        if hidden_acc:
            d_h[s0:s1].copy_(dh_acc)


# ------------------------------------------------------------------------------ registration


def _checked(row_backend, device):
    if row_backend != "torch":
        why = backends.device_reason(row_backend, device)
        if why:
            raise RuntimeError(f"backend {row_backend!r} is not available on {device}: {why}")


def labelled_rows(labels, ignore_index):
    """Indices of the rows with a label when some rows are ignored, else None. CPU only: there
    the count costs no device synchronisation, and skipped rows save whole matmul rows."""
    if labels.device.type != "cpu":
        return None
    active = labels != ignore_index
    if bool(active.all()):
        return None
    return torch.nonzero(active).squeeze(1)


def _scatter_rows(t, sel, n):
    """``(n, ...)`` zeros with the rows ``sel`` from ``t`` (ignored rows are 0 in every output);
    ``sel`` may be empty (every row ignored)."""
    out = t.new_zeros((n,) + tuple(t.shape[1:]))
    return out.index_copy_(0, sel, t)


def make_impls(row_backend: str):
    def fwd(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap,
            vocab_start, vocab_total, with_entropy, batch_invariant):
        _checked(row_backend, hidden.device)
        args = (ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total,
                with_entropy)
        sel = labelled_rows(labels, ignore_index)
        if sel is None:
            return forward_loop(row_backend, hidden, weight, bias, labels, *args,
                                batch_invariant=batch_invariant)
        out = forward_loop(row_backend, hidden.index_select(0, sel), weight, bias,
                           labels.index_select(0, sel), *args, batch_invariant=batch_invariant)
        n = labels.shape[0]
        ent = _scatter_rows(out[3], sel, n) if with_entropy else out[3]  # else the empty one
        return tuple(_scatter_rows(t, sel, n) for t in out[:3]) + (ent,)

    def bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy,
            ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total,
            need_hidden_grad, need_weight_grad, need_bias_grad, batch_invariant):
        _checked(row_backend, hidden.device)
        sel = labelled_rows(labels, ignore_index)
        rows_in = (grad_logp, grad_entropy, hidden, labels, row_max, log_sum, entropy)
        if sel is not None:
            rows_in = tuple(t if t is None or t.numel() == 0 else t.index_select(0, sel)
                            for t in rows_in)
        g, ge, h, lab, m, ls, ent = rows_in
        tiles = RowKernelTiles(row_backend, softcap, dz_bytes(h.dtype, h.device))
        d_h, d_w, d_b = backward_loop(tiles, g, ge, h, weight,
                                      bias, lab, m, ls, ent, ignore_index, temperature,
                                      logit_scale, softcap, vocab_start, vocab_total,
                                      need_hidden_grad, need_weight_grad, need_bias_grad,
                                      batch_invariant=batch_invariant)
        if sel is not None and need_hidden_grad:
            d_h = _scatter_rows(d_h, sel, labels.shape[0])
        return d_h, d_w, d_b

    return fwd, bwd


# The native backend's CPU fused head is C++ (csrc/cpu/linear_cpu.cpp, one parallel region per
# loop); this loop with the native row kernels serves its CUDA tensors.
for _rb, _devices in (("torch", ("cpu", "cuda")), ("native", ("cuda",))):
    _fwd, _bwd = make_impls(_rb)
    ops.register_impl(_rb, "linear_logps_fwd", _fwd, device_types=_devices)
    ops.register_impl(_rb, "linear_logps_bwd", _bwd, device_types=_devices)
