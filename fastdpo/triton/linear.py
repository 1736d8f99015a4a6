"""Triton kernels of the fused LM head (``linear_logps_fwd`` / ``linear_logps_bwd``).

Forward: one program owns ``BLOCK_N`` tokens and a contiguous range of ``BLOCK_V``-wide vocabulary
tiles (the vocabulary is split over a second grid axis so that short batches still fill the GPU).
Each tile of logits is a ``tl.dot`` over the hidden dimension in ``BLOCK_K`` steps with fp32
accumulation, goes through bias / scale / soft-cap / temperature in registers, and is folded into
per-token online log-sum-exp statistics relative to the running max ``m``: ``s = sum e^(z-m)`` and,
for the entropy, ``u = sum e^(z-m) (z-m)`` (so ``entropy = log s - u / s`` has no cancellation).
The label logit is picked inside the tile. The per-split statistics, O(tokens) each, are merged by
a few torch ops. Programs whose tokens are all ignored (prompts, the shifted-out last position)
read nothing.

Backward: :func:`fastdpo.chunked.linear.backward_loop` walks token x vocabulary chunks; for each,
one kernel rebuilds the logits tile by tile and writes ``d(h @ w.T + b)`` (softmax gradient,
entropy term, temperature and soft-cap chain rule) into a bounded chunk buffer, which two matmuls
(cuBLAS on GPU) turn into ``d_hidden`` and ``d_weight`` with fp32 accumulation. No atomics
anywhere, so gradients are bitwise repeatable; no ``(N, V)`` buffer.

Under ``TRITON_INTERPRET=1``, ``tl.dot`` on bf16 operands multiplies raw bit patterns (Triton
issue 11584), so the launcher sets ``UPCAST`` and bf16 tiles are converted to fp32 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends, ops
from ..chunked import linear as chunked

NEG_BIG: tl.constexpr = tl.constexpr(-3.4028234663852886e38)  # running-max start: -inf adds 0


@triton.jit
def _tanh(y):
    # tanh from exp of a non-positive argument: no overflow, odd by construction.
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                 stride_hn, stride_hk, stride_wv, stride_wk,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``h[rows] @ w[cols].T (+ b[cols])`` as an fp32 ``(BLOCK_N, BLOCK_V)`` tile."""
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
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        else:
            bt = bt.to(a.dtype)  # weight in another dtype than the hidden states
        acc = tl.dot(a, bt, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_fwd_kernel(
    h_ptr, w_ptr, b_ptr, lab_ptr, m_ptr, s_ptr, u_ptr, zl_ptr,
    N, V, H, tiles_per_split,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_l,
    ignore_index, vocab_start, scale, cap, inv_temp,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
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
        tl.store(zl_ptr + out, zero, mask=row_ok)
    else:
        local = lab - vocab_start
        m = tl.full((BLOCK_N,), NEG_BIG, dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zl = tl.zeros((BLOCK_N,), dtype=tl.float32)
        t0 = pid_s * tiles_per_split
        for t in range(t0, t0 + tiles_per_split):
            cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                             stride_hn, stride_hk, stride_wv, stride_wk,
                             HAS_BIAS, UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
            if SOFTCAP:
                x = cap * _tanh(x * (scale / cap))
            else:
                x = x * scale
            z = tl.where(col_ok[None, :], x * inv_temp, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            d = z - m_new[:, None]
            p = tl.exp(d)
            if WITH_ENTROPY:
                u = alpha * (u + (m - m_new) * s) + tl.sum(p * tl.where(p > 0, d, 0.0), axis=1)
            s = s * alpha + tl.sum(p, axis=1)
            zl += tl.sum(tl.where(cols[None, :] == local[:, None], z, 0.0), axis=1)
            m = m_new
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(u_ptr + out, u, mask=row_ok)
        tl.store(zl_ptr + out, zl, mask=row_ok)


@triton.jit
def _linear_grad_tile_kernel(
    h_ptr, w_ptr, b_ptr, lab_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dz_ptr,
    N, V, H,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_l, stride_dz,
    ignore_index, vocab_start, scale, cap, inv_temp,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GE: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
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
        x = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                         stride_hn, stride_hk, stride_wv, stride_wk,
                         HAS_BIAS, UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_K)
        if SOFTCAP:
            th = _tanh(x * (scale / cap))
            x = cap * th
            dfac = (1.0 - th * th) * (scale * inv_temp)
        else:
            x = x * scale
            dfac = scale * inv_temp
        z = x * inv_temp
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(z - lse[:, None])
        g = tl.where(active, tl.load(gl_ptr + rows, mask=row_ok, other=0.0), 0.0)
        local = lab - vocab_start
        dz = tl.where(cols[None, :] == local[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_GE:
            ge = tl.where(active, tl.load(ge_ptr + rows, mask=row_ok, other=0.0), 0.0)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            dz -= ge[:, None] * p * tl.where(p > 0, z - lse[:, None] + ent[:, None], 0.0)
        dz = tl.where(active[:, None] & col_ok[None, :], dz * dfac, 0.0)
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------------- launchers


def _config(dtype, device):
    """``(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages)``."""
    if backends.triton_interpreted() or device.type != "cuda":
        return 16, 32, 16, 4, 1  # small tiles keep the interpreter fast
    if dtype == torch.float32:
        return 64, 128, 32, 8, 3
    return 128, 128, 64, 8, 3


def _flags(hidden, weight):
    interp = backends.triton_interpreted() or hidden.device.type != "cuda"
    upcast = interp and torch.bfloat16 in (hidden.dtype, weight.dtype)
    # fp32 inputs: full-precision products (tf32 would be the default on tensor cores)
    prec = "ieee" if hidden.dtype == torch.float32 else "tf32"
    return upcast, prec


def _splits(n_row_tiles: int, n_vtiles: int, device) -> int:
    if device.type == "cuda" and not backends.triton_interpreted():
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2  # exercises the merge of splits in tests
    want = max(1, min(n_vtiles, triton.cdiv(target, max(n_row_tiles, 1))))
    per = triton.cdiv(n_vtiles, want)
    return triton.cdiv(n_vtiles, per), per


def linear_logps_fwd(hidden, weight, bias, labels, ignore_index, temperature, logit_scale, softcap,
                     vocab_start, vocab_total, with_entropy):
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = ops.acc_dtype(hidden.dtype)
    BN, BV, BK, warps, stages = _config(hidden.dtype, dev)
    n_row_tiles, n_vtiles = triton.cdiv(N, BN), triton.cdiv(V, BV)
    S, per = _splits(n_row_tiles, n_vtiles, dev)
    stats = torch.empty((4, S, N), dtype=torch.float32, device=dev)
    upcast, prec = _flags(hidden, weight)
    if N > 0:
        _linear_fwd_kernel[(n_row_tiles, S)](
            hidden, weight, bias if bias is not None else hidden, labels,
            stats[0], stats[1], stats[2], stats[3],
            N, V, H, per,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            labels.stride(0),
            ignore_index, vocab_start, float(logit_scale), float(softcap or 1.0),
            1.0 / float(temperature),
            HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), WITH_ENTROPY=with_entropy,
            UPCAST=upcast, PREC=prec, BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK,
            num_warps=warps, num_stages=stages)
    m, s, u, zl = stats.unbind(0)
    mx = m.max(0).values
    a = torch.exp(m - mx)
    tot = (s * a).sum(0)
    lse = mx + torch.log(tot)
    lab = labels.long()
    active = lab != ignore_index
    valid = (lab >= 0) & (lab < vocab_total)
    logp = torch.where(active, torch.where(valid, zl.sum(0) - lse, float("nan")), 0.0)
    lse = torch.where(active, lse, 0.0)
    if with_entropy:
        U = (a * (u + (m - mx) * s)).sum(0)
        ent = torch.where(active, torch.log(tot) - U / tot, 0.0).to(acc)
    else:
        ent = hidden.new_empty((0,), dtype=acc)
    return logp.to(acc), lse.to(acc), ent


class TritonTiles:
    """Gradient tiles for :func:`fastdpo.chunked.linear.backward_loop` from one fused kernel."""

    def __init__(self, dtype, device):
        self.cfg = _config(dtype, device)
        self.tile_bytes = torch.empty((), dtype=chunked.operand_dtype(dtype, device)).element_size()
        self.buf = None

    def reserve(self, elements: int):
        self._cap = elements

    def grad_tile(self, h, w, b, labels, grad_logp, grad_entropy, lse, ent, ignore_index,
                  temperature, logit_scale, softcap, vocab_start, vocab_total, opd):
        n, v = h.shape[0], w.shape[0]
        if self.buf is None:
            self.buf = torch.empty(self._cap, dtype=opd, device=h.device)
        dz = self.buf[: n * v].view(n, v)
        BN, BV, BK, warps, stages = self.cfg
        upcast, prec = _flags(h, w)
        has_ge = grad_entropy is not None
        lse = lse.float()
        _linear_grad_tile_kernel[(triton.cdiv(n, BN), triton.cdiv(v, BV))](
            h, w, b if b is not None else h, labels, lse,
            ent.float() if has_ge else lse, grad_logp.float(),
            grad_entropy.float() if has_ge else lse, dz,
            n, v, h.shape[1],
            h.stride(0), h.stride(1), w.stride(0), w.stride(1), labels.stride(0), dz.stride(0),
            ignore_index, vocab_start, float(logit_scale), float(softcap or 1.0),
            1.0 / float(temperature),
            HAS_BIAS=b is not None, SOFTCAP=bool(softcap), HAS_GE=has_ge,
            UPCAST=upcast, PREC=prec, BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK,
            num_warps=warps, num_stages=stages)
        return dz


def linear_logps_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                     ignore_index, temperature, logit_scale, softcap, vocab_start, vocab_total,
                     need_hidden_grad, need_weight_grad, need_bias_grad, deterministic):
    # No atomics: deterministic whatever ``deterministic`` says.
    return chunked.backward_loop(
        TritonTiles(hidden.dtype, hidden.device), grad_logp, grad_entropy, hidden, weight, bias,
        labels, lse, entropy, ignore_index, temperature, logit_scale, softcap, vocab_start,
        vocab_total, need_hidden_grad, need_weight_grad, need_bias_grad)


ops.register_impl("triton", "linear_logps_fwd", linear_logps_fwd)
ops.register_impl("triton", "linear_logps_bwd", linear_logps_bwd)
