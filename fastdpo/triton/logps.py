"""Triton kernels for the log-prob row contract of :mod:`fastdpo.ops` (logps_fwd / logps_bwd).

One program owns one row (token) of ``(B, T, V)`` logits and streams its vocabulary once in
``BLOCK_V`` tiles.

Forward: a tile is viewed as ``(BLOCK_V / VEC, VEC)`` groups of ``VEC`` contiguous elements (16
bytes: one vector load, held by one thread). Each group keeps its own running statistics
(:func:`._tiles.fold`: max of the raw logits, base-2 sums relative to it), so the loop has no
shuffles or barriers; the groups are combined once per row. The entropy is accumulated relative
to the running max, which avoids the cancellation of ``lse - E[z]``. The label logit is one scalar
load. NaN and ``+inf`` logits make the row NaN, like ``log_softmax``; an all ``-inf`` row gives
``row_max = log_sum = -inf``.

Backward: ``p`` is recomputed tile by tile from the saved ``(row_max, log_sum)`` and the gradient
written in the same pass; each tile is loaded before it is stored by the same threads, so
``grad_logits`` may be the logits themselves.

Every tensor offset is int64 (``row * stride`` exceeds 2**31 for large batches); inside a row the
column index is int32 (``V < 2**31``). Full tiles are unmasked, so they vectorise whenever the row
start is 16-byte aligned; one masked tail follows. The tile math is one helper called by both
(inlined when compiled). Under the interpreter each call costs ~3 ms, +15% (forward) to +45%
(backward) on rows of many tiles; the tests' rows have a few tiles, so the math is written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from . import _interpreter, _launch
from ._tiles import LN2, LOG2E, NEG_BIG, fold, grad_coeffs, shifted, softmax_grad

_interpreter.install()

# ------------------------------------------------------------------------------------- forward


@triton.jit
def _logps_fwd_kernel(
    x_ptr, lab_ptr, logp_ptr, max_ptr, sum_ptr, ent_ptr,
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
        tl.store(max_ptr + row, 0.0)
        tl.store(sum_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(ent_ptr + row, 0.0)
    else:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        c2 = inv_temp * LOG2E
        G: tl.constexpr = BLOCK_V // VEC
        tile = tl.arange(0, G)[:, None] * VEC + tl.arange(0, VEC)[None, :]
        m = tl.full([G], NEG_BIG, tl.float32)
        s = tl.zeros([G], tl.float32)
        u = tl.zeros([G], tl.float32)
        # The label's logit: one scalar load, issued before the stream so its latency hides.
        local = label - vocab_start
        valid = (label >= 0) & (label < vocab_total)
        in_shard = valid & (local >= 0) & (local < V)
        x_lab = tl.load(x_row + tl.where(in_shard, local, 0), mask=in_shard, other=0.0)
        n_full = (V // BLOCK_V) * BLOCK_V
        for v0 in range(0, n_full, BLOCK_V):
            x = tl.load(x_row + v0 + tile, eviction_policy="evict_first").to(tl.float32)
            m, s, u = fold(x, m, s, u, c2, WITH_ENTROPY)
        if n_full < V:  # masked tail; the -inf padding adds nothing
            offs = n_full + tile
            x = tl.load(x_row + offs, mask=offs < V, other=float("-inf"),
                        eviction_policy="evict_first").to(tl.float32)
            m, s, u = fold(x, m, s, u, c2, WITH_ENTROPY)

        # Combine the groups at the row max M. Groups that saw only -inf have s = u = 0 and a
        # weight of 0 (or 1 when every group did): they add exactly 0.
        M = tl.max(m, axis=0)
        delta = tl.maximum(shifted(m, M * 0.5, c2), NEG_BIG)
        w = tl.exp2(delta)
        S = tl.sum(s * w, axis=0)
        log2_s = tl.log2(S)
        log_sum = log2_s * LN2
        # S >= 1 unless the row has no finite logit (S = 0) or a NaN / +inf one (S = NaN).
        row_max = tl.where(S == 0.0, float("-inf"), M)
        row_max = tl.where((S == S) | (M == float("inf")), row_max, float("nan"))
        lse = tl.where(S == 0.0, float("-inf"), M * inv_temp + log_sum)
        logp = tl.where(in_shard, shifted(x_lab.to(tl.float32), M * 0.5, inv_temp) - log_sum,
                        -lse)
        logp = tl.where(valid, logp, float("nan"))
        tl.store(logp_ptr + row, logp)
        tl.store(max_ptr + row, row_max)
        tl.store(sum_ptr + row, log_sum)
        if WITH_ENTROPY:
            U = tl.sum(w * u + (w * delta) * s, axis=0)
            tl.store(ent_ptr + row, (log2_s - U / S) * LN2)


# ------------------------------------------------------------------------------------ backward


@triton.jit
def _logps_bwd_kernel(
    gl_ptr, ge_ptr, x_ptr, lab_ptr, max_ptr, sum_ptr, ent_ptr, g_ptr,
    T, V,
    stride_xb, stride_xt, stride_lb, stride_lt, stride_gb, stride_gt,
    ignore_index, inv_temp, vocab_start, vocab_total,
    HAS_GE: tl.constexpr, BLOCK_V: tl.constexpr,
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
        rm = tl.load(max_ptr + row)
        half_ref = tl.where(rm == float("-inf"), 0.0, rm * 0.5)  # keeps -inf - ref at -inf
        log_sum = tl.load(sum_ptr + row)
        c2 = inv_temp * LOG2E
        ls2 = log_sum * LOG2E
        g = tl.load(gl_ptr + row).to(tl.float32)
        if HAS_GE:
            ge = tl.load(ge_ptr + row).to(tl.float32)
            ent = tl.load(ent_ptr + row)
        else:
            ge = g
            ent = log_sum
        gs, a, k = grad_coeffs(g, ge, ent, log_sum, inv_temp, HAS_GE)
        # Off-shard or invalid labels match no column (negative local index). The label is
        # matched against the loop-invariant ``cols`` and a scalar, not against the absolute
        # offsets: those get widened to 64-bit compares (4 extra ops per element).
        local = label - vocab_start
        in_shard = (label >= 0) & (label < vocab_total) & (local >= 0) & (local < V)
        local = tl.where(in_shard, local, -1).to(tl.int32)
        for v0 in range(0, n_full, BLOCK_V):
            offs = tl.max_contiguous(tl.multiple_of(v0 + cols, BLOCK_V), BLOCK_V)
            x = tl.load(x_row + offs, eviction_policy="evict_first").to(tl.float32)
            dz = softmax_grad(x, half_ref, c2, ls2, a, k, HAS_GE)
            dz = tl.where(cols == local - v0, dz + gs, dz)
            tl.store(g_row + offs, dz.to(g_ptr.dtype.element_ty))
        if n_full < V:
            offs = n_full + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            dz = softmax_grad(x, half_ref, c2, ls2, a, k, HAS_GE)
            dz = tl.where(cols == local - n_full, dz + gs, dz)
            tl.store(g_row + offs, dz.to(g_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- configuration


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_config(V: int, dtype: torch.dtype, op: str = "fwd", interpreted: bool | None = None):
    """Meta-parameters of the ``op`` ("fwd"/"bwd") kernel for vocabulary ``V`` and logits ``dtype``.

    Returns ``{"BLOCK_V", "VEC", "num_warps"}``; the launchers and ahead-of-time compilation
    (:mod:`.aot`) use the same values. ``VEC`` is one 16-byte vector (4 fp32 or 8 bf16/fp16
    elements). On GPUs the forward loads four vectors per thread and tile (64 bytes in flight),
    so tiles are 4096 fp32 / 8192 bf16 elements over 8 warps: 4-63 steps per row for 32k-256k
    vocabularies. The backward uses 4096-element tiles for every dtype.
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


def _check_block(block_v: int, vec: int) -> int:
    if block_v < vec or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= {vec}, got {block_v}")
    return block_v


def _check_logits(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B, T, V), got shape {tuple(t.shape)}")
    if t.stride(2) != 1 and t.shape[2] > 1:
        raise ValueError(f"{name} must have unit stride along the vocabulary, got {t.stride()}")


# ----------------------------------------------------------------------------------- launchers
# Each ``*_launch`` returns ``(kernel, grid, args, meta)`` for given tensors: the launchers run it,
# :mod:`.aot` builds the same call from meta tensors to compile every variant ahead of time.


def fwd_launch(logits, labels, outs, ignore_index, temperature, vocab_start, vocab_total,
               with_entropy, *, block_v=None, num_warps=None, interpreted=None):
    B, T, V = logits.shape
    logp, row_max, log_sum, ent = outs
    cfg = launch_config(V, logits.dtype, "fwd", interpreted)
    args = (logits, labels, logp, row_max, log_sum, ent if with_entropy else logp,
            T, V, logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            int(ignore_index), 1.0 / float(temperature), int(vocab_start), int(vocab_total))
    meta = dict(WITH_ENTROPY=bool(with_entropy),
                BLOCK_V=_check_block(block_v or cfg["BLOCK_V"], cfg["VEC"]), VEC=cfg["VEC"],
                num_warps=num_warps or cfg["num_warps"])
    return _logps_fwd_kernel, (B * T,), args, meta


def bwd_launch(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, ignore_index,
               temperature, vocab_start, vocab_total, grad_logits, *, block_v=None,
               num_warps=None, interpreted=None):
    B, T, V = logits.shape
    cfg = launch_config(V, logits.dtype, "bwd", interpreted)
    has_ge = grad_entropy is not None
    args = (grad_logp, grad_entropy if has_ge else grad_logp, logits, labels, row_max, log_sum,
            entropy if has_ge else log_sum, grad_logits,
            T, V, logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            grad_logits.stride(0), grad_logits.stride(1),
            int(ignore_index), 1.0 / float(temperature), int(vocab_start), int(vocab_total))
    meta = dict(HAS_GE=has_ge, BLOCK_V=_check_block(block_v or cfg["BLOCK_V"], cfg["VEC"]),
                num_warps=num_warps or cfg["num_warps"])
    return _logps_bwd_kernel, (B * T,), args, meta


def logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total, with_entropy,
              *, block_v: int | None = None, num_warps: int | None = None):
    """``triton_logps_fwd``; ``block_v``/``num_warps`` override :func:`launch_config` (tests)."""
    _launch.check_device("logits", logits)
    _check_logits("logits", logits)
    B, T, V = logits.shape
    logp = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    outs = (logp, torch.empty_like(logp), torch.empty_like(logp),
            torch.empty_like(logp) if with_entropy else logp.new_empty((0,)))
    if B * T > 0:
        _launch.run(*fwd_launch(logits, labels, outs, ignore_index, temperature, vocab_start,
                                vocab_total, with_entropy, block_v=block_v, num_warps=num_warps))
    return outs


def logps_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, ignore_index,
              temperature, vocab_start, vocab_total, grad_logits, *, block_v: int | None = None,
              num_warps: int | None = None):
    """``triton_logps_bwd``: writes into ``grad_logits`` (which may be ``logits``)."""
    _launch.check_device("logits", logits)
    _check_logits("logits", logits)
    _check_logits("grad_logits", grad_logits)
    B, T, V = logits.shape
    if tuple(grad_logits.shape) != (B, T, V):
        raise ValueError(f"grad_logits has shape {tuple(grad_logits.shape)}, expected {(B, T, V)}")
    if B * T == 0:
        return
    # Per-row values are O(tokens): make them flat-indexable (a no-op in the autograd path).
    grad_logp, row_max, log_sum = (t.contiguous() for t in (grad_logp, row_max, log_sum))
    if grad_entropy is not None:
        if entropy is None:
            raise ValueError("grad_entropy needs the forward's entropy")
        grad_entropy, entropy = grad_entropy.contiguous(), entropy.contiguous()
    _launch.run(*bwd_launch(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                            ignore_index, temperature, vocab_start, vocab_total, grad_logits,
                            block_v=block_v, num_warps=num_warps))


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64"}


def logits_spec(op: str, B: int, T: int, V: int, dtype: torch.dtype,
                label_dtype: torch.dtype = torch.int64, with_entropy: bool = False,
                aligned: bool = True) -> _launch.Spec:
    """The ``op`` ("fwd"/"bwd") kernel as the launcher would specialise it on a GPU for
    ``(B, T, V)`` logits (see :mod:`.aot` for every variant at once)."""
    mk = _launch.meta_tensor
    x, lab, row = mk((B, T, V), dtype, aligned), mk((B, T), label_dtype), mk((B, T), torch.float32)
    tag = f"{_SHORT[dtype]},{_SHORT[label_dtype]}" + (",entropy" if with_entropy else "")
    tag += "" if aligned else ",unaligned"
    if op == "fwd":
        outs = (row, row, row, row if with_entropy else mk((0,), torch.float32))
        k, _, args, meta = fwd_launch(x, lab, outs, -100, 1.0, 0, V, with_entropy,
                                      interpreted=False)
    elif op == "bwd":
        ge = row if with_entropy else None
        k, _, args, meta = bwd_launch(row, ge, x, lab, row, row, ge, -100, 1.0, 0, V, x,
                                      interpreted=False)
    else:
        raise ValueError(f"op must be 'fwd' or 'bwd', got {op!r}")
    return _launch.specialize(f"logps_{op}[{tag}](B={B},T={T},V={V})", k, args, meta)


def compile_spec(op: str, V: int, dtype: torch.dtype, label_dtype: torch.dtype = torch.int64,
                 with_entropy: bool = False, aligned: bool = True, B: int = 4, T: int = 2048):
    """:func:`logits_spec` as the tuple ``(kernel, signature, constexprs, attrs, options)``."""
    spec = logits_spec(op, B, T, V, dtype, label_dtype, with_entropy, aligned)
    return spec.kernel, spec.signature, spec.constexprs, spec.attrs, spec.options
