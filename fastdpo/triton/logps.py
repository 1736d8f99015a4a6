"""Triton kernels for the log-prob row contract of :mod:`fastdpo.ops` (logps_fwd / logps_bwd).

One program owns one row (token) of ``(B, T, V)`` logits and streams its vocabulary once in
``BLOCK_V`` tiles.

Forward: a tile is viewed as ``(BLOCK_V / VEC, VEC)`` groups of ``VEC`` contiguous elements (16
bytes: one vector load, held by one thread). Each group keeps a running max ``m``, sum
``s = sum 2**(y - m)`` and, for the entropy, ``u = sum 2**(y - m) * (y - m)``, in base-2 units
``y = x * log2(e) / T``. The max and sums over a group stay inside one thread, so the loop has no
shuffles or barriers, and per element it costs one max, one FMA, one ``exp2`` and one add (two
more for the entropy). Groups are combined once per row. The entropy is accumulated relative to
the running max, so it avoids the cancellation of ``lse - E[z]`` when logits are large. The label
logit is one scalar load. Groups start at ``-FLT_MAX``, not ``-inf``: ``-inf`` logits (masked
tokens, the tail padding) then add exactly nothing, with no ``-inf - -inf``; an all ``-inf`` row
gives ``lse = -inf``. NaN and ``+inf`` logits make the row NaN, like ``log_softmax``.

Backward: ``p`` is recomputed tile by tile from the saved ``lse`` and the gradient written in the
same pass; each tile is loaded before it is stored by the same threads, so ``grad_logits`` may be
the logits themselves.

Every tensor offset is int64 (``row * stride`` exceeds 2**31 for large batches); inside a row the
column index is int32 (``V < 2**31``). Full tiles are unmasked, so they vectorise whenever the row
start is 16-byte aligned; one masked tail follows.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from .. import backends

# ------------------------------------------------------------------------------------- forward


@triton.jit
def _logps_fwd_kernel(
    x_ptr, lab_ptr, logp_ptr, lse_ptr, ent_ptr,
    T, V,
    stride_xb, stride_xt, stride_lb, stride_lt,
    ignore_index, inv_temp, vocab_start, vocab_total,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    label = tl.load(lab_ptr + b * stride_lb + t * stride_lt).to(tl.int64)
    if label == ignore_index:
        # Prompt tokens: nothing to read.
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, 0.0)
    else:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        c = inv_temp * 1.4426950408889634
        G: tl.constexpr = BLOCK_V // VEC
        tile = tl.arange(0, G)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        m = tl.full([G], -3.4028234663852886e38, tl.float32)
        s = tl.zeros([G], tl.float32)
        u = tl.zeros([G], tl.float32)
        # The label's logit: one scalar load, issued before the stream so its latency hides.
        local = label - vocab_start
        valid = (label >= 0) & (label < vocab_total)
        in_shard = valid & (local >= 0) & (local < V)
        x_lab = tl.load(x_row + tl.where(in_shard, local, 0), mask=in_shard, other=0.0)
        n_full = (V // BLOCK_V) * BLOCK_V
        # The tile update is written out twice (full tiles, tail) rather than in a helper: the
        # interpreter pays ~30 ms per nested-function call, i.e. per tile.
        for v0 in range(0, n_full, BLOCK_V):
            x = tl.load(x_row + v0 + tile, eviction_policy="evict_first").to(tl.float32)
            # max(x) * c == max(x * c) for c > 0, so y - m_new below is one FMA.
            m_new = tl.maximum(m, tl.max(x, axis=1) * c)
            alpha = tl.exp2(m - m_new)  # rescales the old sums; 0 against the -FLT_MAX start
            d = x * c - m_new[:, None]
            p = tl.exp2(d)
            if WITH_ENTROPY:
                # Old u moves to the new max: + (m - m_new) * s. A -inf logit has p = 0 and
                # adds 0, not 0 * -inf.
                u = alpha * (u + (m - m_new) * s) + tl.sum(
                    p * tl.maximum(d, -3.4028234663852886e38), axis=1)
            s = s * alpha + tl.sum(p, axis=1)
            m = m_new
        if n_full < V:  # masked tail, the same update; the -inf padding adds nothing
            offs = n_full + tile
            x = tl.load(x_row + offs, mask=offs < V, other=float("-inf"),
                        eviction_policy="evict_first").to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1) * c)
            alpha = tl.exp2(m - m_new)
            d = x * c - m_new[:, None]
            p = tl.exp2(d)
            if WITH_ENTROPY:
                u = alpha * (u + (m - m_new) * s) + tl.sum(
                    p * tl.maximum(d, -3.4028234663852886e38), axis=1)
            s = s * alpha + tl.sum(p, axis=1)
            m = m_new

        # Combine the groups at the row max M (base-2 units). Groups that saw only -inf have
        # s = u = 0 and a finite m - M: they add exactly 0.
        M = tl.max(m, axis=0)
        w = tl.exp2(m - M)
        S = tl.sum(s * w, axis=0)
        log2_s = tl.log2(S)
        lse = (M + log2_s) * 0.6931471805599453

        y_lab = x_lab.to(tl.float32) * c
        logp = tl.where(in_shard, (y_lab - M - log2_s) * 0.6931471805599453, -lse)
        logp = tl.where(valid, logp, float("nan"))
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            U = tl.sum(w * (u + (m - M) * s), axis=0)
            tl.store(ent_ptr + row, (log2_s - U / S) * 0.6931471805599453)


# ------------------------------------------------------------------------------------ backward


@triton.jit
def _logps_bwd_kernel(
    gl_ptr, ge_ptr, x_ptr, lab_ptr, lse_ptr, ent_ptr, g_ptr,
    T, V,
    stride_xb, stride_xt, stride_lb, stride_lt, stride_gb, stride_gt,
    ignore_index, inv_temp, vocab_start, vocab_total,
    HAS_GE: tl.constexpr, BLOCK_V: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    label = tl.load(lab_ptr + b * stride_lb + t * stride_lt).to(tl.int64)
    g_row = g_ptr + b * stride_gb + t * stride_gt
    cols = tl.arange(0, BLOCK_V)
    n_full = (V // BLOCK_V) * BLOCK_V
    if label == ignore_index:
        zero = tl.zeros([BLOCK_V], tl.float32).to(g_ptr.dtype.element_ty)
        for v0 in range(0, n_full, BLOCK_V):
            offs = tl.max_contiguous(tl.multiple_of(v0 + cols, BLOCK_V), BLOCK_V)
            tl.store(g_row + offs, zero)
        if n_full < V:
            offs = n_full + cols
            tl.store(g_row + offs, zero, mask=offs < V)
    else:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        lse = tl.load(lse_ptr + row)
        gs = tl.load(gl_ptr + row).to(tl.float32) * inv_temp  # d/dz -> d/dx: one 1/T
        c = inv_temp * 1.4426950408889634
        lse2 = lse * 1.4426950408889634
        if HAS_GE:
            ges = tl.load(ge_ptr + row).to(tl.float32) * inv_temp
            ent = tl.load(ent_ptr + row)
            # dz = -g p + g [label] - ge p (z - lse + H)  =  -p (a x + k) + g [label];
            # p = 0 entries (-inf logits) get 0 rather than 0 * -inf.
            a = ges * inv_temp
            k = gs + ges * (ent - lse)
        else:
            a = 0.0
            k = gs
        # Off-shard or invalid labels match no column (negative local index).
        local = label - vocab_start
        in_shard = (label >= 0) & (label < vocab_total) & (local >= 0) & (local < V)
        local = tl.where(in_shard, local, -1).to(tl.int32)
        # As in the forward, the tile code is written out twice instead of calling helpers.
        # The label is matched against the loop-invariant ``cols`` and a scalar, not against
        # the absolute offsets: those get widened to 64-bit compares (4 extra ops per element).
        for v0 in range(0, n_full, BLOCK_V):
            offs = tl.max_contiguous(tl.multiple_of(v0 + cols, BLOCK_V), BLOCK_V)
            x = tl.load(x_row + offs, eviction_policy="evict_first").to(tl.float32)
            p = tl.exp2(x * c - lse2)
            if HAS_GE:
                dz = -p * tl.where(p > 0.0, a * x + k, k)
            else:
                dz = -p * k
            dz = tl.where(cols == local - v0, dz + gs, dz)
            if BF16_RTNE:  # interpreter only: it truncates fp32 -> bf16, GPUs round (cvt.rn)
                bits = dz.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)  # add half an ulp, ties to even
                dz = tl.where(dz == dz, bits.to(tl.float32, bitcast=True), dz)
            tl.store(g_row + offs, dz.to(g_ptr.dtype.element_ty))
        if n_full < V:
            offs = n_full + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp2(x * c - lse2)
            if HAS_GE:
                dz = -p * tl.where(p > 0.0, a * x + k, k)
            else:
                dz = -p * k
            dz = tl.where(cols == local - n_full, dz + gs, dz)
            if BF16_RTNE:  # interpreter only: it truncates fp32 -> bf16, GPUs round (cvt.rn)
                bits = dz.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)  # add half an ulp, ties to even
                dz = tl.where(dz == dz, bits.to(tl.float32, bitcast=True), dz)
            tl.store(g_row + offs, dz.to(g_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- configuration


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_config(V: int, dtype: torch.dtype, op: str = "fwd", interpreted: bool | None = None):
    """Meta-parameters of the ``op`` ("fwd"/"bwd") kernel for vocabulary ``V`` and logits ``dtype``.

    Returns ``{"BLOCK_V", "VEC", "num_warps"}``; the launchers (which also pin
    ``enable_fp_fusion=True``: ``x * c - m`` is meant to be one FMA) and ahead-of-time compilation
    (:func:`compile_spec`) use the same values. ``VEC`` is one 16-byte vector (4 fp32 or 8
    bf16/fp16 elements). On GPUs the forward loads four vectors per thread and tile (64 bytes in
    flight), so tiles are 4096 fp32 / 8192 bf16 elements over 8 warps: 4-63 steps per row for
    32k-256k vocabularies. The backward uses 4096-element tiles for every dtype.
    Interpreted (CPU tests) tiles are small so tails and multi-tile rows are exercised quickly.
    """
    if op not in ("fwd", "bwd"):
        raise ValueError(f"op must be 'fwd' or 'bwd', got {op!r}")
    if interpreted is None:
        interpreted = backends.triton_interpreted()
    V = max(int(V), 1)
    vec = 16 // dtype.itemsize
    if interpreted:
        block = min(max(64, _next_pow2(V // 16)), 1024)
        return {"BLOCK_V": block, "VEC": vec, "num_warps": 1}
    # The forward keeps a few running values per 16-byte group: four vectors per thread fit in
    # 48-64 registers. The backward holds the loaded tile and its gradient: 16 elements per
    # thread (48 registers; 32 bf16 elements need 80 and spill).
    per_thread = 4 * vec if op == "fwd" else 16
    block = min(32 * 8 * per_thread, max(32 * vec, _next_pow2(V)))
    num_warps = max(1, min(8, block // (32 * per_thread)))
    return {"BLOCK_V": block, "VEC": vec, "num_warps": num_warps}


_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.int32: "i32", torch.int64: "i64"}


def compile_spec(op: str, V: int, dtype: torch.dtype, label_dtype: torch.dtype = torch.int64,
                 with_entropy: bool = False, aligned: bool = True):
    """What :func:`triton.compile` needs to build a kernel ahead of time (no GPU needed).

    Returns ``(kernel, signature, constexprs, attrs, options)`` for ``op`` ("fwd"/"bwd") with the
    same meta-parameters the launchers use. ``aligned`` assumes what the JIT specialises on for
    the usual case (16-byte aligned pointers, strides and ``V`` multiples of 16); integer
    arguments are typed i32 as the JIT types small ints. Usage::

        kernel, sig, const, attrs, opts = compile_spec("fwd", 128256, torch.bfloat16)
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)  # arch, warp size

    Strides of 2**31 or more make the JIT type them i64 instead: a different (also correct)
    variant, not covered by this spec.
    """
    if not isinstance(_logps_fwd_kernel, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs a process without TRITON_INTERPRET=1 "
                           "(the kernels were built for the interpreter)")
    cfg = launch_config(V, dtype, op, interpreted=False)
    xt, lt = "*" + _TL_DTYPE[dtype], "*" + _TL_DTYPE[label_dtype]
    if op == "fwd":
        kernel = _logps_fwd_kernel
        sig = {"x_ptr": xt, "lab_ptr": lt, "logp_ptr": "*fp32", "lse_ptr": "*fp32",
               "ent_ptr": "*fp32", "T": "i32", "V": "i32", "stride_xb": "i32", "stride_xt": "i32",
               "stride_lb": "i32", "stride_lt": "i32", "ignore_index": "i32", "inv_temp": "fp32",
               "vocab_start": "i32", "vocab_total": "i32",
               "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr", "VEC": "constexpr"}
        const = {"WITH_ENTROPY": bool(with_entropy), "BLOCK_V": cfg["BLOCK_V"],
                 "VEC": cfg["VEC"]}
        aligned_args = ("x_ptr", "logp_ptr", "lse_ptr", "ent_ptr", "V", "stride_xb", "stride_xt")
    elif op == "bwd":
        kernel = _logps_bwd_kernel
        sig = {"gl_ptr": "*fp32", "ge_ptr": "*fp32", "x_ptr": xt, "lab_ptr": lt,
               "lse_ptr": "*fp32", "ent_ptr": "*fp32", "g_ptr": xt, "T": "i32", "V": "i32",
               "stride_xb": "i32", "stride_xt": "i32", "stride_lb": "i32", "stride_lt": "i32",
               "stride_gb": "i32", "stride_gt": "i32", "ignore_index": "i32",
               "inv_temp": "fp32", "vocab_start": "i32", "vocab_total": "i32",
               "HAS_GE": "constexpr", "BLOCK_V": "constexpr", "BF16_RTNE": "constexpr"}
        const = {"HAS_GE": bool(with_entropy), "BLOCK_V": cfg["BLOCK_V"], "BF16_RTNE": False}
        aligned_args = ("gl_ptr", "ge_ptr", "x_ptr", "lse_ptr", "ent_ptr", "g_ptr", "V",
                        "stride_xb", "stride_xt", "stride_gb", "stride_gt")
    else:
        raise ValueError(f"op must be 'fwd' or 'bwd', got {op!r}")
    names = list(sig)
    attrs = {}
    if aligned:
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned_args}
    return kernel, sig, const, attrs, {"num_warps": cfg["num_warps"], "enable_fp_fusion": True}


# ----------------------------------------------------------------------------------- launchers


def _ieee_quiet():
    """Under the interpreter the kernels run on numpy, which warns about the inf/NaN arithmetic
    they rely on (as IEEE hardware does silently); keep that quiet. No-op when compiled."""
    if backends.triton_interpreted():
        return np.errstate(over="ignore", invalid="ignore", divide="ignore")
    return contextlib.nullcontext()


def _check_block(block_v: int, vec: int) -> int:
    if block_v < vec or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= {vec}, got {block_v}")
    return block_v


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not backends.triton_interpreted():
        raise RuntimeError("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")


def _check_logits(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B, T, V), got shape {tuple(t.shape)}")
    if t.stride(2) != 1 and t.shape[2] > 1:
        raise ValueError(f"{name} must have unit stride along the vocabulary, got {t.stride()}")


def logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total, with_entropy,
              *, block_v: int | None = None, num_warps: int | None = None):
    """``triton_logps_fwd``; ``block_v``/``num_warps`` override :func:`launch_config` (tests)."""
    _check_device(logits)
    _check_logits("logits", logits)
    B, T, V = logits.shape
    logp = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else logp.new_empty((0,))
    n = B * T
    if n == 0:
        return logp, lse, ent
    cfg = launch_config(V, logits.dtype, "fwd")
    block_v = _check_block(block_v or cfg["BLOCK_V"], cfg["VEC"])
    with _ieee_quiet():
        _logps_fwd_kernel[(n,)](
            logits, labels, logp, lse, ent if with_entropy else logp,
            T, V, logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            int(ignore_index), 1.0 / float(temperature), int(vocab_start), int(vocab_total),
            WITH_ENTROPY=bool(with_entropy), BLOCK_V=block_v, VEC=cfg["VEC"],
            num_warps=num_warps or cfg["num_warps"], enable_fp_fusion=True,
        )
    return logp, lse, ent


def logps_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature,
              vocab_start, vocab_total, grad_logits, *, block_v: int | None = None,
              num_warps: int | None = None):
    """``triton_logps_bwd``: writes into ``grad_logits`` (which may be ``logits``)."""
    _check_device(logits)
    _check_logits("logits", logits)
    _check_logits("grad_logits", grad_logits)
    B, T, V = logits.shape
    if tuple(grad_logits.shape) != (B, T, V):
        raise ValueError(f"grad_logits has shape {tuple(grad_logits.shape)}, expected {(B, T, V)}")
    n = B * T
    if n == 0:
        return
    # Per-row values are O(tokens): make them flat-indexable (a no-op in the autograd path).
    grad_logp = grad_logp.contiguous()
    lse = lse.contiguous()
    has_ge = grad_entropy is not None
    if has_ge:
        if entropy is None:
            raise ValueError("grad_entropy needs the forward's entropy")
        grad_entropy, entropy = grad_entropy.contiguous(), entropy.contiguous()
    cfg = launch_config(V, logits.dtype, "bwd")
    block_v = _check_block(block_v or cfg["BLOCK_V"], cfg["VEC"])
    with _ieee_quiet():
        _logps_bwd_kernel[(n,)](
            grad_logp, grad_entropy if has_ge else grad_logp, logits, labels, lse,
            entropy if has_ge else lse, grad_logits,
            T, V, logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            grad_logits.stride(0), grad_logits.stride(1),
            int(ignore_index), 1.0 / float(temperature), int(vocab_start), int(vocab_total),
            HAS_GE=has_ge, BLOCK_V=block_v,
            BF16_RTNE=grad_logits.dtype == torch.bfloat16 and backends.triton_interpreted(),
            num_warps=num_warps or cfg["num_warps"], enable_fp_fusion=True,
        )
