"""Chunked PyTorch implementation of the log-prob row contract (see :mod:`fastdpo.ops`).

Rows are processed in blocks small enough that the fp32 temporaries stay near
``CHUNK_ELEMENTS`` elements, so memory does not grow with ``N * V`` beyond the logits themselves.
"""

from __future__ import annotations

import torch

from .. import ops, rows

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 temporaries per block


def row_blocks(B: int, T: int, V: int):
    """Yield ``(b, t0, t1)`` blocks of rows holding about ``CHUNK_ELEMENTS`` logits each."""
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, step):
            yield b, t0, min(T, t0 + step)


def logps_fwd(logits, labels, ignore_index, temperature, vocab_start, vocab_total, with_entropy):
    B, T, V = logits.shape
    acc = ops.acc_dtype(logits.dtype)
    logp = logits.new_zeros((B, T), dtype=acc)
    m_out, s_out = torch.zeros_like(logp), torch.zeros_like(logp)
    ent_out = torch.zeros_like(logp) if with_entropy else logits.new_empty((0,), dtype=acc)
    for b, t0, t1 in row_blocks(B, T, V):
        x = logits[b, t0:t1].to(acc)
        lab = rows.classify_labels(labels[b, t0:t1], ignore_index, vocab_start, vocab_total, V)
        m, log_s, d, ent = rows.row_stats(x, temperature, with_entropy)
        dl = d.gather(-1, lab.index[:, None]).squeeze(-1)
        lp = torch.where(lab.local, dl - log_s, -rows.lse(m, log_s, temperature))
        lp = torch.where(lab.valid, lp, float("nan"))
        a = lab.active
        logp[b, t0:t1] = torch.where(a, lp, 0.0)
        m_out[b, t0:t1] = torch.where(a, m, 0.0)
        s_out[b, t0:t1] = torch.where(a, log_s, 0.0)
        if with_entropy:
            ent_out[b, t0:t1] = torch.where(a, ent, 0.0)
    return logp, m_out, s_out, ent_out


def logps_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, ignore_index,
              temperature, vocab_start, vocab_total, grad_logits):
    B, T, V = logits.shape
    acc = ops.acc_dtype(logits.dtype)
    for b, t0, t1 in row_blocks(B, T, V):
        x = logits[b, t0:t1].to(acc)  # read before grad_logits (maybe the same storage) is written
        lab = rows.classify_labels(labels[b, t0:t1], ignore_index, vocab_start, vocab_total, V)
        d = rows.scaled_diff(x, rows.ref_point(row_max[b, t0:t1, None].to(acc)), temperature)
        d = d - log_sum[b, t0:t1, None].to(acc)  # log p, exact for large |x| and low temperature
        p = torch.exp(d)
        g = torch.where(lab.active, grad_logp[b, t0:t1].to(acc), 0.0)[:, None]
        dz = -g * p
        dz.scatter_add_(-1, lab.index[:, None], torch.where(lab.local[:, None], g, 0.0))
        if grad_entropy is not None:
            ge = torch.where(lab.active, grad_entropy[b, t0:t1].to(acc), 0.0)[:, None]
            dz -= torch.where(p > 0, ge * p * (d + entropy[b, t0:t1, None].to(acc)), 0.0)
        if temperature != 1.0:
            dz /= temperature
        dz = torch.where(lab.active[:, None], dz, 0.0)
        grad_logits[b, t0:t1].copy_(dz)


ops.register_impl("torch", "logps_fwd", logps_fwd)
ops.register_impl("torch", "logps_bwd", logps_bwd)
