"""The autograd Function of the DPO-family losses: closed-form backward, no graph in the formula.

Forward evaluates the per-pair losses together with their derivatives (``functional.combined``) in
fp32 (fp64 when an input is fp64) and keeps the ``O(B)`` derivative tensors; backward scales them by
the upstream gradient. Inputs that need no gradient get ``None``.
"""

from __future__ import annotations

import torch

from .functional import LossConfig, PairInputs, combined

# Positional order of the differentiable inputs, and their names in the VJP dicts.
_NAMES = ("pc", "pr", "rc", "rr", "s", "m")


def compute_dtype(*tensors) -> torch.dtype:
    return (torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors)
            else torch.float32)


def _reduce(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair.contiguous()  # sft's per-pair loss is an expanded scalar


class PreferenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pc, pr, rc, rr, s, m, nc, nr, bco_delta, cfg: LossConfig):
        dt = compute_dtype(pc, pr, rc, rr, s, m)

        def cast(t):
            return None if t is None else t.detach().to(dt)

        x_in = PairInputs(pc=cast(pc), pr=cast(pr), rc=cast(rc), rr=cast(rr), s=cast(s), m=cast(m),
                          nc=cast(nc), nr=cast(nr),
                          bco_delta=cast(bco_delta) if torch.is_tensor(bco_delta) else bco_delta)
        per_pair, vjp = combined(x_in, cfg)
        ctx.vjp = vjp
        ctx.batch = pc.shape[0]
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (pc, pr, rc, rr, s, m))
        ctx.reduction = cfg.reduction
        return _reduce(per_pair, cfg.reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.reduction == "none":
            g = grad
        else:
            g = grad.expand(ctx.batch)
            if ctx.reduction == "mean":
                g = g / ctx.batch
        grads = ctx.vjp(g)  # kept: a retain_graph=True graph may run backward again
        out = []
        for i, name in enumerate(_NAMES):
            v = grads.get(name)
            if not ctx.needs_input_grad[i]:
                out.append(None)
            elif v is None:
                out.append(torch.zeros(ctx.batch, dtype=ctx.dtypes[i], device=grad.device))
            else:
                out.append(v.to(ctx.dtypes[i]))
        return (*out, None, None, None, None)


class ClosedFormLoss(torch.autograd.Function):
    """A loss whose forward also returns its derivatives: ``formula(*inputs)`` (inputs detached,
    in the compute dtype; ``None`` stays ``None``) gives the per-example loss ``(N,)`` and
    ``vjp(g)``, mapping the per-example upstream gradient to one gradient (or ``None``) per
    input. Backward is that multiply; nothing but the ``O(N)`` derivatives is kept."""

    @staticmethod
    def forward(ctx, formula, reduction: str, *inputs):
        dt = compute_dtype(*inputs)
        per, vjp = formula(*(None if t is None else t.detach().to(dt) for t in inputs))
        ctx.vjp, ctx.n, ctx.reduction = vjp, per.shape[0], reduction
        ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
        ctx.shapes = tuple(None if t is None else t.shape for t in inputs)
        return _reduce(per, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.reduction == "none":
            g = grad
        else:
            g = grad.expand(ctx.n) / ctx.n if ctx.reduction == "mean" else grad.expand(ctx.n)
        grads = ctx.vjp(g)
        out = []
        for i, v in enumerate(grads):
            if not ctx.needs_input_grad[i + 2]:
                out.append(None)
            elif v is None:
                out.append(torch.zeros(ctx.shapes[i], dtype=ctx.dtypes[i], device=grad.device))
            else:
                out.append(v.to(ctx.dtypes[i]).expand(ctx.shapes[i]))
        return (None, None, *out)
