"""Chunked PyTorch implementation of the log-prob row contract (see :mod:`fastdpo.ops`).

Rows are processed in blocks small enough that the fp32 temporaries stay near
``CHUNK_ELEMENTS`` elements, so memory does not grow with ``N * V`` beyond the logits themselves.
"""

from __future__ import annotations

import torch

from .. import ops

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 temporaries per block


def row_blocks(B: int, T: int, V: int):
    """Yield ``(b, t0, t1)`` blocks of rows holding about ``CHUNK_ELEMENTS`` logits each."""
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, step):
            yield b, t0, min(T, t0 + step)


def label_parts(labels, ignore_index: int, vocab_start: int, vocab_total: int, V: int):
    """Masks and a safe gather index for a block of labels."""
    labels = labels.long()
    active = labels != ignore_index
    valid = (labels >= 0) & (labels < vocab_total)
    local_idx = labels - vocab_start
    local = active & valid & (local_idx >= 0) & (local_idx < V)
    return active, valid, local, torch.where(local, local_idx, 0)


def row_lse(z):
    """log-sum-exp with the kernels' conventions: a +inf or NaN anywhere in a row gives NaN
    (``torch.logsumexp`` returns +inf for a +inf entry, which would give a finite-looking -inf);
    an all -inf row (a fully masked vocabulary shard) gives -inf, so shards combine exactly."""
    m = z.amax(dim=-1, keepdim=True)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    return (m_safe + torch.log(torch.exp(z - m_safe).sum(dim=-1, keepdim=True))).squeeze(-1)


def logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total, with_entropy):
    B, T, V = logits.shape
    acc = ops.acc_dtype(logits.dtype)
    logp = logits.new_zeros((B, T), dtype=acc)
    lse_out = torch.zeros_like(logp)
    ent_out = torch.zeros_like(logp) if with_entropy else logits.new_empty((0,), dtype=acc)
    for b, t0, t1 in row_blocks(B, T, V):
        z = logits[b, t0:t1].to(acc)
        if temperature != 1.0:
            z = z / temperature
        active, valid, local, idx = label_parts(labels[b, t0:t1], ignore_index, vocab_start,
                                                vocab_total, V)
        lse = row_lse(z)
        zl = torch.where(local, z.gather(-1, idx[:, None]).squeeze(-1), 0.0)
        lp = torch.where(valid, zl - lse, float("nan"))
        logp[b, t0:t1] = torch.where(active, lp, 0.0)
        lse_out[b, t0:t1] = torch.where(active, lse, 0.0)
        if with_entropy:
            p = torch.exp(z - lse[:, None])
            ent = lse - torch.where(p > 0, p * z, 0.0).sum(-1)  # masked (-inf) entries add 0
            ent = torch.where(lse == float("-inf"), float("nan"), ent)  # no distribution at all
            ent_out[b, t0:t1] = torch.where(active, ent, 0.0)
    return logp, lse_out, ent_out


def logps_bwd(grad_logp, grad_entropy, logits, labels, lse, entropy, ignore_index, temperature,
              vocab_start, vocab_total, grad_logits):
    B, T, V = logits.shape
    acc = ops.acc_dtype(logits.dtype)
    for b, t0, t1 in row_blocks(B, T, V):
        z = logits[b, t0:t1].to(acc)  # read before grad_logits (maybe the same storage) is written
        if temperature != 1.0:
            z = z / temperature
        active, _, local, idx = label_parts(labels[b, t0:t1], ignore_index, vocab_start,
                                            vocab_total, V)
        rows_lse = lse[b, t0:t1, None]
        p = torch.exp(z - rows_lse)
        g = torch.where(active, grad_logp[b, t0:t1].to(acc), 0.0)[:, None]
        dz = -g * p
        dz.scatter_add_(-1, idx[:, None], torch.where(local[:, None], g, 0.0))
        if grad_entropy is not None:
            ge = torch.where(active, grad_entropy[b, t0:t1].to(acc), 0.0)[:, None]
            dz -= torch.where(p > 0, ge * p * (z - rows_lse + entropy[b, t0:t1, None]), 0.0)
        if temperature != 1.0:
            dz /= temperature
        dz = torch.where(active[:, None], dz, 0.0)
        grad_logits[b, t0:t1].copy_(dz)


ops.register_impl("torch", "logps_fwd", logps_fwd)
ops.register_impl("torch", "logps_bwd", logps_bwd)
