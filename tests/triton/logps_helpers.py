"""Inputs, float64 / eager references and launcher calls shared by the log-prob kernel tests."""

import torch

from fastdpo import reference as R
from fastdpo import rows


BLOCK = 64
INF, NAN = float("inf"), float("nan")


def make(B, T, V, dtype, device, *, seed=0, scale=3.0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    lab = torch.randint(0, V, (B, T), generator=g)
    lab[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return x.to(device), lab.to(device)


def ref_fwd(x, lab, temperature=1.0, dtype=torch.float64):
    """Reference (logp, entropy, lse) in ``dtype``; lse 0 on ignored rows like the kernels."""
    lp, ent = R.token_logps(x.cpu(), lab.cpu(), temperature=temperature, return_entropy=True,
                            dtype=dtype)
    lse = torch.logsumexp(x.cpu().to(dtype) / temperature, dim=-1)
    return lp, ent, torch.where(lab.cpu() != -100, lse, 0.0)


def lse_of(row_max, log_sum, temperature=1.0):
    return rows.lse(row_max.double(), log_sum.double(), temperature)


def ref_grad(x, lab, g, ge, temperature=1.0, dtype=torch.float64):
    """Autograd gradient of ``sum(g * logp + ge * entropy)`` computed in ``dtype``."""
    x = x.detach().cpu().to(dtype).requires_grad_(True)
    lp, ent = R.token_logps(x, lab.cpu(), temperature=temperature, return_entropy=True,
                            dtype=dtype)
    ((lp * g.cpu().to(dtype)).sum() + (ent * ge.cpu().to(dtype)).sum()).backward()
    return x.grad


def run_fwd(K, x, lab, temperature=1.0, vocab_start=0, vocab_total=None, block_v=BLOCK):
    V = x.shape[-1] if vocab_total is None else vocab_total
    return K.logps_fwd(x, lab, -100, temperature, vocab_start, V, True, block_v=block_v)


def run_bwd(K, g, ge, x, lab, stats, ent, out, temperature=1.0, vocab_start=0, vocab_total=None,
            block_v=BLOCK):
    """``stats``: the forward's ``(row_max, log_sum)``."""
    V = x.shape[-1] if vocab_total is None else vocab_total
    K.logps_bwd(g, ge, x, lab, *stats, ent, -100, temperature, vocab_start, V, out,
                block_v=block_v)
    return out
