"""Plain float64 PyTorch: the test oracle and the eager baseline, same signatures as the API.

Deliberately the obvious formulation (``log_softmax`` then ``gather``) so it shares no code with
the kernels it checks. Computes in float64 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import torch


def token_logps(logits, labels, *, ignore_index=-100, temperature=1.0, shift=False,
                return_entropy=False, dtype=torch.float64, **_):
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    x = logits.to(dtype)
    if dtype == torch.float64 and x.shape[-1]:
        # the oracle: subtract the row max before dividing, so |logits| ~ 1e8 loses no digits to
        # the division (shift invariant; a row without a finite max is left as it is)
        m = x.detach().amax(-1, keepdim=True)
        x = x - torch.where(torch.isfinite(m), m, 0.0)
    z = x / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    active = labels != ignore_index
    V = logits.shape[-1]
    valid = (labels >= 0) & (labels < V)
    idx = torch.where(valid & active, labels, 0).long()
    logp = logp_all.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, float("nan"))
    logp = torch.where(active, logp, 0.0)
    if not return_entropy:
        return logp
    ent = -(logp_all.exp() * logp_all).nan_to_num(nan=0.0).sum(-1)
    broken = (torch.isnan(z) | (z == float("inf"))).any(-1) | (z == float("-inf")).all(-1)
    ent = torch.where(broken, float("nan"), ent)
    return logp, torch.where(active, ent, 0.0)


def sequence_logps(logits, labels, *, ignore_index=-100, token_weights=None, average=False,
                   shift=False, temperature=1.0, cu_seqlens=None, dtype=torch.float64, **_):
    if cu_seqlens is not None and shift:
        labels = labels.clone()
        flat = labels.view(-1)
        for s in cu_seqlens[:-1].tolist():
            if s < flat.numel():
                flat[s] = ignore_index
    tok = token_logps(logits, labels, ignore_index=ignore_index, temperature=temperature,
                      shift=shift, dtype=dtype)
    lab = labels[..., 1:] if shift else labels
    active = lab != ignore_index
    w = active.to(dtype)
    if token_weights is not None:  # an ignored token's weight is never read
        w = torch.where(active, (token_weights[..., 1:] if shift else token_weights).to(dtype), 0.0)
    tok = torch.where(w != 0, tok, 0.0)  # a weight of 0 drops the token, even a -inf log-prob
    nz = (w != 0).to(dtype)
    if cu_seqlens is not None:
        tok, w = tok.reshape(-1), w.reshape(-1)
        if shift:
            tok = torch.cat([tok.new_zeros(1), tok])
            w = torch.cat([w.new_zeros(1), w])
        bounds = cu_seqlens.tolist()
        nz = torch.cat([nz.new_zeros(1), nz.reshape(-1)]) if shift else nz.reshape(-1)
        spans = list(zip(bounds[:-1], bounds[1:]))
        num = torch.stack([(tok * w)[a:b].sum() for a, b in spans])
        den = torch.stack([w[a:b].sum() for a, b in spans])
        cnt = torch.stack([nz[a:b].sum() for a, b in spans])
    elif labels.dim() == 1:
        num, den, cnt = (tok * w).sum(), w.sum(), nz.sum()
    else:
        num, den, cnt = (tok * w).sum(-1), w.sum(-1), nz.sum(-1)
    if average:  # by the weight sum, of any sign; 0 for a sequence with no weight at all
        num = torch.where(cnt > 0, num / den, 0.0)
    return num


def head_logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None):
    """The logits a fused LM head stands for, in the inputs' own dtype: ``softcap *
    tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (no cap when ``softcap`` is None)."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z
