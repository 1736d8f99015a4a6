"""Triton kernels of the fused LM head (``linear_logps_fwd`` / ``linear_logps_bwd``).

Forward: one program owns ``BLOCK_N`` tokens and a contiguous range of ``BLOCK_V``-wide vocabulary
tiles (the vocabulary is split over a second grid axis so that short batches still fill the GPU;
the splits have a fixed width, so a token's result does not depend on the batch it is in).
Each tile of logits is a ``tl.dot`` over the hidden dimension in ``BLOCK_K`` steps with fp32
accumulation, goes through bias / scale / soft-cap in registers, and is folded into per-token
online statistics (:func:`._tiles.fold`: max of the raw logits, base-2 sums relative to it, the
temperature applied after subtracting the max). The label logit is picked inside the tile. The
splits, O(tokens) each, are merged by :func:`fastdpo.rows.combine`. Programs whose tokens are all
ignored (prompts, the shifted-out last position) read nothing.

Backward: :func:`fastdpo.torch_backend.linear.backward_loop` walks token x vocabulary chunks; for each,
one kernel rebuilds the logits tile by tile and writes ``d(h @ w.T + b)`` (softmax gradient,
entropy term, temperature and soft-cap chain rule) into a bounded chunk buffer, which two matmuls
(cuBLAS on GPU) turn into ``d_hidden`` and ``d_weight`` with fp32 accumulation. No atomics
anywhere, so gradients are bitwise repeatable; no ``(N, V)`` buffer.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import backends, ops, rows
from ..torch_backend import linear as chunk_loop
from . import _interpreter, _launch
from ._tiles import LOG2E, NEG_BIG, fold, grad_coeffs, softmax_grad

_interpreter.install()


@triton.jit
def _tanh(y):
    # tanh from exp of a non-positive argument: no overflow, odd by construction.
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                 stride_hn, stride_hk, stride_wv, stride_wk,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """``h[rows] @ w[cols].T (+ b[cols])`` as an fp32 ``(BLOCK_N, BLOCK_V)`` tile; fp32 inputs
    get full-precision products (tf32 would be the tensor cores' default)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_rows + ks[None, :].to(tl.int64) * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(w_cols + ks[:, None].to(tl.int64) * stride_wk,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, bt.to(a.dtype), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _transform(acc, scale, cap, SOFTCAP: tl.constexpr):
    """The logit transform of :func:`fastdpo.rows.transform_logits_` and its derivative."""
    if SOFTCAP:
        th = _tanh(acc * (scale / cap))
        x = cap * th
        dfac = (1.0 - th * th) * scale
    else:
        x = acc * scale
        dfac = scale  # a scalar: 0 * acc would be NaN at -inf logits
    return x, dfac


# Both kernels below open the same way (signature, row block, labels) on purpose: Triton kernels
# list each pointer and stride, and the short prologue is clearer inline than behind a helper.
@triton.jit
def _linear_fwd_kernel(
    h_ptr, w_ptr, b_ptr, lab_ptr, m_ptr, s_ptr, u_ptr, xl_ptr,
    N, V, H, tiles_per_split,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_l,
    ignore_index, vocab_start, scale, cap, inv_temp,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    lab = tl.load(lab_ptr + rows.to(tl.int64) * stride_l, mask=row_ok,
                  other=ignore_index).to(tl.int64)
    active = row_ok & (lab != ignore_index)
    out = pid_s.to(tl.int64) * N + rows
    if tl.max(active.to(tl.int32), axis=0) == 0:
        zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
        tl.store(m_ptr + out, zero, mask=row_ok)
        tl.store(s_ptr + out, zero + 1.0, mask=row_ok)
        tl.store(u_ptr + out, zero, mask=row_ok)
        tl.store(xl_ptr + out, zero, mask=row_ok)
    else:
        local = lab - vocab_start
        c2 = inv_temp * LOG2E
        m = tl.full((BLOCK_N,), NEG_BIG, dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        xl = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t0 = pid_s * tiles_per_split
        for t in range(t0, t0 + tiles_per_split):
            cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                               stride_hn, stride_hk, stride_wv, stride_wk,
                               HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K)
            x, _ = _transform(acc, scale, cap, SOFTCAP)
            x = tl.where(col_ok[None, :], x, float("-inf"))
            m, s, u = fold(x, m, s, u, c2, WITH_ENTROPY)
            xl += tl.sum(tl.where(cols[None, :] == local[:, None], x, 0.0), axis=1)
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(u_ptr + out, u, mask=row_ok)
        tl.store(xl_ptr + out, xl, mask=row_ok)


@triton.jit
def _linear_grad_tile_kernel(
    h_ptr, w_ptr, b_ptr, lab_ptr, max_ptr, sum_ptr, ent_ptr, gl_ptr, ge_ptr, dz_ptr,
    N, V, H,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_l, stride_dz,
    ignore_index, vocab_start, vocab_total, scale, cap, inv_temp,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dz[n, v] = d loss / d (h[n] @ w[v] + b[v])`` over an ``(N, V)`` chunk (local sizes)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    lab = tl.load(lab_ptr + rows.to(tl.int64) * stride_l, mask=row_ok,
                  other=ignore_index).to(tl.int64)
    active = row_ok & (lab != ignore_index)
    dz_ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if tl.max(active.to(tl.int32), axis=0) == 0:
        tl.store(dz_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=dz_ptr.dtype.element_ty), mask=out_ok)
    else:
        acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                           stride_hn, stride_hk, stride_wv, stride_wk,
                           HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K)
        x, dfac = _transform(acc, scale, cap, SOFTCAP)
        rm = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
        half_ref = tl.where(rm == float("-inf"), 0.0, rm * 0.5)
        log_sum = tl.load(sum_ptr + rows, mask=row_ok, other=0.0)
        g = tl.where(active, tl.load(gl_ptr + rows, mask=row_ok, other=0.0), 0.0)
        if HAS_GE:
            ge = tl.where(active, tl.load(ge_ptr + rows, mask=row_ok, other=0.0), 0.0)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        else:
            ge = g
            ent = log_sum
        gs, a, k = grad_coeffs(g, ge, ent, log_sum, inv_temp, HAS_GE)
        dz = softmax_grad(x, half_ref[:, None], inv_temp * LOG2E, (log_sum * LOG2E)[:, None],
                          a[:, None], k[:, None], HAS_GE)
        # an invalid label matches no column (its log-prob is NaN; its gradient the softmax part)
        local = tl.where((lab >= 0) & (lab < vocab_total), lab - vocab_start, -1)
        dz = tl.where(cols[None, :] == local[:, None], dz + gs[:, None], dz)
        # ignored rows have no statistics (their exp may overflow): zero them after the math
        dz = tl.where(active[:, None] & col_ok[None, :], dz * dfac, 0.0)
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------------- launchers


def _config(dtype, device, interpreted=None):
    """``(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages)``."""
    if interpreted is None:
        interpreted = backends.triton_interpreted()
    if interpreted or device.type == "cpu":  # (meta tensors: ahead-of-time specs for GPUs)
        return 16, 32, 16, 4, 1  # small tiles keep the interpreter fast
    if dtype == torch.float32:
        # Full-precision products run on FMAs. Tiles of 64 x 128, BLOCK_K 32 or a third stage
        # leave ptxas (Triton 3.6 or 3.9, sm_90) spilling some variants; this spills none.
        return 128, 64, 16, 8, 2
    return 128, 128, 64, 8, 3


def _splits(V: int, block_v: int, interpreted=None):
    """``(splits, tiles per split)`` of the vocabulary. A fixed width (1024 columns on GPUs: 126
    splits of a 128k vocabulary, enough programs for one row tile) that depends on neither the
    batch nor the device, so a row's result is bitwise the same in any batch. Under the
    interpreter two tiles, so the tests' small vocabularies exercise the merge."""
    if interpreted is None:
        interpreted = backends.triton_interpreted()
    per = 2 if interpreted else max(1, 1024 // block_v)
    return triton.cdiv(triton.cdiv(V, block_v), per), per


def _consts(temperature, logit_scale, softcap):
    return float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature)


def fwd_launch(hidden, weight, bias, labels, stats, ignore_index, temperature, logit_scale,
               softcap, vocab_start, with_entropy, *, per, interpreted=None):
    """``(kernel, grid, args, meta)`` of the forward over ``stats`` = ``(4, splits, N)``."""
    N, H = hidden.shape
    BN, BV, BK, warps, stages = _config(hidden.dtype, hidden.device, interpreted)
    bias = None if bias is None else bias.contiguous()  # the kernels index it at unit stride
    args = (hidden, weight, bias if bias is not None else hidden, labels, *stats.unbind(0),
            N, weight.shape[0], H, per,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            labels.stride(0), int(ignore_index), int(vocab_start),
            *_consts(temperature, logit_scale, softcap))
    meta = dict(HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), WITH_ENTROPY=bool(with_entropy),
                BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    return _linear_fwd_kernel, (triton.cdiv(N, BN), stats.shape[1]), args, meta


def grad_launch(h, w, b, labels, row_max, log_sum, ent, grad_logp, grad_entropy, dz,
                ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total, *,
                interpreted=None):
    """``(kernel, grid, args, meta)`` of one gradient tile ``dz`` (``(n, v)``)."""
    n, v = h.shape[0], w.shape[0]
    BN, BV, BK, warps, stages = _config(h.dtype, h.device, interpreted)
    has_ge = grad_entropy is not None
    # the kernel indexes the bias and the per-row vectors at unit stride (labels take a stride)
    b, row_max, log_sum, ent, grad_logp, grad_entropy = (
        None if t is None else t.contiguous()
        for t in (b, row_max, log_sum, ent, grad_logp, grad_entropy))
    args = (h, w, b if b is not None else h, labels, row_max, log_sum,
            ent if has_ge else log_sum, grad_logp, grad_entropy if has_ge else grad_logp, dz,
            n, v, h.shape[1],
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), labels.stride(0), dz.stride(0),
            int(ignore_index), int(vocab_start), int(vocab_total),
            *_consts(temperature, logit_scale, softcap))
    meta = dict(HAS_BIAS=b is not None, SOFTCAP=bool(softcap), HAS_GE=has_ge,
                BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    return _linear_grad_tile_kernel, (triton.cdiv(n, BN), triton.cdiv(v, BV)), args, meta


def _merge(stats, labels, ignore_index, temperature, vocab_start, vocab_total, V, width,
           with_entropy):
    """The contract's outputs from the splits' statistics (``width`` columns per split)."""
    m, s, u, xl = stats.unbind(0)
    S = m.shape[0]
    dead = s == 0  # no finite logit in this split
    row_max = torch.where(dead, -math.inf, m)
    log_sum = torch.log(s)
    lab = rows.classify_labels(labels, ignore_index, vocab_start, vocab_total, V)
    part = torch.arange(S, device=m.device)[:, None]
    holder = lab.local[None] & ((labels.long() - vocab_start)[None] // width == part)
    # the held label's log-prob within its split (-inf on a split with no finite logit)
    # (x / 2 - m / 2) * 2 / T: no overflow for logits of opposite signs near the fp32 limit
    logp = torch.where(dead, -math.inf, (xl * 0.5 - m * 0.5) * (2.0 / temperature) - log_sum)
    logp = torch.where(lab.valid[None], torch.where(holder, logp, 0.0), math.nan)
    ent = (torch.log2(s) - u / s) * math.log(2.0) if with_entropy else None
    return rows.combine(logp, row_max, log_sum, ent, holder, lab.active, float(temperature))


def linear_logps_fwd(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap,
                     vocab_start, vocab_total, with_entropy, batch_invariant=False):
    # Batch-invariant whatever the flag: a row's tiles and the vocabulary splits depend on V only.
    _launch.check_device("hidden", hidden)
    N, _ = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = ops.acc_dtype(hidden.dtype)
    BV = _config(hidden.dtype, dev)[1]
    S, per = _splits(V, BV)
    stats = torch.empty((4, S, N), dtype=torch.float32, device=dev)
    if N > 0:
        _launch.run(*fwd_launch(hidden, weight, bias, labels, stats, ignore_index, temperature,
                                logit_scale, softcap, vocab_start, with_entropy, per=per))
    out = _merge(stats, labels, ignore_index, temperature, vocab_start, vocab_total, V, per * BV,
                 with_entropy)
    ent = out[3].to(acc) if with_entropy else hidden.new_empty((0,), dtype=acc)
    return out[0].to(acc), out[1].to(acc), out[2].to(acc), ent


class TritonTiles:
    """Gradient tiles for :func:`fastdpo.torch_backend.linear.backward_loop` from one fused kernel."""

    def __init__(self, dtype, device):
        self.tile_bytes = torch.empty((), dtype=chunk_loop.operand_dtype(dtype, device)).element_size()
        self.buf = None

    def reserve(self, elements: int):
        self._cap = elements

    def grad_tile(self, h, w, b, labels, grad_logp, grad_entropy, row_max, log_sum, ent,
                  ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total, opd):
        n, v = h.shape[0], w.shape[0]
        if self.buf is None:
            self.buf = torch.empty(self._cap, dtype=opd, device=h.device)
        dz = self.buf[: n * v].view(n, v)
        has_ge = grad_entropy is not None
        _launch.run(*grad_launch(
            h, w, b, labels, row_max.float(), log_sum.float(), ent.float() if has_ge else None,
            grad_logp.float(), grad_entropy.float() if has_ge else None, dz, ignore_index,
            temperature, logit_scale, softcap, vocab_start, vocab_total))
        return dz


def linear_logps_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum,
                     entropy, ignore_index, temperature, logit_scale, softcap, vocab_start,
                     vocab_total, need_hidden_grad, need_weight_grad, need_bias_grad,
                     batch_invariant=False):
    _launch.check_device("hidden", hidden)
    return chunk_loop.backward_loop(
        TritonTiles(hidden.dtype, hidden.device), grad_logp, grad_entropy, hidden, weight, bias,
        labels, row_max, log_sum, entropy, ignore_index, temperature, logit_scale, softcap,
        vocab_start, vocab_total, need_hidden_grad, need_weight_grad, need_bias_grad,
        batch_invariant=batch_invariant)


# --------------------------------------------------------------- ahead-of-time specifications
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64"}
_META = torch.device("meta")


def _tag(dtype, label_dtype, bias, softcap, entropy, extra=""):
    flags = "".join(f",{n}" for n, on in (("bias", bias), ("softcap", softcap),
                                          ("entropy", entropy)) if on)
    return f"{_SHORT[dtype]}{extra},{_SHORT[label_dtype]}{flags}"


def fwd_spec(N, H, V, dtype, weight_dtype=None, bias=True, softcap=False, with_entropy=False,
             label_dtype=torch.int64) -> _launch.Spec:
    """The forward kernel as launched on a GPU."""
    mk = _launch.meta_tensor
    weight_dtype = weight_dtype or dtype
    BN, BV = _config(dtype, _META, interpreted=False)[:2]
    S, per = _splits(V, BV, interpreted=False)
    k, _, args, meta = fwd_launch(
        mk((N, H), dtype), mk((V, H), weight_dtype), mk((V,), dtype) if bias else None,
        mk((N,), label_dtype), mk((4, S, N), torch.float32), -100, 1.0, 1.0,
        3.0 if softcap else 0.0, 0, with_entropy, per=per, interpreted=False)
    extra = "" if weight_dtype == dtype else f",w={_SHORT[weight_dtype]}"
    tag = _tag(dtype, label_dtype, bias, softcap, with_entropy, extra)
    return _launch.specialize(f"linear_fwd[{tag}](N={N},H={H},V={V})", k, args, meta)


def grad_specs(N, H, V, dtype, bias=True, softcap=False, with_entropy=False,
               label_dtype=torch.int64) -> list:
    """The gradient-tile kernel at every chunk shape the backward loop uses for ``(N, H, V)``,
    with and without ``batch_invariant`` (full chunks and the remainders, whose sizes change the
    specialisation)."""
    mk = _launch.meta_tensor
    size = torch.empty((), dtype=dtype).element_size()
    kw = dict(tile_bytes=size, hidden_acc=dtype != torch.float32)
    p = chunk_loop.plan(N, V, H, size, device="cuda", **kw)
    q = chunk_loop.invariant_plan(V, H, size, **kw)
    rows_ = {(p, min(p.tile_rows, N)), (p, N % p.tile_rows or min(p.tile_rows, N)),
             (q, q.tile_rows)}  # the invariant plan pads every token tile to full
    shapes = sorted({(n, v) for plan_, n in rows_
                     for v in (min(plan_.tile_cols, V), V % plan_.tile_cols or
                               min(plan_.tile_cols, V))})
    out = []
    for n, v in shapes:
        row = mk((n,), torch.float32)
        ge = row if with_entropy else None
        k, _, args, meta = grad_launch(
            mk((n, H), dtype), mk((v, H), dtype), mk((v,), dtype) if bias else None,
            mk((n,), label_dtype), row, row, ge, row, ge, mk((n, v), dtype), -100, 1.0, 1.0,
            3.0 if softcap else 0.0, 0, V, interpreted=False)
        tag = _tag(dtype, label_dtype, bias, softcap, with_entropy)
        out.append(_launch.specialize(f"linear_grad_tile[{tag}](n={n},H={H},v={v})", k, args,
                                      meta))
    return out


